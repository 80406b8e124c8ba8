"""Reading a GGUF file's metadata: what the runtime checks before serving and the builder
records (quantization, chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ModelFileError(ValueError):
    """The GGUF file cannot be served; the message says why."""


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file, checked for what serving needs.

    Reading with gguf-py first turns a truncated or corrupt file into a clear refusal instead
    of a crash inside llama.cpp later.
    """
    import gguf

    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError, struct errors, IndexError...
        raise ModelFileError(f"{path}: not a readable GGUF file ({err})") from err
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        try:
            meta[name] = field.contents()
        except Exception:
            continue
    if meta.get("general.type", "model") != "model":
        raise ModelFileError(f"{path}: a GGUF {meta.get('general.type')}, not a model")
    arch = meta.get("general.architecture")
    if not arch:
        raise ModelFileError(f"{path}: GGUF without general.architecture")
    if not reader.tensors:
        raise ModelFileError(f"{path}: GGUF without tensors")
    end_of_data = max(t.data_offset + t.n_bytes for t in reader.tensors)
    if end_of_data > path.stat().st_size:
        raise ModelFileError(
            f"{path}: truncated ({path.stat().st_size} bytes, tensors need {end_of_data})"
        )
    return meta


def quantization_name(meta: dict[str, Any]) -> str:
    import gguf

    file_type = meta.get("general.file_type")
    if file_type is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type{file_type}"


def chat_template(path: Path) -> str:
    """The GGUF's own chat template ("" when it has none)."""
    return str(read_gguf_metadata(path).get("tokenizer.chat_template", ""))

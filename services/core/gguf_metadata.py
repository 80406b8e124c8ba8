"""Reading a GGUF file's metadata: what the runtime checks before serving and the builder
records (quantization, chat template)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


class ModelFileError(ValueError):
    """The GGUF file cannot be served; the message says why."""


def open_gguf(path: Path) -> Any:
    """gguf-py's reader of the file, with its arrays read in one pass (see ArrayReader)."""
    import gguf

    class ArrayReader(gguf.GGUFReader):
        """gguf-py parses an array element by element, two memmap slices each: 14 s for
        Gemma 3's 262k-token vocabulary, paid at every runtime start and build stage. Here a
        number array is one slice and a string array one loop over plain slices (~0.3 s);
        the fields, their parts and contents() are the same (tests/test_core.py)."""

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            count = self._get(orig_offs + 4, np.uint64)
            offs, n = orig_offs + 12, int(count[0])
            item = gguf.GGUFValueType(int(raw_itype[0]))
            types = [gguf.GGUFValueType.ARRAY] + ([item] if n else [])
            number = self.gguf_scalar_to_np.get(item)
            if number is not None:
                values = self._get(offs, number, n)
                return offs + int(values.nbytes) - orig_offs, [raw_itype, count, values], [2], types
            if item != gguf.GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)  # nested arrays
            plain = self.data.view(np.ndarray)  # a plain slice costs far less than a memmap's
            parts, data = [raw_itype, count], []
            for _ in range(n):
                size = int.from_bytes(plain[offs : offs + 8], sys.byteorder)
                parts += [plain[offs : offs + 8].view(np.uint64), plain[offs + 8 : offs + 8 + size]]
                data.append(len(parts) - 1)
                offs += 8 + size
            return offs - orig_offs, parts, data, types

    return ArrayReader(path)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file, checked for what serving needs.

    Reading with gguf-py first turns a truncated or corrupt file into a clear refusal instead
    of a crash inside llama.cpp later.
    """
    import gguf

    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        reader = open_gguf(path)
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

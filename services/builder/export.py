"""Stages 4 and 5: write the merged student as an F16 GGUF, check it, quantize it.

The tensors are laid out by llama.cpp's own converter for the model's family (q/k permutations,
norm offsets, fused projections, tied embeddings: services/builder/llama_tensors.py); every
other key — tokenizer, chat template, hyperparameters — comes from the student's base GGUF. A
file laid out wrong loads silently and generates garbage, so each file is checked against the
model it came from: block by block, the logits, and (F16) the greedy tokens.
"""

from __future__ import annotations

import ctypes
import errno
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.builder.layer_trace import trace_forward
from services.builder.student import converter_tree, run_converter
from services.core.gguf_metadata import open_gguf
from services.runtime.backends.llama_log import llama_log_captured

# Keys the writer sets itself, or that describe the old file rather than the model.
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")
_TENSORS_SCRIPT = Path(__file__).with_name("llama_tensors.py")


class ExportError(RuntimeError):
    """The exported GGUF does not behave like the model it came from."""


def write_gguf(merged_dir: Path, base_gguf: Path, out_path: Path, name: str) -> None:
    """Write the merged model saved in merged_dir as an F16 GGUF shaped like base_gguf."""
    import gguf

    with converter_tree() as tree, tempfile.TemporaryDirectory(prefix="export-") as scratch:
        converted_path = Path(scratch) / "tensors.gguf"
        run_converter(_TENSORS_SCRIPT, str(tree), str(merged_dir), str(converted_path),
                      what=f"lay out the tensors of {merged_dir}")  # fmt: skip
        base, converted = open_gguf(base_gguf), open_gguf(converted_path)
        tensors = _matching_tensors(base, converted)
        writer = gguf.GGUFWriter(out_path, arch=str(base.fields["general.architecture"].contents()))
        _copy_metadata(base, writer, name)
        for tensor in tensors:
            data = np.asarray(tensor.data)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _matching_tensors(base: Any, converted: Any) -> list[Any]:
    """The converted tensors in the base's order, each named and shaped as in the base."""
    found = {t.name: t for t in converted.tensors}
    missing = [t.name for t in base.tensors if t.name not in found]
    extra = sorted(set(found) - {t.name for t in base.tensors})
    if missing or extra:
        raise ExportError(
            f"the converted model does not have the base GGUF's tensors (missing {missing[:3]}, "
            f"extra {extra[:3]}): is the student's checkpoint the base GGUF's model?"
        )
    for tensor in base.tensors:
        ours, theirs = _shape(found[tensor.name]), _shape(tensor)
        if ours != theirs:
            raise ExportError(
                f"tensor {tensor.name}: the model has shape {ours}, the base {theirs}"
            )
    return [found[t.name] for t in base.tensors]


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def _copy_metadata(base: Any, writer: Any, name: str) -> None:
    import gguf

    for key, field in base.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        value = name if key == "general.name" else field.contents()
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, main_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass(frozen=True)
class Bound:
    """How far a file of one type may stray from the model it was written from: the relative
    L2 difference of a block's output, and the largest next-token logit difference in units of
    the logits' standard deviation. A layout error is of order 1 in both; the bounds leave room
    for each type's rounding (docs/building.md has the measured values)."""

    hidden: float
    logits: float


BOUNDS = {"F32": Bound(0.002, 0.02), "F16": Bound(0.01, 0.1), "Q8_0": Bound(0.1, 1.0)}
LOW_BIT = Bound(0.35, 2.0)  # 4- to 6-bit types


def bound_for(quant: str) -> Bound:
    return BOUNDS.get(quant, LOW_BIT)


@dataclass(frozen=True)
class Reference:
    """What the model computes for a prompt: the last token's output of every block (the last
    block's after the output norm, as transformers reports it) and the next-token logits."""

    tokens: list[int]
    hidden: list[np.ndarray]
    logits: np.ndarray


def reference(model: Any, tokens: list[int]) -> Reference:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_hidden_states=True)
    hidden = [h[0, -1].float().numpy() for h in out.hidden_states[1:]]
    return Reference(tokens, hidden, out.logits[0, -1].float().numpy())


def compare(ref: Reference, gguf_path: Path, quant: str, prompt: int) -> dict[str, Any]:
    """The GGUF's forward pass against the model's: the first block past the type's bound is
    named; then the logits are held to theirs."""
    trace = trace_forward(gguf_path, ref.tokens)
    bound = bound_for(quant)
    ours = [*trace.layers[: len(ref.hidden) - 1], trace.final_norm]
    differences = [_relative(mine, theirs) for mine, theirs in zip(ours, ref.hidden, strict=True)]
    for block, difference in enumerate(differences):
        if difference > bound.hidden:
            last = ", or output_norm" if block == len(differences) - 1 else ""
            raise ExportError(
                f"export self-check failed on prompt {prompt} ({quant}): block {block} "
                f"(tensors blk.{block}.*{last}) of {gguf_path.name} computes another hidden state "
                f"than the model (relative difference {difference:.3g}, bound {bound.hidden}); "
                "that block's tensors are not laid out as llama.cpp reads them"
            )
    scale = float(np.std(ref.logits)) or 1.0
    gap = float(np.max(np.abs(trace.logits - ref.logits)))
    if gap > bound.logits * scale:
        raise ExportError(
            f"export self-check failed on prompt {prompt} ({quant}): the next-token logits of "
            f"{gguf_path.name} differ from the model's by up to {gap:.3g} ({gap / scale:.2f} "
            f"standard deviations, bound {bound.logits}); check the output norm and the output "
            "and embedding tensors"
        )
    return {
        "prompt": prompt,
        "quant": quant,
        "max_hidden_difference": max(differences, default=0.0),
        "max_logit_difference": gap,
        "logit_std": scale,
    }


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / (np.linalg.norm(theirs) or 1.0))


def self_check(
    model: Any, gguf_path: Path, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int = 12
) -> tuple[list[dict[str, Any]], list[Reference]]:
    """The F16 export against the model: each block and the logits within F16's bound, and the
    same greedy tokens. Returns the checks and the references the quantized files are held to."""
    from services.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_path, n_ctx=2048, n_threads=2, model_name="self-check")
    try:
        token_lists = [list(backend.prepare(messages).tokens or ()) for messages in prompts]
        greedy = [_greedy_agree(model, backend, tokens, index, max_new_tokens)
                  for index, tokens in enumerate(token_lists)]  # fmt: skip
    finally:
        backend.close()
    references = [reference(model, tokens) for tokens in token_lists]
    checks = [
        {**compare(ref, gguf_path, "F16", index), "greedy_tokens": count}
        for index, (ref, count) in enumerate(zip(references, greedy, strict=True))
    ]
    return checks, references


def _greedy_agree(
    model: Any, backend: Any, tokens: list[int], index: int, max_new_tokens: int
) -> int:
    """Greedy tokens of the transformers model and of the GGUF in llama.cpp must agree, up to
    a near tie (transformers' margin within F16's logit bound). Returns the tokens agreed."""
    import torch
    from llama_cpp import llama_vocab_is_eog

    llm = backend.llama
    ours: list[int] = []
    for token in llm.generate(tokens, temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
        if llama_vocab_is_eog(llm._model.vocab, token) or len(ours) >= max_new_tokens:
            break
        ours.append(int(token))
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([tokens]), max_new_tokens=len(ours) or 1, do_sample=False,
            attention_mask=torch.ones((1, len(tokens)), dtype=torch.long),
        )  # fmt: skip
    theirs = [int(t) for t in generated[0, len(tokens) :]][: len(ours)]
    if theirs == ours:
        return len(ours)
    at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([tokens + ours[:at]])).logits[0, -1].float().numpy()
    margin = float(logits[theirs[at]] - logits[ours[at]])
    if margin <= bound_for("F16").logits * float(np.std(logits)):
        return at  # a near tie that F16 rounding may flip: the tokens before it agreed
    raise ExportError(
        f"export self-check failed on prompt {index}: at generated token {at} llama.cpp chose "
        f"{ours[at]} ({llm.detokenize([ours[at]])!r}) and transformers chose {theirs[at]} "
        f"({llm.detokenize([theirs[at]])!r}), {margin:.3g} logits ahead; the GGUF does not "
        "match the fine-tuned model"
    )


def export_student(
    student_dir: Path,
    adapter_dir: Path,
    base_gguf: Path,
    out_path: Path,
    name: str,
    prompts: Sequence[list[dict[str, str]]],
) -> tuple[list[dict[str, Any]], list[Reference]]:
    """The student with its adapter merged, written as an F16 GGUF and self-checked."""
    from services.builder.finetune import merge_adapter

    merged = merge_adapter(student_dir, adapter_dir)
    return export_model(merged, student_dir, base_gguf, out_path, name, prompts)


def export_model(
    model: Any, student_dir: Path, base_gguf: Path, out_path: Path, name: str,
    prompts: Sequence[list[dict[str, str]]],
) -> tuple[list[dict[str, Any]], list[Reference]]:  # fmt: skip
    """A transformers model written as an F16 GGUF shaped like base_gguf, and self-checked.
    The student's tokenizer files go beside the weights: some converters read them."""
    with tempfile.TemporaryDirectory(prefix="merged-") as scratch:
        folder = Path(scratch)
        for item in student_dir.glob("tokenizer*"):
            shutil.copy2(item, folder / item.name)
        model.save_pretrained(folder, safe_serialization=True)
        write_gguf(folder, base_gguf, out_path, name)
    return self_check(model, out_path, prompts)


def save_references(references: Sequence[Reference], path: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for index, ref in enumerate(references):
        arrays[f"{index}.tokens"] = np.asarray(ref.tokens, dtype=np.int64)
        arrays[f"{index}.hidden"] = np.stack(ref.hidden) if ref.hidden else np.zeros((0, 0))
        arrays[f"{index}.logits"] = ref.logits
    np.savez_compressed(path, allow_pickle=False, **arrays)


def load_references(path: Path) -> list[Reference]:
    with np.load(path) as data:
        count = len({key.split(".")[0] for key in data.files})
        return [
            Reference(
                [int(t) for t in data[f"{i}.tokens"]],
                list(data[f"{i}.hidden"]),
                data[f"{i}.logits"],
            )
            for i in range(count)
        ]


def quantize(source: Path, out_path: Path, quant: str, n_threads: int) -> str | None:
    """llama.cpp's quantizer (llama_model_quantize), in-process. Its log (a line per tensor
    that falls back to another type) is kept from the terminal; returned is a one-line note of
    the fallbacks, if any."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}", None)
    if ftype is None:
        raise ExportError(f"llama.cpp has no quantization type {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.allow_requantize = True
    with llama_log_captured() as log:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(out_path).encode(), ctypes.byref(params)
        )
    if status != 0:
        out_path.unlink(missing_ok=True)  # llama.cpp leaves a partial file behind
        free = shutil.disk_usage(out_path.parent).free
        if free < source.stat().st_size:  # llama.cpp reports no errno: the likely cause
            raise OSError(errno.ENOSPC, f"quantizing to {quant} ran out of space", str(out_path))
        said = " ".join(line.strip() for line in log[-3:])
        raise ExportError(f"llama_model_quantize to {quant} failed (status {status}): {said}")
    return fallback_note(log)


def fallback_note(log: list[str]) -> str | None:
    """What llama.cpp's quantizer says of tensors it could not give the asked type (a row of
    576 values is no whole number of q4_K's 256-value blocks), in a line."""
    text = "".join(log)
    counted = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    if counted is None:
        return None
    used = sorted(set(re.findall(r"falling back to\s+(\w+)", text)))
    widths = sorted(set(re.findall(r"ncols\s+(\d+) not divisible by (\d+)", text)))
    why = "; ".join(f"rows of {n} are no multiple of {b}" for n, b in widths)
    return (f"{counted[1]} of {counted[2]} tensors quantized as {', '.join(used) or 'another type'}"
            + (f" ({why})" if why else ""))  # fmt: skip

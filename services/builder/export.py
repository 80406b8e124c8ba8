"""Stages 4 and 5: write the merged student as an F16 GGUF, check it, quantize it.

The GGUF keeps the base GGUF's metadata (tokenizer, chat template, hyperparameters) and
llama.cpp's tensor layout. llama's q/k projection rows are permuted in GGUF relative to Hugging
Face (transformers un-permutes them on load): they are re-permuted here. A file written without
that loads silently and generates garbage, so the stage checks itself against transformers.
"""

from __future__ import annotations

import ctypes
import errno
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Keys the writer sets itself, or that describe the old file rather than the model.
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")
# llama.cpp keeps these small tensors in F32 whatever the file type.
_F32_SUFFIXES = ("_norm.weight", "norm.weight")


class ExportError(RuntimeError):
    """The exported GGUF does not behave like the model it came from."""


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute: HF rotary layout -> GGUF layout."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model: Any, base_gguf: Path, out_path: Path, name: str) -> None:
    """Write `model` (a transformers llama-family model) as an F16 GGUF shaped like base_gguf."""
    import gguf

    reader = gguf.GGUFReader(base_gguf)
    arch_name = str(reader.fields["general.architecture"].contents())
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ExportError(f"unknown GGUF architecture {arch_name!r}")
    n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
    n_head = int(reader.fields[f"{arch_name}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch_name}.attention.head_count_kv")
    n_head_kv = int(kv_field.contents()) if kv_field else n_head
    names = gguf.get_tensor_name_map(arch, n_blocks)
    wanted = {t.name for t in reader.tensors}

    writer = gguf.GGUFWriter(out_path, arch=arch_name)
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        value = field.contents()
        if key == "general.name":
            value = name
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, main_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    written = set()
    for hf_name, tensor in model.state_dict().items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in wanted or gguf_name in written:
            continue  # e.g. lm_head tied to the embeddings: the base has no output.weight
        data = tensor.detach().to("cpu").float().numpy()
        if arch_name == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch_name == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_head_kv)
        if data.ndim == 1 or gguf_name.endswith(_F32_SUFFIXES):
            data = data.astype(np.float32)
        else:
            data = data.astype(np.float16)
        writer.add_tensor(gguf_name, data)
        written.add(gguf_name)
    missing = wanted - written
    if missing:
        raise ExportError(
            f"the model has no weights for {len(missing)} GGUF tensors, e.g. {sorted(missing)[:3]}"
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def self_check(
    model: Any, gguf_path: Path, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int = 12
) -> list[dict[str, Any]]:
    """Greedy tokens of the transformers model and of the GGUF in llama.cpp must agree."""
    import torch
    from llama_cpp import Llama, llama_vocab_is_eog

    from services.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_path, n_ctx=2048, n_threads=2, model_name="self-check")
    llm: Llama = backend.llama
    results = []
    try:
        for index, messages in enumerate(prompts):
            tokens = list(backend.prepare(messages).tokens or ())
            ours: list[int] = []
            for token in llm.generate(tokens, temp=0.0, top_k=0, top_p=1.0, min_p=0.0):
                if llama_vocab_is_eog(llm._model.vocab, token) or len(ours) >= max_new_tokens:
                    break
                ours.append(int(token))
            with torch.no_grad():
                generated = model.generate(
                    torch.tensor([tokens]),
                    max_new_tokens=len(ours) or 1,
                    do_sample=False,
                    attention_mask=torch.ones((1, len(tokens)), dtype=torch.long),
                )
            theirs = [int(t) for t in generated[0, len(tokens) :]][: len(ours)]
            agree = theirs == ours
            results.append({"prompt": index, "tokens": len(ours), "agree": agree})
            if not agree:
                at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
                raise ExportError(
                    f"export self-check failed on prompt {index}: at generated token {at} "
                    "llama.cpp "
                    f"chose {ours[at]} ({llm.detokenize([ours[at]])!r}) and transformers chose "
                    f"{theirs[at]} ({llm.detokenize([theirs[at]])!r}); the GGUF does not match "
                    "the fine-tuned model"
                )
    finally:
        backend.close()
    return results


def quantize(source: Path, out_path: Path, quant: str, n_threads: int) -> None:
    """llama.cpp's quantizer (llama_model_quantize), in-process."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}", None)
    if ftype is None:
        raise ExportError(f"llama.cpp has no quantization type {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(out_path).encode(), ctypes.byref(params)
    )
    if status != 0:
        out_path.unlink(missing_ok=True)  # llama.cpp leaves a partial file behind
        free = shutil.disk_usage(out_path.parent).free
        if free < source.stat().st_size:  # llama.cpp reports no errno: the likely cause
            raise OSError(errno.ENOSPC, f"quantizing to {quant} ran out of space", str(out_path))
        raise ExportError(f"llama_model_quantize to {quant} failed (status {status})")

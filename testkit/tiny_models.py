"""Tiny randomly initialised checkpoints of each model family, made with transformers' config
classes and a real tokenizer (SmolLM2's; Qwen2's own for qwen2, from the vocabulary file
llama.cpp's sources carry): real models of the family's shape, small enough for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from testkit.processes import smollm2_gguf

# Small but real shapes: 2 blocks, grouped-query attention where the family has it.
COMMON = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    # transformers 5 gives any qwen2 checkpoint Qwen2Tokenizer, whose pre-tokenizer llama.cpp
    # recognises only with Qwen2's vocabulary: the family brings its own tokenizer.
    "qwen2": (
        "Qwen2Config",
        {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645},
    ),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16},
    ),
    "phi3": ("Phi3Config", {"pad_token_id": 2}),
}


def smollm2_tokenizer(folder: Path) -> Path:
    """SmolLM2's tokenizer (a BPE llama.cpp's converter recognises) with its ChatML template."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


# Families whose tiny checkpoint needs a tokenizer other than SmolLM2's.
OWN_TOKENIZER = {"qwen2": "ggml-vocab-qwen2.gguf"}


def vocab_tokenizer(vocab_file: str, folder: Path) -> Path:
    """A tokenizer from one of the vocabulary GGUFs in llama.cpp's sources (models/), as
    transformers reads it, with its chat template."""
    import tarfile
    import tempfile

    from transformers import AutoTokenizer

    from services.builder.student import llama_cpp_source

    source = llama_cpp_source()
    with tempfile.TemporaryDirectory() as scratch:
        if source.is_dir():
            vocab = source / "models" / vocab_file
        else:
            with tarfile.open(source) as archive:
                member = next(
                    m
                    for m in archive.getmembers()
                    if m.name.endswith(f"/vendor/llama.cpp/models/{vocab_file}")
                )
                archive.extractall(scratch, members=[member], filter="data")  # fmt: skip
            vocab = Path(scratch) / member.name
        AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name).save_pretrained(folder)
    return folder


def tiny_checkpoint(family: str, tokenizer_dir: Path, folder: Path) -> Path:
    import torch
    import transformers

    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # away from 1 (Gemma's from 0): offsets matter
                param.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(20.0)  # peaked attention: the rotary layout matters
    model.save_pretrained(folder, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    if family in OWN_TOKENIZER:
        return folder
    # SmolLM2's own class: llama.cpp's converter then recognises its pre-tokenizer (and
    # converts a Phi BPE tokenizer only when it says so, as Phi-4's does).
    config_path = folder / "tokenizer_config.json"
    settings = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**settings, "tokenizer_class": "GPT2Tokenizer"}))
    return folder

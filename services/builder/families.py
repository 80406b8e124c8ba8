"""The model families a student may come from: what the export, the self-check and a base
student's chat template need to know about each.

The tensor layout of each family (q/k permutations, norm offsets, fused projections, tied
embeddings) is not written here: llama.cpp's own converter lays the tensors out
(services/builder/llama_tensors.py). A family is listed once the whole path — dense copy, LoRA,
export, self-check — has been run on it (tests/test_families.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.builder.spec import SpecError

# Instruct templates for base students whose GGUF or tokenizer carries none: the family's own
# turn markers, which its vocabulary holds as single tokens.
_GEMMA_TEMPLATE = (  # as Gemma 3's instruct models: a system message opens the first turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (prefix if loop.first else '') + message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]  # config.json "architectures" (or its model_type)
    gguf_architecture: str  # general.architecture of its GGUFs
    chat_template: str  # for a base student without one
    turn_markers: tuple[str, ...]  # tokens the template needs from the vocabulary


FAMILIES = {
    family.name: family
    for family in (
        Family("llama", ("LlamaForCausalLM", "llama"), "llama", _LLAMA3_TEMPLATE,
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        Family("mistral", ("MistralForCausalLM", "mistral"), "llama", _CHATML_TEMPLATE,
               ("<|im_start|>", "<|im_end|>")),
        Family("qwen2", ("Qwen2ForCausalLM", "qwen2"), "qwen2", _CHATML_TEMPLATE,
               ("<|im_start|>", "<|im_end|>")),
        Family("qwen3", ("Qwen3ForCausalLM", "qwen3"), "qwen3", _CHATML_TEMPLATE,
               ("<|im_start|>", "<|im_end|>")),
        Family("gemma3", ("Gemma3ForCausalLM", "gemma3_text"), "gemma3", _GEMMA_TEMPLATE,
               ("<start_of_turn>", "<end_of_turn>")),
        Family("phi3", ("Phi3ForCausalLM", "phi3"), "phi3", _PHI3_TEMPLATE,
               ("<|user|>", "<|assistant|>", "<|end|>")),
    )
}  # fmt: skip


def known() -> str:
    return ", ".join(FAMILIES)


def unknown(what: str) -> SpecError:
    return SpecError(
        f"student.source: {what} is not a model family the export knows; it knows {known()} "
        "(choose a student of one of these)"
    )


def family_of_hf(hf_dir: Path) -> Family:
    """The family of a Hugging Face model folder, from its config.json."""
    config = json.loads((hf_dir / "config.json").read_text())
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    for family in FAMILIES.values():
        if architectures[0] in family.hf_architectures:
            return family
    raise unknown(f"{hf_dir} ({architectures[0]})")


def family_of_gguf(gguf_path: Path) -> Family:
    """The family of a GGUF, from general.architecture (a Mistral GGUF reads as llama)."""
    from services.core.gguf_metadata import read_gguf_metadata

    architecture = str(read_gguf_metadata(gguf_path).get("general.architecture", "?"))
    for family in FAMILIES.values():
        if family.gguf_architecture == architecture:
            return family
    raise unknown(f"{gguf_path.name} (GGUF architecture {architecture!r})")


def base_chat_template(family: Family, vocabulary: set[str]) -> str:
    """The family's instruct template for a base student, if its vocabulary has the markers."""
    missing = [marker for marker in family.turn_markers if marker not in vocabulary]
    if missing:
        raise SpecError(
            f"student.source: the student has no chat template, and its vocabulary lacks "
            f"{', '.join(missing)} for the {family.name} family's; use an instruct model or a "
            "tokenizer with a chat_template"
        )
    return family.chat_template

"""Every model family the export claims, end to end without downloads: a tiny randomly
initialised checkpoint made from the family's transformers config, converted by llama.cpp's
converter, LoRA-tuned for a few steps, exported and self-checked (transformers and llama.cpp
agree on greedy tokens, on every block's output and on the logits). A file with one family
convention undone is caught, naming the block."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testkit.scratch import scratch
from testkit.tiny_models import (
    COMMON,
    FAMILIES,
    OWN_TOKENIZER,
    smollm2_tokenizer,
    tiny_checkpoint,
    vocab_tokenizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPTS = [
    [{"role": "system", "content": "Sort the ticket."},
     {"role": "user", "content": "My laptop will not boot after the update."}],
    [{"role": "user", "content": "Refund the duplicate charge, please."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tune(student_dir: Path, work: Path) -> Path:
    """A few LoRA steps with the build's own trainer on a handful of chats."""
    from services.builder.finetune import train_lora
    from services.builder.spec import LoraSpec

    chats = [{"messages": [*prompt, {"role": "assistant", "content": f"answer {i}"}]}
             for i, prompt in enumerate(PROMPTS * 4)]  # fmt: skip
    dataset = work / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    lora = LoraSpec(min_steps=0, epochs=1, batch_size=4, learning_rate=0.05, checkpoints=0)
    out = work / "finetune"
    train_lora(base_dir=student_dir, dataset_path=dataset, lora=lora, device="cpu", seed=0,
               n_threads=2, out_dir=out)  # fmt: skip
    return out / "adapter"


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request: pytest.FixtureRequest, tokenizer_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # fmt: skip
    from services.builder import export
    from services.builder.student import dense_hf_copy, resolve_student, write_base_gguf
    from services.core.gguf_metadata import chat_template

    family = request.param
    with scratch(tmp_path_factory, family) as work:
        if family in OWN_TOKENIZER:
            tokenizer_dir = vocab_tokenizer(OWN_TOKENIZER[family], work / "tokenizer")
        source = resolve_student(str(tiny_checkpoint(family, tokenizer_dir, work / "hf")))
        base = work / "base.gguf"
        write_base_gguf(source, base)
        dense_hf_copy(source, work / "student", chat_template(base))
        adapter = tune(work / "student", work)
        out = work / f"{family}.F16.gguf"
        # Not named after the family: llama.cpp looks up Phi-3's turn tokens in a file named phi3,
        # and this vocabulary (SmolLM2's) has none.
        checks, references = export.export_student(work / "student", adapter, base, out, "tiny",
                                                   PROMPTS)  # fmt: skip
        yield {"family": family, "source": source, "base": base, "out": out, "checks": checks,
               "references": references, "work": work}  # fmt: skip


def test_each_family_converts_tunes_exports_and_agrees(exported: dict[str, Any]) -> None:
    from services.core.gguf_metadata import read_gguf_metadata

    assert exported["source"].family.name == exported["family"]
    checks = exported["checks"]
    assert len(checks) == len(PROMPTS)
    assert all(c["max_hidden_difference"] < 0.01 for c in checks)
    assert all(c["max_logit_difference"] < 0.1 * c["logit_std"] for c in checks)
    meta = read_gguf_metadata(exported["out"])
    base = read_gguf_metadata(exported["base"])
    assert meta["general.architecture"] == base["general.architecture"]
    assert meta["tokenizer.chat_template"] == base["tokenizer.chat_template"]


def test_the_tuned_weights_reach_the_file(exported: dict[str, Any]) -> None:
    """The export is of the tuned model, not the base: their logits differ."""
    from services.builder import export

    with pytest.raises(export.ExportError):
        export.compare(exported["references"][0], exported["base"], "F16", 0)


def rewrite_tensor(source: Path, target: Path, name: str, change: Any) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main_type, sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name == name:
            data = change(data).astype(data.dtype)
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_rotary_layout(n_head: int) -> Any:
    """transformers' q/k row order: what a llama export that skipped the permutation writes."""
    return lambda w: (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize(
    ("family", "tensor", "change"),
    [
        ("llama", "blk.1.attn_q.weight", hf_rotary_layout(COMMON["num_attention_heads"])),
        ("gemma3", "blk.0.attn_norm.weight", lambda w: w - 1.0),  # Gemma's +1 not applied
    ],
)
def test_a_convention_undone_is_caught_naming_the_block(
    family: str, tensor: str, change: Any, tokenizer_dir: Path, tmp_path: Path
) -> None:
    from services.builder import export
    from services.builder.student import dense_hf_copy, resolve_student, write_base_gguf
    from services.core.gguf_metadata import chat_template

    source = resolve_student(str(tiny_checkpoint(family, tokenizer_dir, tmp_path / "hf")))
    base = tmp_path / "base.gguf"
    write_base_gguf(source, base)
    dense_hf_copy(source, tmp_path / "student", chat_template(base))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    good = tmp_path / "good.gguf"
    _, references = export.export_model(
        model, tmp_path / "student", base, good, "tiny", PROMPTS[:1]
    )
    wrong = tmp_path / "wrong.gguf"
    rewrite_tensor(good, wrong, tensor, change)
    block = tensor.split(".")[1]
    with pytest.raises(export.ExportError, match=rf"block {block} \(tensors blk\.{block}\.\*"):
        export.compare(references[0], wrong, "F16", 0)


def test_an_unknown_family_fails_before_training_naming_the_known_ones(tmp_path: Path) -> None:
    from services.builder.spec import SpecError
    from services.builder.student import resolve_student

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(SpecError) as caught:
        resolve_student(str(tmp_path))
    message = str(caught.value)
    assert "GPTNeoXForCausalLM" in message
    assert "llama, mistral, qwen2, qwen3, gemma3, phi3" in message

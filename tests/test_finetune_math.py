"""The shared-prefix training step computes the plain batched loss and gradients, exactly."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from services.builder.finetune import (  # noqa: E402
    IGNORE,
    TrainExample,
    _collate,
    shared_prefix_loss,
)
from services.core.tokens import common_prefix_length  # noqa: E402


def tiny_lora_llama() -> object:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def example(prefix: list[int], prompt_tail: list[int], answer: list[int]) -> TrainExample:
    ids = prefix + prompt_tail + answer
    return TrainExample(ids, [IGNORE] * (len(prefix) + len(prompt_tail)) + answer)


def grads(model: object) -> list[object]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "tails",
    [
        # different prompt tails and answer lengths: rows are padded differently
        [([5, 6], [7, 8, 9]), ([11], [12]), ([13, 14, 15, 16], [17, 18])],
        # a single example: the whole prompt is the "common prefix", one token stays in the tail
        [([5, 6, 7], [8, 9])],
        # the examples share nothing beyond the prefix's first token
        [([20], [21, 22]), ([30, 31], [32])],
    ],
)
def test_shared_prefix_loss_equals_the_plain_batched_loss(
    tails: list[tuple[list[int], list[int]]],
) -> None:
    model = tiny_lora_llama()
    prefix = [1, 2, 3, 4, 40, 41, 42]
    batch = [example(prefix, tail, answer) for tail, answer in tails]

    shared, tokens = shared_prefix_loss(model, batch, pad_id=0, device="cpu")
    shared.backward()
    shared_grads = grads(model)
    model.zero_grad()  # type: ignore[attr-defined]

    ids, labels, attention = _collate(batch, 0, "cpu")
    plain = model(input_ids=ids, attention_mask=attention, labels=labels).loss  # type: ignore[operator]
    plain.backward()

    # every token is counted once: the shared prefix once, each row's tail in full
    assert tokens <= sum(len(e.input_ids) for e in batch)
    assert torch.allclose(shared, plain, atol=1e-5), (float(shared), float(plain))
    for a, b in zip(shared_grads, grads(model), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_common_prefix_length() -> None:
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([[9], [1]]) == 0

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

    ids, labels, attention, _ = _collate(batch, 0, "cpu")
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


def test_weighted_loss_is_the_weighted_mean_of_token_losses() -> None:
    """With weights, the shared-prefix loss is sum(w * token loss) / sum(w), computed here by
    hand from the plain model's per-token losses."""
    model = tiny_lora_llama()
    prefix = [1, 2, 3, 4, 40, 41, 42]
    batch = [example(prefix, [5, 6], [7, 8, 9]), example(prefix, [11], [12, 13])]
    for row in batch:
        row.weights = [0.0 if label == IGNORE else 0.25 for label in row.labels]
        row.weights[-1] = 1.0  # the last answer token counts fully
    weighted, _ = shared_prefix_loss(model, batch, pad_id=0, device="cpu")

    ids, labels, attention, weights = _collate(batch, 0, "cpu")
    logits = model(input_ids=ids, attention_mask=attention).logits  # type: ignore[operator]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="none",
    ).reshape(labels[:, 1:].shape)  # fmt: skip
    w = weights[:, 1:] * (labels[:, 1:] != IGNORE)
    assert torch.allclose(weighted, (token_loss * w).sum() / w.sum(), atol=1e-5)


def test_value_tokens_carry_full_weight_and_the_scaffold_less() -> None:
    from services.builder.finetune import answer_weights, value_spans
    from testkit.processes import smollm2_gguf

    answer = (
        "[[ ## department ## ]]\nfinance\n\n[[ ## needs_reply ## ]]\nTrue\n\n[[ ## completed ## ]]"
    )
    assert [answer[a:b] for a, b in value_spans(answer)] == ["finance", "True"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf().parent), gguf_file=smollm2_gguf().name
    )
    ids = tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    weights = answer_weights(tokenizer, ids, answer, scaffold_weight=0.1)
    full = [tokenizer.decode([i]) for i, w in zip(ids, weights, strict=True) if w == 1.0]
    text = "".join(full)
    assert "finance" in text and "True" in text and "<|im_end|>" in text  # values and the stop
    assert "department" not in text and "completed" not in text  # the scaffold is down-weighted
    assert sum(w == 0.1 for w in weights) > sum(w == 1.0 for w in weights)


def test_a_formatted_record_is_labelled_on_its_answer_and_weighted_on_its_values() -> None:
    """A training record as the dataset stage writes it (the inbox example's program through
    the runtime's codec): no label on the prompt, full weight on the values and the stop."""
    from examples.inbox_routing.program import build
    from services.builder.finetune import tokenize_chats
    from services.core.program import ProgramSpec, PromptCodec
    from testkit.processes import smollm2_gguf

    codec = PromptCodec(ProgramSpec.from_signature(build().signature, name="inbox"))
    record = codec.format_finetune(
        {"subject": "Invoice 41", "body": "Please resend invoice 41, the total is wrong."},
        {"department": "finance", "needs_reply": True},
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf().parent), gguf_file=smollm2_gguf().name
    )
    [example], kept = tokenize_chats(tokenizer, [record["messages"]], 1024, scaffold_weight=0.1)
    assert kept == [0] and example.weights is not None
    answer_at = example.labels.index(next(v for v in example.labels if v != IGNORE))
    assert set(example.labels[:answer_at]) == {IGNORE}  # the prompt is never a target
    assert set(example.weights[:answer_at]) == {0.0}
    assert example.labels[answer_at:] == example.input_ids[answer_at:]
    full = "".join(tokenizer.decode([t]) for t, w in
                   zip(example.input_ids, example.weights, strict=True) if w == 1.0)  # fmt: skip
    assert full.replace("\n", "").startswith("financeTrue<|im_end|>"), full
    scaffold = [w for w in example.weights[answer_at:] if w != 1.0]
    assert scaffold and set(scaffold) == {0.1}

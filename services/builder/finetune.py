"""Stage 3, finetune: LoRA on the student with the loss on assistant tokens only.

A plain PyTorch loop: short enough to read, and it runs the same on CPU and CUDA.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.builder.data import imbalance
from services.builder.probe import Probe, ProbeResult
from services.builder.spec import LoraSpec, SpecError
from services.core.tokens import common_prefix_length

IGNORE = -100


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]
    # Per-token loss weight (1.0 where None): the output values count fully, the fixed field
    # scaffold (`[[ ## name ## ]]`, `[[ ## completed ## ]]`) by `lora.scaffold_weight`.
    weights: list[float] | None = None


# An output field's value in a DSPy ChatAdapter answer: after its header, up to the next one.
_VALUE = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\s*\Z)", re.S)


def value_spans(answer: str) -> list[tuple[int, int]]:
    """Character spans of the output values in an assistant answer (not `completed`)."""
    return [m.span(2) for m in _VALUE.finditer(answer) if m.group(1) != "completed"]


def answer_weights(
    tokenizer: Any, answer_ids: list[int], answer: str, scaffold_weight: float
) -> list[float]:
    """1.0 for tokens that overlap an output value or follow the answer's text (the
    end-of-turn tokens, which teach the model to stop); `scaffold_weight` for the rest."""
    spans = value_spans(answer)
    weights, start = [], 0
    for count in range(1, len(answer_ids) + 1):
        end = len(tokenizer.decode(answer_ids[:count]))
        in_value = any(lo < end and start < hi for lo, hi in spans)
        past_text = start >= len(answer.rstrip())
        weights.append(1.0 if in_value or past_text else scaffold_weight)
        start = end
    return weights


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    return device


def tokenize_chats(
    tokenizer: Any, chats: list[list[dict[str, str]]], max_length: int,
    scaffold_weight: float = 1.0,
) -> tuple[list[TrainExample], list[int]]:  # fmt: skip
    """Token ids with labels only on the final assistant turn (weighted: values over
    scaffold), and the indices of the chats kept (over-long ones are dropped)."""
    examples, kept = [], []
    for index, messages in enumerate(chats):
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages, tokenize=True)
        prompt, full = _ids(prompt), _ids(full)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently with the answer")
        if len(full) > max_length:
            continue
        answer_ids = full[len(prompt) :]
        labels = [IGNORE] * len(prompt) + answer_ids
        weights = None
        if scaffold_weight != 1.0:
            answer = answer_weights(tokenizer, answer_ids, messages[-1]["content"], scaffold_weight)
            weights = [0.0] * len(prompt) + answer
        examples.append(TrainExample(full, labels, weights))
        kept.append(index)
    return examples, kept


def _ids(value: Any) -> list[int]:
    if isinstance(value, dict) or hasattr(value, "input_ids"):
        value = value["input_ids"]
    return [int(v) for v in value]


# Fewer updates than this rarely teach a small student the labels, only the output format.
MIN_STEPS = 100


def optimizer_steps(examples: int, lora: LoraSpec) -> int:
    """`lora.epochs` passes over the examples, never fewer than `lora.min_steps` updates."""
    per_epoch = math.ceil(examples / lora.batch_size)
    return max(1, lora.min_steps, math.ceil(per_epoch * lora.epochs))


def steps_warning(examples: int, lora: LoraSpec) -> str | None:
    """What to change when the recipe gives too few optimizer steps for its data."""
    steps = optimizer_steps(examples, lora)
    if steps >= MIN_STEPS:
        return None
    epochs = math.ceil(MIN_STEPS / math.ceil(examples / lora.batch_size))
    return (
        f"only {steps} optimizer steps ({examples} examples, batches of {lora.batch_size}, "
        f"{lora.epochs:g} epochs, lora.min_steps {lora.min_steps}): a small student usually "
        f"needs {MIN_STEPS}+ to learn the labels rather than the format; set lora.min_steps "
        f"to {MIN_STEPS} or lora.epochs to {epochs} (or add train rows)"
    )


@dataclass
class Probes:
    """What the model in training is asked, greedily: the calibration part at a few points
    (the checkpoint is the best there) and a sample of train rows at the end."""

    calibration: Probe | None
    train: Probe | None


def probe_steps(total_steps: int, count: int) -> list[int]:
    """`count` evenly spaced steps ending at the last one."""
    if count <= 0:
        return []
    return sorted({max(1, round(total_steps * k / count)) for k in range(1, count + 1)})


def best_point(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint with the best calibration score; the earliest among equals (fewer
    updates, less fitted to the train rows)."""
    return max(curve, key=lambda point: (point["score"], -point["step"]))


def stalled(curve: list[dict[str, Any]], patience: int) -> bool:
    """True when the last `patience` probes did not beat the best before them, or the best
    is already perfect (nothing later could replace it: ties keep the earlier step)."""
    if patience <= 0 or not curve:
        return False
    if best_point(curve)["score"] >= 1.0:
        return True
    return len(curve) > patience and best_point(curve) in curve[:-patience]


def should_balance(mode: str, counts: dict[str, Counter[str]]) -> bool:
    """`lora.balance`: "on", "off", or "auto" (a label field of the traces is imbalanced)."""
    if mode != "auto" or not counts:
        return mode == "on" and bool(counts)
    return any(imbalance(field, len(field)) for field in counts.values())


def balanced_weights(labels: list[tuple[str, ...]]) -> list[float]:
    """Sampling weights that give every label combination the same share of an epoch."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


class CheckpointKeeper:
    """The calibration curve and the LoRA weights of its best point so far."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.curve: list[dict[str, Any]] = []
        self._best_state: dict[str, Any] | None = None

    def record(self, model: Any, step: int, loss: float, result: ProbeResult) -> bool:
        """Adds a probe's result; True when training should stop."""
        self.curve.append({"step": step, "loss": loss, **result.as_dict()})
        if best_point(self.curve) is self.curve[-1]:
            self._best_state = _lora_state(model)
        return stalled(self.curve, self.patience)

    def restore_best(self, model: Any) -> None:
        if self._best_state is not None:
            model.load_state_dict(self._best_state, strict=False)

    def chosen_step(self, last_step: int) -> int:
        return int(best_point(self.curve)["step"]) if self.curve else last_step


def train_lora(
    *,
    base_dir: Path,
    dataset_path: Path,
    lora: LoraSpec,
    device: str,
    seed: int,
    n_threads: int,
    out_dir: Path,
    probes: Probes | None = None,
    sample_weights: list[float] | None = None,
    progress: Callable[[int, int, float], None] = lambda step, total, loss: None,
    on_probe: Callable[[dict[str, Any]], None] = lambda point: None,
) -> dict[str, Any]:
    """Train, keep the checkpoint best on the calibration probe, save the adapter (adapter/)
    and the summary with the loss and calibration curves (loss.json)."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(n_threads)
    device = pick_device(device)
    tokenizer, model, pad_id = _load_student(base_dir, device, lora)
    chats = [json.loads(line)["messages"] for line in dataset_path.read_text().splitlines() if line]
    chats = chats[: lora.max_examples] if lora.max_examples else chats
    examples, kept = tokenize_chats(tokenizer, chats, lora.max_length, lora.scaffold_weight)
    if not examples:
        raise SpecError(
            f"lora.max_length: every example is longer than {lora.max_length} tokens; raise "
            "`lora: {max_length: N}` in the spec"
        )
    weights = [sample_weights[i] for i in kept] if sample_weights else None
    # Room for the longest trained answer: a checkpoint that does not stop costs no more.
    answer_budget = max(sum(label != IGNORE for label in e.labels) for e in examples) + 8

    def ask(probe: Probe) -> ProbeResult:
        return probe.answer(
            lambda prompts, starts, stops, choices: greedy_answers(
                model, tokenizer, prompts, answer_budget, device, starts, stops, choices
            )
        )

    keeper = CheckpointKeeper(lora.patience)
    calibration = probes.calibration if probes else None

    def checkpoint(step: int, loss: float) -> bool:
        """The calibration probe at this step; True when training should stop."""
        assert calibration is not None
        stop = keeper.record(model, step, loss, ask(calibration))
        on_probe(keeper.curve[-1])
        return stop

    total_steps = optimizer_steps(len(examples), lora)
    started = time.perf_counter()
    losses, tokens_seen = _train(
        model, examples, weights, lora, pad_id, device, total_steps, progress,
        probe_steps(total_steps, lora.checkpoints if calibration else 0), checkpoint,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    keeper.restore_best(model)
    model.save_pretrained(str(out_dir / "adapter"))
    train_result = ask(probes.train) if probes and probes.train else None
    summary = {
        "device": device,
        "examples": len(examples),
        "dropped_too_long": len(chats) - len(examples),
        "steps": len(losses),
        "planned_steps": total_steps,
        "epochs": round(len(losses) * lora.batch_size / len(examples), 2),
        "balanced": weights is not None,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens_seen / seconds, 1) if seconds else None,
        "loss": losses,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "calibration_curve": keeper.curve,
        "probe_max_new_tokens": answer_budget,
        "chosen_step": keeper.chosen_step(len(losses)),
        "train_probe": train_result.as_dict() if train_result else None,
    }
    (out_dir / "loss.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train(
    model: Any, examples: list[TrainExample], weights: list[float] | None, lora: LoraSpec,
    pad_id: int, device: str, total_steps: int, progress: Callable[[int, int, float], None],
    checkpoints: list[int], checkpoint: Callable[[int, float], bool],
) -> tuple[list[float], int]:  # fmt: skip
    """The optimizer loop: each step's loss, and the tokens seen. At each of `checkpoints`
    the model is probed (`checkpoint`), which may end training early."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lora.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, total_steps // 10), total_steps)
    losses: list[float] = []
    tokens_seen = 0
    batches: list[list[TrainExample]] = []
    for step in range(1, total_steps + 1):
        if not batches:
            batches = _length_grouped_batches(_epoch(examples, weights), lora.batch_size)
        loss, tokens = shared_prefix_loss(model, batches.pop(), pad_id, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        tokens_seen += tokens
        progress(step, total_steps, losses[-1])
        if step in checkpoints and checkpoint(step, losses[-1]):
            break
    return losses, tokens_seen


def _load_student(base_dir: Path, device: str, lora: LoraSpec) -> tuple[Any, Any, int]:
    """The tokenizer, the dense student with fresh LoRA layers (training mode), the pad id."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)  # type: ignore[arg-type]
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    pad_id = tokenizer.pad_token_id
    return tokenizer, model, int(pad_id if pad_id is not None else tokenizer.eos_token_id)


def _lora_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _epoch(examples: list[TrainExample], weights: list[float] | None) -> list[TrainExample]:
    """One epoch's examples: all of them, or as many drawn by weight (balanced labels)."""
    if weights is None:
        return examples
    return random.choices(examples, weights=weights, k=len(examples))


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """End-of-turn tokens: the tokenizer's, the generation config's, and the special token the
    chat template closes an assistant turn with (Gemma's <end_of_turn> is not its eos)."""
    stops = {tokenizer.eos_token_id, *turn_end_ids(tokenizer)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(configured) if isinstance(configured, list) else {configured}
    return {int(token) for token in stops if token is not None}


def turn_end_ids(tokenizer: Any) -> set[int]:
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    prompt = _ids(tokenizer.apply_chat_template(turn[:1], tokenize=True,
                                                add_generation_prompt=True))  # fmt: skip
    after = _ids(tokenizer.apply_chat_template(turn, tokenize=True))[len(prompt) :]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return {next((t for t in after if t in special), tokenizer.eos_token_id)}


def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int,
    device: str, starts: list[str] | None = None, stops: tuple[str, ...] = (),
    choices: tuple[str, ...] = (), batch_size: int = 16,
) -> list[str]:  # fmt: skip
    """Greedy continuations of chat prompts, each answer begun with its `starts` text and cut
    before the first of `stops`: their common prefix (the program's fixed prompt) evaluated
    once, the rest in batches. Given `choices`, each answer is one of them, then a newline:
    at each step only a token that continues some choice may be chosen."""
    import torch
    from transformers import DynamicCache

    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    starts = starts or [""] * len(prompts)
    # The answer's start is tokenized with the prompt, as training tokenized prompt and answer.
    rows = [tokenizer.encode(tokenizer.apply_chat_template(p, tokenize=False,
                                                           add_generation_prompt=True) + start,
                             add_special_tokens=False)
            for p, start in zip(prompts, starts, strict=True)]  # fmt: skip
    prefix_len = min(common_prefix_length(rows), min(len(row) for row in rows) - 1)
    end_ids = stop_token_ids(tokenizer, core)
    allowed = choice_steps(tokenizer, starts, choices) if choices else None
    was_training = model.training
    model.eval()
    answers: list[str] = []
    with torch.no_grad():
        prefix = DynamicCache(config=core.config)
        if prefix_len:
            core.model(input_ids=torch.tensor([rows[0][:prefix_len]], device=device),
                       use_cache=True, **cache_argument(core.model, prefix))  # fmt: skip

        def said_enough(tokens: list[int]) -> bool:
            return any(stop in tokenizer.decode(tokens, skip_special_tokens=True)
                       for stop in stops)  # fmt: skip

        for first in range(0, len(rows), batch_size):
            tails = [row[prefix_len:] for row in rows[first : first + batch_size]]
            batch_allowed = None if allowed is None else allowed[first : first + batch_size]
            tokens = _greedy_batch(core, prefix, prefix_len, tails, max_new_tokens, end_ids,
                                   said_enough if stops else None, device,
                                   batch_allowed)  # fmt: skip
            answers += [_cut(tokenizer.decode(t, skip_special_tokens=True), stops)
                        for t in tokens]  # fmt: skip
    model.train(was_training)
    return answers


# A row's allowed next tokens given what it wrote so far (None: any token).
Allowed = Callable[[list[int]], list[int] | None]


@dataclass(frozen=True)
class _TextTokenizer:
    """A transformers tokenizer as the runtime's plan tokenizes text: no special tokens."""

    tokenizer: Any

    def tokenize_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def choice_steps(tokenizer: Any, starts: list[str], choices: tuple[str, ...]) -> list[Allowed]:
    """For each row, the tokens that continue one of `choices` (each followed by a newline)
    after what it has written; the choices tokenized as they follow the row's last line (its
    field header), as the runtime tokenizes them after the header (its `tokens_after`)."""
    from services.runtime.structured import tokens_after

    text_tokenizer = _TextTokenizer(tokenizer)

    def steps(sequences: tuple[tuple[int, ...], ...]) -> Allowed:
        def allowed(written: list[int]) -> list[int] | None:
            n = len(written)
            found = {s[n] for s in sequences if len(s) > n and list(s[:n]) == written}
            return sorted(found) or None  # a whole choice written: the newline ends it

        return allowed

    lines = [start.rstrip("\n").rsplit("\n", 1)[-1] + "\n" for start in starts]
    by_line = {line: steps(tuple(tokens_after(text_tokenizer, line, f"{c}\n") for c in choices))
               for line in dict.fromkeys(lines)}  # fmt: skip
    return [by_line[line] for line in lines]


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop text in it."""
    ends = [text.find(stop) for stop in stops if stop in text]
    return text[: min(ends)] if ends else text


def _greedy_batch(
    core: Any, prefix: Any, prefix_len: int, tails: list[list[int]], max_new_tokens: int,
    stops: set[int], said_enough: Callable[[list[int]], bool] | None, device: str,
    allowed: list[Allowed] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy decoding of left-padded tails after a shared, already evaluated prefix; a row
    with `allowed` steps chooses among the tokens they give."""
    import copy

    import torch

    rows, width = len(tails), max(len(t) for t in tails)
    ids = torch.zeros((rows, width), dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for row, tail in enumerate(tails):
        ids[row, width - len(tail) :] = torch.tensor(tail)
        mask[row, width - len(tail) :] = 1
    cache = copy.deepcopy(prefix)
    if prefix_len:
        cache.batch_repeat_interleave(rows)
    ones = torch.ones((rows, prefix_len + max_new_tokens), dtype=mask.dtype, device=device)
    attention = torch.cat([ones[:, :prefix_len], mask], 1)
    positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    out: list[list[int]] = [[] for _ in tails]
    done = [False] * rows
    kv = cache_argument(core.model, cache)  # the one cache, filled in place step by step
    for _ in range(max_new_tokens):
        hidden = core.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                            use_cache=True, **kv).last_hidden_state  # fmt: skip
        logits = core.lm_head(hidden[:, -1])
        if allowed is not None:
            rows_done = zip(allowed, out, done, strict=True)
            _keep_only(logits, [None if d else steps(o) for steps, o, d in rows_done])
        chosen = logits.argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            done[row] = done[row] or token in stops
            if not done[row]:
                out[row].append(token)
                done[row] = said_enough is not None and said_enough(out[row])
        if all(done):
            break
        ids = chosen.unsqueeze(1)
        attention = torch.cat([attention, ones[:, :1]], 1)
        positions = positions[:, -1:] + 1
    return out


def _keep_only(logits: Any, tokens: list[list[int] | None]) -> None:
    """Each row's logits masked to its allowed tokens, in place (None: the row is free)."""
    for row, keep in enumerate(tokens):
        if keep is not None:
            masked = logits[row].new_full(logits[row].shape, float("-inf"))
            masked[keep] = logits[row, keep]
            logits[row] = masked


def shared_prefix_loss(
    model: Any, batch: list[TrainExample], pad_id: int, device: str
) -> tuple[Any, int]:
    """Mean loss over the labelled tokens, with the batch's common prompt prefix run once.

    Every example of a DSPy program starts with the same long prompt (instructions, field
    structure, demos). The prefix is evaluated once at batch size 1, its keys and values are
    repeated across the batch (differentiably: gradients reach the LoRA weights through it),
    and only each example's own tail is run per row. Same loss as a plain batched forward,
    at a fraction of the compute. Logits are computed only where there are labels: the LM
    head over a 49k vocabulary at every prompt position is a fifth of the forward pass.
    """
    import torch
    import torch.nn.functional as functional

    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Keep at least one token in each tail, and no labelled token in the prefix.
    first_label = min(next(i for i, v in enumerate(e.labels) if v != IGNORE) for e in batch)
    prefix_len = min(common_prefix_length([e.input_ids for e in batch]), first_label - 1)
    tails = [
        TrainExample(e.input_ids[prefix_len:], e.labels[prefix_len:],
                     e.weights[prefix_len:] if e.weights else None)
        for e in batch
    ]  # fmt: skip
    ids, labels, tail_attention, token_weights = _collate(tails, pad_id, device)
    rows, width = ids.shape
    past = None
    if prefix_len > 0:
        from transformers import DynamicCache

        prefix = torch.tensor([batch[0].input_ids[:prefix_len]], device=device)
        past = DynamicCache(config=core.config)
        core.model(input_ids=prefix, use_cache=True, **cache_argument(core.model, past))
        past.batch_repeat_interleave(rows)
    attention = torch.cat(
        [torch.ones((rows, prefix_len), dtype=tail_attention.dtype, device=device), tail_attention],
        dim=1,
    )
    positions = torch.arange(prefix_len, prefix_len + width, device=device).expand(rows, width)
    hidden = core.model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=past is not None,
        **cache_argument(core.model, past),
    ).last_hidden_state
    # Position t predicts token t+1; every label sits in the tail, after the first tail token.
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = core.lm_head(hidden[:, :-1][mask]).float()
    losses = functional.cross_entropy(logits, targets[mask], reduction="none")
    weights = token_weights[:, 1:][mask]
    loss = (losses * weights).sum() / weights.sum()
    return loss, prefix_len + int(tail_attention.sum().item())


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """The KV cache as the keyword `model.forward` takes: transformers renamed
    `past_key_values` to `cache` (5.17 knows only the old name, 5.25 the new one). A name the
    forward does not know is swallowed by its **kwargs and the cache silently ignored."""
    # signature() follows the deprecation wrapper to the real parameters
    parameters = inspect.signature(model.forward).parameters
    return {("cache" if "cache" in parameters else "past_key_values"): cache}


def _length_grouped_batches(examples: list[TrainExample], size: int) -> list[list[TrainExample]]:
    """Shuffled batches of similar lengths: less padding, the same examples each epoch."""
    order = sorted(
        range(len(examples)), key=lambda i: (len(examples[i].input_ids), random.random())
    )
    batches = [[examples[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
    random.shuffle(batches)
    return batches


def _collate(batch: list[TrainExample], pad_id: int, device: str) -> tuple[Any, Any, Any, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
        weights[row, :n] = torch.tensor(example.weights) if example.weights else 1.0
    return ids.to(device), labels.to(device), attention.to(device), weights.to(device)


def merge_adapter(base_dir: Path, adapter_dir: Path) -> Any:
    """The base model with the LoRA update merged in (float32, CPU), ready to export."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.eval()
    return merged

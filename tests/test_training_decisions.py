"""The fine-tune's decisions as pure functions: the schedule, when to probe, which checkpoint
is kept, when training stops, and the balanced sampling weights."""

from __future__ import annotations

from collections import Counter

from services.builder.finetune import (
    MIN_STEPS,
    balanced_weights,
    best_point,
    optimizer_steps,
    probe_steps,
    should_balance,
    stalled,
    steps_warning,
)
from services.builder.spec import LoraSpec


def curve(*scores: float) -> list[dict[str, float]]:
    return [{"step": 10 * (i + 1), "score": s} for i, s in enumerate(scores)]


def test_the_schedule_is_epochs_with_a_floor_in_steps() -> None:
    recipe = LoraSpec()  # the default recipe
    assert optimizer_steps(120, recipe) == recipe.min_steps  # small data: the floor decides
    assert optimizer_steps(4000, recipe) == 4000 / recipe.batch_size * recipe.epochs  # large
    assert optimizer_steps(120, LoraSpec(min_steps=0, epochs=2, batch_size=8)) == 30
    assert steps_warning(120, recipe) is None
    warning = steps_warning(120, LoraSpec(min_steps=0, epochs=2, batch_size=8))
    assert warning and "only 30 optimizer steps" in warning
    assert f"lora.min_steps to {MIN_STEPS}" in warning and "lora.epochs to 7" in warning


def test_probes_are_evenly_spaced_and_end_at_the_last_step() -> None:
    assert probe_steps(150, 3) == [50, 100, 150]
    assert probe_steps(5, 8) == [1, 2, 3, 4, 5]  # fewer steps than probes: every step
    assert probe_steps(150, 0) == []


def test_the_best_calibration_score_wins_and_ties_go_to_the_earlier_step() -> None:
    assert best_point(curve(0.2, 0.7, 0.5))["step"] == 20
    assert best_point(curve(0.2, 0.7, 0.7, 0.6))["step"] == 20


def test_training_stops_after_patience_probes_without_improvement() -> None:
    assert not stalled(curve(0.2, 0.7, 0.5), patience=2)
    assert stalled(curve(0.2, 0.7, 0.5, 0.6), patience=2)
    assert stalled(curve(0.7, 0.7, 0.7), patience=2)  # equal is not better
    assert not stalled(curve(0.2, 0.3, 0.4, 0.5), patience=2)
    assert not stalled(curve(0.9, 0.1, 0.1, 0.1), patience=0)  # 0: never stop early
    assert stalled(curve(0.2, 1.0), patience=3)  # a perfect score cannot be replaced


def test_balanced_weights_give_each_label_combination_an_equal_share() -> None:
    labels = [("a", "true")] * 6 + [("b", "true")] * 3 + [("b", "false")]
    weights = balanced_weights(labels)
    share: Counter[tuple[str, ...]] = Counter()
    for label, weight in zip(labels, weights, strict=True):
        share[label] += weight
    assert len(set(round(v, 9) for v in share.values())) == 1


def test_auto_balance_only_when_a_label_field_is_imbalanced() -> None:
    even = {"department": Counter(sales=30, support=30, hr=30), "urgent": Counter(yes=45, no=45)}
    skewed = {**even, "urgent": Counter(yes=85, no=5)}
    assert not should_balance("auto", even) and should_balance("auto", skewed)
    assert should_balance("on", even) and not should_balance("off", skewed)
    assert not should_balance("on", {})  # no label fields (free text): nothing to balance


def test_a_probe_whose_answers_did_not_parse_says_how_many_did() -> None:
    from services.builder.report import training_lines
    from services.builder.stages.distill import probe_line

    unparsed = {"score": 0.0, "n": 32, "fields": {"verdict": 0.0}, "parsed": 0.25}
    assert probe_line(unparsed).startswith("0.0% of 32 (verdict 0%); 25% parsed, numbers and JSON")
    assert "type constraints serving applies" in probe_line(unparsed)
    assert probe_line({**unparsed, "parsed": 1.0}) == "0.0% of 32 (verdict 0%)"
    training = {"steps": 10, "planned_steps": 10, "epochs": 1, "examples": 40,
                "chosen_step": 10, "train_probe": unparsed}  # fmt: skip
    assert "25% parsed" in training_lines(training)[-1]


def test_probe_answers_are_written_as_served_headers_given_values_sampled() -> None:
    """The probe writes each field's header and the completed marker; the model in training
    writes only the values, a typed one up to its line's end, free text up to a header."""
    from services.builder.probe import served_answers
    from services.core.program import ProgramSpec, PromptCodec

    codec = PromptCodec(ProgramSpec.model_validate({
        "name": "triage", "instructions": "Triage the ticket.",
        "inputs": [{"name": "ticket", "type": "str"}],
        "outputs": [{"name": "queue", "type": "Literal['network', 'billing']"},
                    {"name": "tags", "type": "list[str]"}, {"name": "note", "type": "str"}],
    }))  # fmt: skip
    asked: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    # What a model that learned the values but not the headers writes after each header.
    writes = {"queue": "network\n\n[[ ## tags", "tags": '["vpn"]\nnonsense',
              "note": "Line one.\n\nLine two.\n\n[[ ## completed ## ]]"}  # fmt: skip

    def ask(prompts: list, starts: list[str], stops: tuple[str, ...], choices: tuple[str, ...]
            ) -> list[str]:  # fmt: skip
        field = starts[0].rsplit("[[ ## ", 1)[1].split(" ## ]]")[0]
        asked.append((field, stops, choices))
        text = writes[field]
        ends = [text.find(stop) for stop in stops if stop in text]
        return [text[: min(ends)] if ends else text for _ in prompts]

    prompts = [codec.format_messages({"ticket": "VPN down"})] * 2
    answers = served_answers(ask, codec, prompts)
    # a choice is asked with its values (the model writes one of them), the rest free
    assert asked == [("queue", ("\n",), ("network", "billing")), ("tags", ("\n",), ()),
                     ("note", ("\n\n[[", "\n[[ ##"), ())]  # fmt: skip
    parsed = codec.parse(answers[0])
    assert parsed is not None and parsed.values == {
        "queue": "network", "tags": ["vpn"], "note": "Line one.\n\nLine two."
    }  # fmt: skip
    assert answers[0].endswith("[[ ## completed ## ]]") and answers[0] == answers[1]


def test_traces_reach_the_metric_with_labels_typed_as_data_rows_are() -> None:
    """A harvested answer holds the API's outputs as text (`"False"`), a trace as JSON; an
    author's metric reading `bool(example.urgent)` must see False, as on a data row (the train
    probe, the retrain loop's wrong rows, the harvest's before and after)."""
    from services.builder.context import trace_examples

    traces = [{"inputs": {"subject": "vpn"},
               "outputs": {"urgent": "False", "keywords": '["vpn"]', "team": "it"}},
              {"inputs": {"subject": "fire"},
               "outputs": {"urgent": True, "keywords": ["fire"], "team": "it"}}]  # fmt: skip
    types = {"urgent": bool, "keywords": list[str], "team": str}
    first, second = trace_examples(traces, types)
    assert first.urgent is False and first.keywords == ["vpn"] and first.team == "it"
    assert second.urgent is True and second.keywords == ["fire"]
    assert first.inputs().toDict() == {"subject": "vpn"} and "urgent" in first.labels()

"""A served program as a DSPy module (services/core/served_program.py), against a real runtime
on loopback serving the real SmolLM2 GGUF."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Literal

import dspy
import pytest

from services.core.client import InferenceClient
from services.core.served_program import ServedProgram
from testkit.bundles import make_bundle
from testkit.processes import ServerProcess, start_runtime
from tests.test_typed_decoding import CATEGORIES, ONLY_TYPED, TICKETS


class Category(Enum):
    billing = "billing"
    technical = "technical"
    account = "account"
    shipping = "shipping"


class Triage(dspy.Signature):
    """The author's signature, with an Enum where the bundle's program has its values."""

    ticket: str = dspy.InputField()
    category: Category = dspy.OutputField()
    urgent: bool = dspy.OutputField()
    priority: int = dspy.OutputField()
    tags: list[str] = dspy.OutputField()


@pytest.fixture(scope="module")
def typed_runtime(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("served") / "bundle"
    bundle = make_bundle(root, gguf_path, {**ONLY_TYPED, "prompt_format": "prefix-first"})
    server: ServerProcess = start_runtime("--bundle", str(bundle), "--n-ctx", "2048")
    yield server.target
    server.terminate()


def test_a_served_program_answers_as_a_dspy_module_with_typed_outputs(typed_runtime: str) -> None:
    served = ServedProgram(typed_runtime)
    found = served(ticket=TICKETS[0])
    assert isinstance(found, dspy.Prediction)
    assert list(found.keys()) == ["category", "urgent", "priority", "tags"]
    assert found.category in CATEGORIES and isinstance(found.urgent, bool)
    assert isinstance(found.priority, int) and isinstance(found.tags, list)
    with InferenceClient(typed_runtime) as client:  # the runtime's own answer, value for value
        assert found.toDict() == json.loads(client.predict({"ticket": TICKETS[0]}).outputs_json)
    # with the author's signature, each output is typed as DSPy types it
    typed = ServedProgram(typed_runtime, types=Triage)(ticket=TICKETS[0])
    assert typed.category is Category(found.category) and typed.tags == found.tags

    class Wrong(Triage):
        priority: Literal["low", "high"] = dspy.OutputField()

    with pytest.raises(ValueError, match="priority: the served value"):
        ServedProgram(typed_runtime, types=Wrong)(ticket=TICKETS[0])


def test_dspy_evaluate_runs_the_authors_metric_over_a_served_program(typed_runtime: str) -> None:
    served = ServedProgram(typed_runtime)
    devset = [dspy.Example(ticket=t, category="billing").with_inputs("ticket") for t in TICKETS[:4]]

    def metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
        return bool(prediction.category == example.category)

    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=2, max_errors=0)
    result = evaluate(served.deepcopy())  # an optimizer's copy opens its own channel
    answers = [served(ticket=t).category for t in TICKETS[:4]]  # greedy: the same answers
    assert [p.category for _, p, _ in result.results] == answers
    assert result.score == pytest.approx(100 * answers.count("billing") / 4)


def test_bad_input_is_a_value_error_naming_the_field(typed_runtime: str) -> None:
    served = ServedProgram(typed_runtime)
    with pytest.raises(ValueError, match="tickets"):
        served(ticket="VPN down", tickets="an unknown field")
    with pytest.raises(ValueError, match="ticket"):
        served()
    with pytest.raises(ValueError, match=r"inputs\['ticket'\]: null is not a str"):
        served(ticket=None)  # refused, not sent as the text "None" or "null"

"""DSPy's own API gets a GGUF-backed student: BootstrapFinetune with our Provider and engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.builder.spec import LoraSpec
from services.core.program import ProgramSpec
from testkit.bundles import CAPITALS_PROGRAM

pytestmark = pytest.mark.timeout(1800)

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
            "Egypt": "Cairo", "Peru": "Lima"}  # fmt: skip


def test_bootstrap_finetune_returns_a_gguf_backed_student(tmp_path: Path, gguf_path: Path) -> None:
    import dspy

    from services.builder.dspy_integration import GGUFProvider, LlamaCppEngine

    signature = ProgramSpec.model_validate({**CAPITALS_PROGRAM, "demos": []}).to_signature()
    engine = LlamaCppEngine(n_ctx=2048, n_threads=2)
    base_model = f"llamacpp/{gguf_path}"
    teacher = dspy.Predict(signature)
    teacher.demos = [dspy.Example(**d) for d in CAPITALS_PROGRAM["demos"]]  # type: ignore[arg-type]
    teacher.set_lm(dspy.LM(base_model, engine=engine, cache=False))
    student = dspy.Predict(signature)
    provider = GGUFProvider(
        work_dir=tmp_path,
        lora=LoraSpec(epochs=1, batch_size=2, min_steps=0, scaffold_weight=1.0),
        n_threads=2,
    )
    student.set_lm(dspy.LM(base_model, engine=engine, provider=provider, cache=False))
    trainset = [
        dspy.Example(country=c, capital=k).with_inputs("country") for c, k in CAPITALS.items()
    ]

    compiled = dspy.BootstrapFinetune(metric=None).compile(
        student, teacher=teacher, trainset=trainset
    )

    lm = compiled.predictors()[0].lm
    assert lm.model.startswith("llamacpp/") and lm.model.endswith("student.Q8_0.gguf")
    assert Path(lm.model.removeprefix("llamacpp/")).is_file()
    prediction = compiled(country="Chile")  # answered by the fine-tuned GGUF through the engine
    assert isinstance(prediction.capital, str)
    engine.close()


def test_engine_answers_through_dspy(gguf_path: Path) -> None:
    import dspy

    from services.builder.dspy_integration import LlamaCppEngine

    engine = LlamaCppEngine(n_ctx=2048, n_threads=2)
    lm = dspy.LM(
        f"llamacpp/{gguf_path}", engine=engine, cache=False, temperature=0.0, max_tokens=16
    )
    out = lm("Say hello.")
    assert isinstance(out[0], str) and out[0].strip()
    with pytest.raises(Exception):  # noqa: B017 - a missing file fails at the boundary, loudly
        dspy.LM("llamacpp//nonexistent.gguf", engine=engine, cache=False)("hi")
    engine.close()

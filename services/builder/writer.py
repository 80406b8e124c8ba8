"""Teacher-written inputs, a source of new traces for the retrain loop.

The API teacher's LM writes new inputs like the train rows the student got wrong (a DSPy
signature whose outputs are the program's own input fields); an input equal, case and spacing
aside, to a row of any split or to another written one is dropped. The teacher program answers
each twice, at its own temperature and at SECOND_SAMPLE_TEMPERATURE, and the answer is kept
only when the two agree by the build's metric: no label exists for a new input, so the
teacher's agreement with itself stands in for one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.builder.data import input_key
from services.core.pipeline import call_program
from services.core.program import FieldSpec

# The second answer is sampled: an answer that changes under sampling is not one to teach.
SECOND_SAMPLE_TEMPERATURE = 1.0
# Written inputs asked for per trace wanted: duplicates and disagreements are dropped.
OVERSAMPLE = 2
# Seeds shown to the writer per input it writes.
SEEDS_SHOWN = 3

WRITER_INSTRUCTIONS = (
    "Write one new input for the program described below. It must read like the example "
    "inputs (the same kind of content, length and style) but be about a different situation, "
    "in different words: never copy or paraphrase an example. Each variation number gets a "
    "different input."
)
WRITER_FIELDS = ("program_task", "example_inputs", "variation_number")


def task_description(
    instructions: str, inputs: Sequence[FieldSpec], outputs: Sequence[FieldSpec]
) -> str:
    """What the program does, as the writer is told: its instructions and fields."""

    def fields(specs: Sequence[FieldSpec]) -> str:
        return "; ".join(f"{f.name} ({f.type})" + (f": {f.description}" if f.description else "")
                         for f in specs)  # fmt: skip

    return f"{instructions}\nInputs: {fields(inputs)}\nOutputs: {fields(outputs)}"


def writer_signature(inputs: Sequence[FieldSpec]) -> Any:
    """The writer's DSPy signature: its outputs are the program's input fields."""
    import dspy

    clash = set(WRITER_FIELDS) & {f.name for f in inputs}
    if clash:
        raise ValueError(f"loop.sources: teacher: the program has an input named "
                         f"{', '.join(sorted(clash))}, a name the writer uses itself")  # fmt: skip
    own = {
        "program_task": (str, dspy.InputField(desc="what the program reading the input does")),
        "example_inputs": (str, dspy.InputField(desc="inputs it was given, one JSON per line")),
        "variation_number": (int, dspy.InputField(desc="write a different input for each")),
    }
    written = {f.name: (str, dspy.OutputField(desc=f.description or f"the new {f.name}"))
               for f in inputs}  # fmt: skip
    return dspy.make_signature({**own, **written}, WRITER_INSTRUCTIONS)


def write_candidates(
    lm: Any, signature: Any, task: str, seeds: Sequence[dict[str, Any]], count: int,
    first_variation: int, num_threads: int,
) -> list[dict[str, str] | None]:  # fmt: skip
    """`count` inputs written by `lm`, each shown a rotating window of the seeds (None where
    the LM failed or its answer did not parse)."""
    import dspy

    writer = dspy.Predict(signature)
    writer.set_lm(lm)
    names = list(signature.output_fields)

    def one(i: int) -> dict[str, str] | None:
        shown = [seeds[(i + j) % len(seeds)] for j in range(min(SEEDS_SHOWN, len(seeds)))]
        try:
            written = writer(
                program_task=task, variation_number=first_variation + i,
                example_inputs="\n".join(json.dumps(s, ensure_ascii=False) for s in shown),
            )  # fmt: skip
        except Exception:  # one failed write is counted, never fatal
            return None
        return {name: str(written.get(name) or "").strip() for name in names}

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return list(pool.map(one, range(count)))


def new_inputs(
    candidates: Sequence[dict[str, str] | None], *, held_out: set[str], taken: set[str]
) -> tuple[list[dict[str, str]], Counter[str]]:
    """The written inputs worth answering, and why the others were dropped. `held_out`: the
    calibration and test parts' input keys; `taken`: every train row's and earlier written
    input's (never enters training twice, never a held-out input)."""
    kept: list[dict[str, str]] = []
    seen = set(taken)
    counts: Counter[str] = Counter(asked=len(candidates))
    for candidate in candidates:
        if candidate is None:
            counts["failed"] += 1
            continue
        if not all(candidate.values()):
            counts["empty"] += 1
            continue
        key = input_key(candidate)
        if key in held_out:
            counts["held_out_input"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(candidate)
    return kept, counts


def second_answers(
    program: Any, lm: Any, rows: Sequence[dict[str, str]], output_names: list[str],
    num_threads: int,
) -> list[dict[str, Any] | None]:  # fmt: skip
    """The teacher program's answers at the second sample's temperature."""
    teacher_program = program.deepcopy()
    teacher_program.set_lm(lm)

    def one(row: dict[str, str]) -> dict[str, Any] | None:
        try:
            prediction = call_program(teacher_program, row)
        except Exception:
            return None
        return {name: prediction.get(name) for name in output_names}

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return list(pool.map(one, rows))

"""Traces from the edge: the API answers routers recorded (`edgedistill harvest export`),
taken as teacher traces by `edgedistill build SPEC --add-traces harvest.tar`.

A record is kept when the API answered, its inputs are the program's, it is not an input of
the held-out data (calibration or test part: compared by a hash of the normalised inputs), it
repeats no trace already taken, and, where the train data labels the same inputs, the API's
answer passes the metric against that label.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from services.builder.data import input_key
from services.builder.metrics import Metric, score
from services.core.harvest import HarvestRecord


def harvested_traces(
    records: list[HarvestRecord],
    *,
    input_names: list[str],
    output_names: list[str],
    held_out: set[str],
    taken: set[str],
    labelled: dict[str, Any],
    metric: Metric,
    threshold: float,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The kept traces (with the local answer the edge gave, for the report) and why the
    others were dropped. `held_out`, `taken`: input keys; `labelled`: train examples by key."""
    kept: list[dict[str, Any]] = []
    counts: Counter[str] = Counter(records=len(records))
    seen = set(taken)
    for record in records:
        if sorted(record.inputs) != sorted(input_names):
            raise ValueError(
                f"a harvested record of {record.bundle} has inputs {sorted(record.inputs)}; "
                f"this program's are {sorted(input_names)}: the harvest is from another program"
            )
        key = input_key(record.inputs)
        why = drop_reason(record, key, held_out, seen, labelled, metric, threshold)
        if why:
            counts[why] += 1
            continue
        seen.add(key)
        outputs = {name: (record.api_outputs or {}).get(name) for name in output_names}
        kept.append({"inputs": record.inputs, "outputs": outputs, "source": "harvest",
                     "local_outputs": record.local_outputs})  # fmt: skip
    counts["kept"] = len(kept)
    return kept, dict(counts)


def drop_reason(
    record: HarvestRecord,
    key: str,
    held_out: set[str],
    seen: set[str],
    labelled: dict[str, Any],
    metric: Metric,
    threshold: float,
) -> str | None:
    if record.api_outputs is None:
        return "no_api_answer"
    if key in held_out:
        return "held_out_input"
    if key in labelled and score(metric, labelled[key], record.api_outputs) < threshold:
        return "rejected_by_metric"
    if key in seen:
        return "duplicate"
    return None

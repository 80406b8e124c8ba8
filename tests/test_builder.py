"""The build pipeline with real parts: a real (short) LoRA fine-tune of SmolLM2, the GGUF
export and its self-check, llama.cpp quantization, evaluation, a bundle that serves, and an
API teacher on a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.api import pb
from services.core.bundle import Bundle
from services.core.client import InferenceClient
from testkit.processes import REPO, smollm2_gguf, start_runtime
from testkit.scratch import scratch

TICKETS = REPO / "examples" / "ticket_triage"
# Real fine-tunes on 2 CPU cores: minutes, not seconds.
pytestmark = pytest.mark.timeout(1800)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows(name: str) -> list[dict[str, str]]:
    return read_jsonl(TICKETS / f"{name}.jsonl")


def balanced(name: str, per_category: int) -> list[dict[str, str]]:
    picked: dict[str, list[dict[str, str]]] = {}
    for row in rows(name):
        picked.setdefault(row["category"], [])
        if len(picked[row["category"]]) < per_category:
            picked[row["category"]].append(row)
    return [row for group in zip(*picked.values(), strict=False) for row in group]


def write_jsonl(path: Path, data: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def run_build(
    spec: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "build", str(spec), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
        env={**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, **(env or {})},
    )  # fmt: skip


TINY_SPEC = """
name: tiny-triage
version: "0.0.1-test"
program: examples.ticket_triage.program:build
data: {{train: train.jsonl, dev: dev.jsonl}}
metric: exact_match
lora: {{epochs: 2, batch_size: 4, min_steps: 0, checkpoints: 3, patience: 0}}
quantizations: [Q8_0]
quality_gate: {{min_retention: {gate}}}
baselines: {{few_shot_k: 6}}
n_threads: 2
eval_max_tokens: 24
output: {output}
"""


def lean(spec_text: str) -> str:
    """The tiny recipe without what a test does not look at: a second epoch, mid-training
    checkpoints and the few-shot baseline (minutes on 2 cores)."""
    for full, short in (("epochs: 2", "epochs: 1"), ("checkpoints: 3", "checkpoints: 0"),
                        ("few_shot_k: 6", "few_shot_k: 0")):  # fmt: skip
        assert full in spec_text, f"the tiny recipe no longer says {full}"
        spec_text = spec_text.replace(full, short)
    return spec_text


@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, Path, subprocess.CompletedProcess[str]]]:
    with scratch(tmp_path_factory, "tiny") as root:
        write_jsonl(root / "train.jsonl", balanced("train", 4))
        write_jsonl(root / "dev.jsonl", balanced("dev", 2))
        spec = root / "spec.yaml"
        spec.write_text(TINY_SPEC.format(gate=0.0, output=root / "build"))
        proc = run_build(spec)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        yield spec, root / "build", proc


def test_build_runs_every_stage_and_writes_a_verifiable_bundle(
    tiny: tuple[Path, Path, object],
) -> None:
    _, build, _ = tiny
    counts = json.loads((build / "traces" / "counts.json").read_text())
    assert counts == {"total": 24, "kept": 24, "rejected": 0, "failed": 0}  # gold teacher
    dataset = (build / "dataset" / "dataset.jsonl").read_text().splitlines()
    first = json.loads(dataset[0])["messages"]
    assert len(dataset) == 24 and [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[2]["content"].rstrip().endswith("[[ ## completed ## ]]")

    loss = json.loads((build / "finetune" / "loss.json").read_text())
    assert loss["steps"] == 12 and len(loss["loss"]) == 12
    assert all(0 < value < 20 for value in loss["loss"])
    assert (build / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
    assert [p["step"] for p in loss["calibration_curve"]] == [4, 8, 12]
    assert set(loss["train_probe"]["fields"]) == {"category"} and loss["train_probe"]["n"] == 24

    # The F16 file is the model: greedy tokens agree (else the stage fails) and every block's
    # output and the logits stay within F16's rounding; the quantized file within Q8_0's.
    checks = json.loads((build / "export" / "self_check.json").read_text())
    assert len(checks) == 3 and all(c["greedy_tokens"] > 0 for c in checks)
    assert all(c["max_hidden_difference"] < 0.01 for c in checks)
    assert all(c["max_logit_difference"] < 0.1 * c["logit_std"] for c in checks)
    quantized = json.loads((build / "quantize" / "self_check.json").read_text())
    assert [c["quant"] for c in quantized] == ["Q8_0"] * 3

    from services.core.gguf_metadata import quantization_name, read_gguf_metadata

    q8 = build / "quantize" / "tiny-triage.Q8_0.gguf"
    meta = read_gguf_metadata(q8)
    assert quantization_name(meta) == "Q8_0"
    assert (
        meta["tokenizer.chat_template"]
        == read_gguf_metadata(smollm2_gguf())["tokenizer.chat_template"]
    )

    evaluation = json.loads((build / "evaluate" / "eval.json").read_text())
    split = evaluation["split"]
    assert split["calibration"] + split["test"] == 12 and split["test"] >= 4
    assert evaluation["teacher"]["score"] == 1.0 and evaluation["max_tokens"] == 24
    labels = [s["label"] for s in evaluation["students"]]
    assert labels == [
        "untuned student (Q4_1), zero-shot",
        "untuned student (Q4_1), 6-shot",
        "distilled Q8_0",
    ]
    for student in evaluation["students"]:
        test_part = [e for e in student["examples"] if e["split"] == "test"]
        assert len(test_part) == split["test"] == student["n"]
        assert student["score"] == pytest.approx(
            sum(e["score"] for e in test_part) / len(test_part)
        )
        assert 0 < student["latency_p50_ms"] <= student["latency_p95_ms"] < 60_000
        assert 50 < student["peak_rss_mb"] < 4000
        assert student["size_bytes"] == Path(student["gguf"]).stat().st_size
        assert all(0.0 <= e["confidence"] <= 1.0 for e in student["examples"])
        ci = student["interval"]
        assert ci["n"] == split["test"] and ci["method"] == "wilson"
        assert ci["low"] <= student["score"] <= ci["high"] and ci["high"] - ci["low"] > 0.2
    zero_shot, few_shot, distilled = evaluation["students"]
    # Only the default quantization answers the calibration part; the baselines need not.
    assert {e["split"] for e in distilled["examples"]} == {"calibration", "test"}
    assert {e["split"] for e in few_shot["examples"]} == {"test"}
    # Typed decoding writes the program's format: every answer parses, the untuned student's
    # too (12 steps on 24 rows teach the labels little: scores are compared in measured builds).
    assert distilled["parsed_fraction"] == 1.0 and zero_shot["parsed_fraction"] == 1.0
    assert sum(loss["loss"][-3:]) < sum(loss["loss"][:3])  # the fine-tune learns something
    # Per label field on the test part, with intervals, in the report and the log.
    assert set(distilled["fields"]) == {"category"}
    assert distilled["fields"]["category"]["interval"]["n"] == split["test"]
    few_shot_path = build / "evaluate" / "program.few-shot" / "program.json"
    few_shot_program = json.loads(few_shot_path.read_text())
    assert len(few_shot_program["demos"]) == 6

    # The threshold is chosen on the calibration part; its fallback rate and system quality are
    # recomputed here on the test part from the evaluation's own answers.
    calibration = json.loads((build / "calibrate" / "calibration.json").read_text())
    teacher = evaluation["teacher"]["examples"]
    test_pairs = [(s, t) for s, t in zip(distilled["examples"], teacher, strict=True)
                  if s["split"] == "test"]  # fmt: skip
    fell_back = [
        s["outcome"] != "parsed" or s["confidence"] < calibration["threshold"]
        for s, _ in test_pairs
    ]
    quality = [
        t["score"] if f else s["score"] for (s, t), f in zip(test_pairs, fell_back, strict=True)
    ]
    measured = calibration["test"]
    assert measured["n"] == split["test"]
    assert measured["fallback_rate"] == pytest.approx(sum(fell_back) / len(test_pairs))
    assert measured["system_quality"] == pytest.approx(sum(quality) / len(test_pairs))
    chosen = calibration["calibration"]
    assert chosen["n"] == split["calibration"]
    target = calibration["target_retention"] * chosen["teacher_quality"]
    assert chosen["system_quality"] >= target - 1e-9
    cheaper = [p for p in calibration["curve"] if p["fallback_rate"] < chosen["fallback_rate"]]
    assert all(p["system_quality"] < target - 1e-12 for p in cheaper)

    # The decision: the seed's band for the retention, and the side-by-side rows.
    decision = json.loads((build / "calibrate" / "decision.json").read_text())
    assert decision["retention"] == pytest.approx(distilled["score"])  # gold teacher scores 1
    assert decision["hybrid"]["api_share"] == measured["fallback_rate"]
    assert decision["api"]["measured"] is False and decision["api"]["cost"] is None
    report_md = (build / "bundle" / "report.md").read_text()
    for text in (
        decision["band"],
        decision["next_step"],
        "data leaves the machine",
        "runs offline",
        "cost per 1K calls",
        "the fallback's quality is the labels'",
        "## Per field",
        "category (exact match)",
        "## Training",
        "kept step",
    ):
        assert text in report_md, text
    # A log, not a terminal: every table whole, no carriage-return progress bars.
    log = proc_output(tiny)
    assert "API vs local vs hybrid" in log and "untuned student (Q4_1), zero-shot" in log
    assert "\r" not in log and "…" not in log

    bundle = Bundle.open(build / "bundle")  # verifies every sha256
    manifest = bundle.manifest
    assert (
        manifest.version == "0.0.1-test" and manifest.default_model == "model/tiny-triage.Q8_0.gguf"
    )
    assert manifest.provenance["teacher"] == "gold"
    assert set(manifest.provenance["datasets"]) == {"train", "dev"}
    assert "dspy" in manifest.provenance["libraries"]
    expected = {"Modelfile", "eval.json", "report.md", "report.html", "calibration.json",
                "decision.json",
                "signature.json", "program/program.json",
                "model/tiny-triage.Q8_0.gguf"}  # fmt: skip
    assert expected <= set(manifest.files)
    modelfile = (build / "bundle" / "Modelfile").read_text()
    assert "FROM ./model/tiny-triage.Q8_0.gguf" in modelfile
    assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "data:image/png;base64," in (build / "bundle" / "report.html").read_text()


def test_the_checkpoint_kept_is_the_best_on_the_calibration_part(
    tiny: tuple[Path, Path, object],
) -> None:
    """The adapter in the finetune folder answers the calibration part exactly as well as the
    best point of the curve recorded during training (the earliest of equals)."""
    import torch
    from peft import PeftModel
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.builder.context import BuildContext
    from services.builder.finetune import best_point, greedy_answers
    from services.builder.probe import make_probe
    from services.builder.spec import load_spec

    spec, build, _ = tiny
    loss = json.loads((build / "finetune" / "loss.json").read_text())
    best = best_point(loss["calibration_curve"])
    assert loss["chosen_step"] == best["step"]
    assert all(p["score"] <= best["score"] for p in loss["calibration_curve"])

    ctx = BuildContext.load(load_spec(spec), Console(file=io.StringIO()))
    probe = make_probe("calibration", ctx.codec, ctx.metric, ctx.calibset, ["category"])
    tokenizer = AutoTokenizer.from_pretrained(build / "student")
    base = AutoModelForCausalLM.from_pretrained(build / "student", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, build / "finetune" / "adapter")
    budget = loss["probe_max_new_tokens"]
    result = probe.answer(lambda prompts, starts, stops, choices: greedy_answers(
        model, tokenizer, prompts, budget, "cpu", starts, stops, choices
    ))  # fmt: skip
    assert result.score == pytest.approx(best["score"])


def proc_output(tiny: tuple[Path, Path, Any]) -> str:
    return str(tiny[2].stdout) + str(tiny[2].stderr)


def test_rerun_skips_finished_stages(tiny: tuple[Path, Path, object]) -> None:
    spec, _, _ = tiny
    started = time.monotonic()
    proc = run_build(spec)
    assert proc.returncode == 0, proc.stderr
    assert "ran: nothing" in proc.stderr
    for stage in (
        "traces",
        "dataset",
        "student",
        "finetune",
        "export",
        "quantize",
        "evaluate",
        "calibrate",
        "package",
    ):
        assert f"{stage}: inputs unchanged, skipped" in proc.stdout
    assert time.monotonic() - started < 60


def test_quality_gate_fails_with_guidance_and_keeps_artifacts(
    tiny: tuple[Path, Path, object],
) -> None:
    spec, build, _ = tiny
    strict = spec.with_name("strict.yaml")
    strict.write_text(spec.read_text().replace("min_retention: 0.0", "min_retention: 1.01"))
    proc = run_build(strict)
    assert proc.returncode == 4, proc.stderr
    assert "FAILED quality gate" in proc.stderr and "larger student" in proc.stderr
    assert "hybrid" in proc.stderr
    assert "FAILED its quality gate" in proc.stdout  # not a plain "bundle: ..." line
    assert (build / "bundle" / "manifest.json").is_file()
    # The bundle says it failed: serve and route refuse it unless told otherwise.
    for command in (["serve", "--port", "0"], ["route", "--local", "127.0.0.1:9", "--port", "0"]):
        refused = subprocess.run(
            [sys.executable, "-m", "services.cli", *command, "--bundle", str(build / "bundle")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        message = " ".join(refused.stderr.split())
        assert refused.returncode == 3, refused.stderr
        assert "failed its quality gate" in message and "--allow-failed-gate" in message
    server = start_runtime("--bundle", str(build / "bundle"), "--allow-failed-gate")
    try:
        with InferenceClient(server.target) as client:
            assert client.info().bundle_version == "0.0.1-test"
    finally:
        server.terminate()


def test_a_new_gate_threshold_repackages_with_the_new_verdict(
    tiny: tuple[Path, Path, object],
) -> None:
    """The verdict is recorded by the package stage, whose key covers quality_gate: a rerun
    with another min_retention packages again, and the bundle says what that build decided."""
    spec, build, _ = tiny
    strict = spec.with_name("strict-gate.yaml")
    strict.write_text(spec.read_text().replace("min_retention: 0.0", "min_retention: 1.02"))
    for path, passed, threshold, code in ((strict, False, 1.02, 4), (spec, True, 0.0, 0)):
        proc = run_build(path)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert "• package\n" in proc.stdout and "evaluate: inputs unchanged" in proc.stdout
        verdict = Bundle.open(build / "bundle").manifest.provenance["quality_gate"]
        assert verdict["passed"] is passed and verdict["min_retention"] == threshold


def test_a_harvest_adds_traces_never_from_held_out_inputs_and_is_reported(
    tmp_path: Path,
) -> None:
    """`--add-traces harvest.tar`: the API's answers become traces; the held-out input, a
    duplicate, an answer the train label contradicts and a record without an API answer are
    dropped; no trace shares an input with the calibration or test part (by input hash); the
    report scores the harvested inputs before (the edge's answers) and after (this model)."""
    from services.builder.data import input_key
    from services.core.harvest import HarvestRecord, pack
    from services.router.harvest import HarvestWriter

    train, dev = balanced("train", 4), balanced("dev", 2)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", dev)
    fresh = [r for r in rows("train") if r not in train][:3]
    writer = HarvestWriter(tmp_path / "edge", max_file_bytes=1 << 20, max_records=None,
                           max_age_s=None, sample_rate=0.0)  # fmt: skip

    def harvest(ticket: str, api: str | None) -> None:
        writer.write(HarvestRecord(
            time="2026-12-03T10:00:00+00:00", kind="fallback", bundle="tiny-triage@0.0.1",
            inputs={"ticket": ticket}, local_outputs={"category": "billing"},
            local_confidence=0.3, local_outcome="PREDICT_OUTCOME_PARSED",
            api_outputs={"category": api} if api else None, route_reason="low_confidence",
        ))  # fmt: skip

    for row in fresh:
        harvest(row["ticket"], row["category"])
    harvest(fresh[0]["ticket"].upper(), fresh[0]["category"])  # a duplicate
    harvest(dev[0]["ticket"], dev[0]["category"])  # a held-out input
    wrong = next(c for c in ("billing", "network") if c != train[0]["category"])
    harvest(train[0]["ticket"], wrong)  # contradicts its train label
    harvest("Printer on floor 3 is jammed", None)  # no API answer
    tar = tmp_path / "harvest.tar"
    pack(tmp_path / "edge", tar)

    spec = tmp_path / "spec.yaml"
    spec.write_text(lean(TINY_SPEC.format(gate=0.0, output=tmp_path / "build")))
    proc = run_build(spec, "--add-traces", str(tar))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    build = tmp_path / "build"
    counts = json.loads((build / "traces" / "harvest.json").read_text())
    assert counts == {"records": 7, "kept": 3, "duplicate": 1, "held_out_input": 1,
                      "rejected_by_metric": 1, "no_api_answer": 1}  # fmt: skip
    assert "harvest: 3 of 7 records kept as traces" in proc.stdout
    traces = read_jsonl(build / "traces" / "traces.jsonl")
    assert sum(t.get("source") == "harvest" for t in traces) == 3 and len(traces) == 27
    held_out = {input_key({"ticket": r["ticket"]}) for r in dev}
    assert not held_out & {input_key(t["inputs"]) for t in traces}
    assert len((build / "dataset" / "dataset.jsonl").read_text().splitlines()) == 27

    evaluation = json.loads((build / "bundle" / "eval.json").read_text())
    assert evaluation["harvest"]["n"] == 3
    assert evaluation["harvest"]["before"]["score"] == pytest.approx(
        sum(r["category"] == "billing" for r in fresh) / 3
    )
    assert 0 <= evaluation["harvest"]["after"]["score"] <= 1
    assert "## Harvested inputs" in (build / "bundle" / "report.md").read_text()

    other = tmp_path / "other"
    other_writer = HarvestWriter(other, max_file_bytes=1 << 20, max_records=None,
                                 max_age_s=None, sample_rate=0.0)  # fmt: skip
    other_writer.write(HarvestRecord.model_validate({**json.loads(
        (tmp_path / "edge").glob("harvest-*.jsonl").__next__().read_text().splitlines()[0]),
        "inputs": {"country": "Peru"}}))  # fmt: skip
    pack(other, tmp_path / "other.tar")
    refused = run_build(spec, "--add-traces", str(tmp_path / "other.tar"))
    assert refused.returncode == 1
    assert "from another program" in refused.stderr and "traces.added" in refused.stderr

    tampered = tmp_path / "tampered.tar"
    data = bytearray(tar.read_bytes())
    at = data.find(fresh[1]["ticket"].encode())
    data[at] ^= 0x20  # one letter's case, inside a record
    tampered.write_bytes(bytes(data))
    refused = run_build(spec, "--add-traces", str(tampered), "--output", str(tmp_path / "new"))
    assert refused.returncode == 1 and "does not match its checksum" in refused.stderr
    assert "traces.added" in refused.stderr and not (tmp_path / "new").exists()


def test_a_stage_added_to_the_list_is_keyed_skipped_and_rerun(tmp_path: Path) -> None:
    """A toy stage appended to the declarations: keyed by its upstream stage and its own input
    file, skipped when neither changed, run again when its input changes; build() unchanged."""
    from rich.console import Console

    from services.builder.pipeline import STAGES, build
    from services.builder.spec import load_spec
    from services.builder.stages import Stage

    write_jsonl(tmp_path / "train.jsonl", balanced("train", 1))
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(TINY_SPEC.format(gate=0.0, output=tmp_path / "build"))
    note = tmp_path / "note.txt"
    note.write_text("first")

    def count_records(ctx: Any, out: Path) -> None:
        lines = (ctx.dirs["dataset"] / "dataset.jsonl").read_text().splitlines()
        (out / "count.txt").write_text(f"{len(lines)} {note.read_text()}")

    toy = Stage(
        "count", count_records, after=("dataset",), inputs=lambda ctx: {"note": note.read_text()}
    )
    stages = (*STAGES[:2], toy)
    spec = load_spec(spec_path)
    first = build(spec, Console(file=io.StringIO()), stages=stages)
    assert first.ran == ["traces", "dataset", "count"] and first.bundle is None
    assert (tmp_path / "build" / "count" / "count.txt").read_text() == "6 first"

    again = build(spec, Console(file=io.StringIO()), stages=stages)
    assert again.ran == [] and again.skipped == ["traces", "dataset", "count"]

    note.write_text("second")
    changed = build(spec, Console(file=io.StringIO()), stages=stages)
    assert changed.ran == ["count"] and changed.skipped == ["traces", "dataset"]
    assert (tmp_path / "build" / "count" / "count.txt").read_text() == "6 second"

    # A new version of the stage's code (what it writes changed) makes its folder again.
    newer = (*STAGES[:2], dataclasses.replace(toy, version=2))
    assert build(spec, Console(file=io.StringIO()), stages=newer).ran == ["count"]
    assert build(spec, Console(file=io.StringIO()), stages=newer).ran == []

    # A stage run again (its folder removed) runs the stages after it: theirs were made
    # from the results of a run that is gone.
    shutil.rmtree(tmp_path / "build" / "dataset")
    rerun = build(spec, Console(file=io.StringIO()), stages=stages)
    assert rerun.ran == ["dataset", "count"] and rerun.skipped == ["traces"]
    assert build(spec, Console(file=io.StringIO()), stages=stages).ran == []

    # A failed run publishes nothing; what it wrote stays only for a stage whose error names
    # its files (the traces stage's failed.jsonl), until the stage runs again.
    def fail_after_writing(ctx: Any, out: Path) -> None:
        (out / "failed.jsonl").write_text("{}\n")
        raise ValueError(f"see {out / 'failed.jsonl'}")

    partial = tmp_path / "build" / ".count.partial"
    for kept in (False, True):
        failing = dataclasses.replace(toy, run=fail_after_writing, version=3,
                                      kept_when_failed=kept)  # fmt: skip
        with pytest.raises(ValueError, match=r"failed\.jsonl"):
            build(spec, Console(file=io.StringIO()), stages=(*STAGES[:2], failing))
        assert (partial / "failed.jsonl").is_file() == kept
        assert (tmp_path / "build" / "count" / "count.txt").read_text() == "6 second"

    # Out of space or over a quota, even a kept stage's folder goes: the disk needs it back.
    def fill_the_disk(ctx: Any, out: Path) -> None:
        (out / "failed.jsonl").write_text("{}\n")
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(out / "failed.jsonl"))

    over_quota = dataclasses.replace(toy, run=fill_the_disk, version=4, kept_when_failed=True)
    with pytest.raises(OSError, match="quota"):
        build(spec, Console(file=io.StringIO()), stages=(*STAGES[:2], over_quota))
    assert not partial.exists()
    assert build(spec, Console(file=io.StringIO()), stages=stages).ran == []


def test_a_label_no_kept_trace_gives_is_named_after_the_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher's answers for one label all fail the metric (this one refuses 'billing'
    whatever is said): the student is never shown it, which the build says, with the rows,
    also when the stage is skipped."""
    from rich.console import Console

    from services.builder.pipeline import STAGES, build
    from services.builder.spec import load_spec
    from testkit.openai_standin import OpenAIStandIn

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test-not-a-real-key")
    train = balanced("train", 2)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    (tmp_path / "picky.py").write_text(
        "def picky(example, pred, trace=None):\n"
        "    return pred.category == example.category != 'billing'\n"
    )
    spec_text = TINY_SPEC.format(gate=0.0, output=tmp_path / "build")
    said = []
    with OpenAIStandIn({row["ticket"]: row["category"] for row in train}) as api:
        teacher = (f"teacher: {{model: openai/gold, api_base: '{api.base_url}', "
                   "api_key_env: TEST_TEACHER_KEY}\n")  # fmt: skip
        (tmp_path / "spec.yaml").write_text(
            spec_text.replace("metric: exact_match", "metric: picky.py:picky") + teacher
        )
        spec = load_spec(tmp_path / "spec.yaml")
        for _ in range(2):  # ran, then skipped
            printed = io.StringIO()
            build(spec, Console(file=printed, width=300), stages=STAGES[:1])
            said.append(" ".join(printed.getvalue().split()))
    warning = "warning: category: 'billing' (2 of 12 train rows) in no kept trace"
    assert warning in said[0] and warning in said[1], said
    assert said[0].count("in no kept trace") == 1  # every other label was taught


def test_a_host_shared_stage_runs_once_per_key_on_a_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage whose output follows from its key (the dense student) is kept in the host's
    stage cache: another build folder with the same key links it in without running it, a
    changed key runs it, and a build with the cache off runs it and keeps nothing."""
    from rich.console import Console

    from services.builder.host_cache import STAGE_CACHE_ENV
    from services.builder.pipeline import STAGES, build
    from services.builder.spec import load_spec
    from services.builder.stages import Stage

    write_jsonl(tmp_path / "train.jsonl", balanced("train", 1))
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    cache = tmp_path / "cache"
    monkeypatch.setenv(STAGE_CACHE_ENV, str(cache))
    source = {"text": "first"}
    calls: list[str] = []

    def write_copy(ctx: Any, out: Path) -> None:
        calls.append(source["text"])
        (out / "weights.txt").write_text(source["text"])

    toy = Stage("copy", write_copy, inputs=lambda ctx: dict(source), host_shared=True)
    stages = (*STAGES[:2], toy)

    def build_into(name: str) -> Any:
        spec_path = tmp_path / f"{name}.yaml"
        spec_path.write_text(TINY_SPEC.format(gate=0.0, output=tmp_path / name))
        console = Console(file=io.StringIO(), width=400)
        result = build(load_spec(spec_path), console, stages=stages)
        return result, console.file.getvalue()  # type: ignore[attr-defined]

    first, _ = build_into("one")
    assert first.ran[-1] == "copy" and calls == ["first"]
    assert [p.name.startswith(".") for p in (cache / "copy").iterdir()] == [False]  # no partial
    second, printed = build_into("two")
    assert "copy" in second.skipped and calls == ["first"]
    assert "copy: linked from the host cache" in printed
    assert (tmp_path / "two" / "copy" / "weights.txt").read_text() == "first"
    assert (tmp_path / "two" / "copy" / ".stage.json").is_file()  # finished: a rerun skips it
    assert build_into("two")[0].skipped[-1] == "copy" and calls == ["first"]

    source["text"] = "second"
    assert build_into("three")[0].ran[-1] == "copy" and calls == ["first", "second"]
    assert len(list((cache / "copy").iterdir())) == 2

    monkeypatch.setenv(STAGE_CACHE_ENV, "off")
    assert build_into("four")[0].ran[-1] == "copy" and calls == ["first", "second", "second"]
    assert len(list((cache / "copy").iterdir())) == 2


def test_the_bundle_serves_predict(tiny: tuple[Path, Path, object]) -> None:
    _, build, _ = tiny
    server = start_runtime("--bundle", str(build / "bundle"), "--n-ctx", "2048")
    try:
        with InferenceClient(server.target) as client:
            info = client.info()
            reply = client.predict({"ticket": "The VPN keeps dropping when I work from home."})
    finally:
        server.terminate()
    assert info.bundle_version == "0.0.1-test" and info.quantization == "Q8_0"
    assert [f.name for f in info.signature.output_fields] == ["category"]
    assert reply.served_by == pb.SERVED_BY_LOCAL
    assert reply.outcome in (pb.PREDICT_OUTCOME_PARSED, pb.PREDICT_OUTCOME_UNPARSED)
    if reply.outcome == pb.PREDICT_OUTCOME_PARSED:
        assert reply.outputs["category"] in {
            "network", "hardware", "software", "access", "security", "billing"
        }  # fmt: skip


LABELS = {"network", "hardware", "software", "access", "security", "billing"}


def test_a_gemma3_student_is_distilled_and_served_by_the_runtime_and_the_router(
    tiny: tuple[Path, Path, object], tmp_path: Path
) -> None:
    """student.source: gemma3-270m, the real Gemma 3 270M base GGUF (no chat template) with the
    tiny recipe: Gemma's turns are added to the base, trained with, written into the GGUF and
    the Modelfile; the export (llama.cpp's gemma3 layout) passes the self-check; the bundle
    answers Predict with a typed label through the runtime and through the router."""
    from services.core.gguf_metadata import read_gguf_metadata
    from testkit.processes import start_router

    spec_path, tiny_build, _ = tiny
    out = tmp_path / "build"
    spec = spec_path.with_name("gemma.yaml")
    spec.write_text(lean(spec_path.read_text()).replace(f"output: {tiny_build}", f"output: {out}")
                    + "student: {source: gemma3-270m}\n")  # fmt: skip
    proc = run_build(spec)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]

    base = read_gguf_metadata(out / "convert" / "base.gguf")
    assert base["general.architecture"] == "gemma3"
    assert "<start_of_turn>" in base["tokenizer.chat_template"]
    exported = read_gguf_metadata(out / "export" / "tiny-triage.F16.gguf")
    assert exported["tokenizer.chat_template"] == base["tokenizer.chat_template"]
    checks = json.loads((out / "export" / "self_check.json").read_text())
    assert all(c["max_hidden_difference"] < 0.01 for c in checks)
    modelfile = (out / "bundle" / "Modelfile").read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "<start_of_turn>model" in modelfile

    ticket = {"ticket": "I was charged twice for my subscription this month."}
    runtime = start_runtime("--bundle", str(out / "bundle"), "--n-ctx", "1024")
    try:
        with InferenceClient(runtime.target, timeout_s=120) as client:
            local = client.predict(ticket)
        router = start_router(out / "bundle", runtime.target)
        try:
            with InferenceClient(router.target, timeout_s=120) as client:
                routed = client.predict(ticket)
        finally:
            router.terminate()
    finally:
        runtime.terminate()
    assert local.outcome == pb.PREDICT_OUTCOME_PARSED and local.outputs["category"] in LABELS
    assert json.loads(local.outputs_json) == {"category": local.outputs["category"]}
    assert routed.served_by == pb.SERVED_BY_LOCAL and routed.outputs_json == local.outputs_json


QA_SPEC = """
name: tiny-qa
version: "0.0.1-test"
program: examples.technical_qa.program:build
data: {{train: train.jsonl, dev: dev.jsonl}}
metric: semantic_f1
teacher: {{model: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}}
cost: {{api_input_per_1m_tokens: 0.15, api_output_per_1m_tokens: 0.6}}
baselines: {{few_shot_k: 2}}
student: {{source: {student}}}
# 9 steps: too few to learn the field markers at the default's weight 0.1 (the recipe's floor
# of 150 steps does); the full weight learns them at once.
lora: {{epochs: 3, batch_size: 4, min_steps: 0, checkpoints: 1, max_length: 384,
        scaffold_weight: 1.0}}
quantizations: [Q8_0]
quality_gate: {{min_retention: 0.0}}
n_threads: 2
eval_max_tokens: 48
output: {output}
"""


def test_several_students_are_built_compared_and_the_rule_picks_one(
    tiny: tuple[Path, Path, object], tmp_path: Path
) -> None:
    """students: [default, a randomly initialised llama]: both trained on the same traces,
    exported, evaluated; the comparison is in the shipped bundle's report; the best score
    ships, and a size budget the default does not meet ships the other."""
    from testkit.tiny_models import smollm2_tokenizer, tiny_checkpoint

    spec_path, tiny_build, _ = tiny
    out = tmp_path / "build"
    # The default student's candidate is the tiny build itself: same spec, same stage keys.
    shutil.copytree(tiny_build, out / "students" / "default")
    random_llama = tiny_checkpoint("llama", smollm2_tokenizer(tmp_path / "tok"), tmp_path / "rnd")
    base_text = spec_path.read_text().replace(f"output: {tiny_build}", f"output: {out}")
    spec = spec_path.with_name("students.yaml")
    spec.write_text(base_text + f"students: [default, {random_llama}]\n")
    proc = run_build(spec)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]

    Bundle.open(out / "bundle")  # verified
    compared = json.loads((out / "bundle" / "students.json").read_text())
    candidates = {c["source"]: c for c in compared["candidates"]}
    assert list(candidates) == ["default", str(random_llama)]
    # The tiny test part (6 rows) cannot tell the two apart: the rule, not the winner, is
    # what is checked: the best score ships, equal scores to the smaller file.
    best = max(candidates.values(), key=lambda c: (c["score"], -c["size_mb"]))
    assert compared["chosen"] == best["source"]
    report = (out / "bundle" / "report.md").read_text()
    assert "## Students compared" in report and str(random_llama) in report
    # The teacher's traces were made once: the second candidate reused them (same key).
    keys = [json.loads((out / "students" / name / "traces" / ".stage.json").read_text())["key"]
            for name in ("default", "rnd")]  # fmt: skip
    assert keys[0] == keys[1]

    # A size budget the winner does not meet: the other ships if it fits, else the build
    # says that none can (the stages are all kept: only the choice and the bundle rerun).
    other = next(c for c in candidates.values() if c["source"] != best["source"])
    budget = best["size_mb"] - 0.1
    spec.write_text(base_text + f"students: [default, {random_llama}]\n"
                    f"choice: {{max_size_mb: {budget}}}\n")  # fmt: skip
    proc = run_build(spec)
    if other["size_mb"] <= budget:
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        compared = json.loads((out / "bundle" / "students.json").read_text())
        assert compared["chosen"] == other["source"]
        shipped = Bundle.open(out / "bundle").manifest.provenance["base_model"]["source"]
        assert shipped == other["description"]
    else:
        assert proc.returncode == 4
        assert "no student can ship" in proc.stderr and "choice.max_size_mb" in proc.stderr


def test_chain_of_thought_program_from_an_api_teacher_on_a_hugging_face_student(
    tiny: tuple[Path, Path, object], tmp_path: Path
) -> None:
    """examples/technical_qa (ChainOfThought, semantic F1) distilled from an API teacher into a
    Hugging Face checkpoint with no GGUF beside it, which llama.cpp's converter turns into one.
    The teacher and the metric's judge are the OpenAI-compatible STAND-IN: it answers with a
    reasoning line and the reference answer, and judges by shared words (no strong model runs
    here). The report carries the teacher's measured latency, tokens and cost."""
    from services.core.gguf_metadata import quantization_name, read_gguf_metadata
    from testkit.openai_standin import OpenAIStandIn

    _, tiny_build, _ = tiny
    student = tmp_path / "hf-student"  # the tiny build's dense SmolLM2 checkpoint: no .gguf
    shutil.copytree(tiny_build / "student", student, ignore=shutil.ignore_patterns(".stage.json"))
    assert not list(student.glob("*.gguf"))
    qa = REPO / "examples" / "technical_qa"
    train = read_jsonl(qa / "train.jsonl")[:12]
    dev = read_jsonl(qa / "dev.jsonl")[:4]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", dev)
    gold = {row["question"]: row["answer"] for row in train + dev}
    gold[train[0]["question"]] = "a wrong answer entirely"  # one trace the metric must reject
    build = tmp_path / "build"
    spec = tmp_path / "spec.yaml"
    with OpenAIStandIn(gold, input_field="question", output_field="answer", reasoning=True) as api:
        spec.write_text(QA_SPEC.format(student=student, output=build))
        # The teacher as `make build-bundle` passes it: TEACHER_* override the spec's.
        teacher_env = {
            "TEACHER_MODEL": "openai/gold-cot-teacher", "TEACHER_API_BASE": api.base_url,
            "TEACHER_API_KEY_ENV": "QA_TEACHER_KEY", "QA_TEACHER_KEY": "sk-qa-not-a-real-key",
        }  # fmt: skip
        proc = run_build(spec, env=teacher_env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]

    # The converter wrote an F16 GGUF carrying the checkpoint's tokenizer and chat template.
    base = read_gguf_metadata(build / "convert" / "base.gguf")
    assert quantization_name(base) == "F16"
    original = read_gguf_metadata(smollm2_gguf())
    assert base["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    assert base["llama.block_count"] == original["llama.block_count"]

    counts = json.loads((build / "traces" / "counts.json").read_text())
    assert counts == {"total": 12, "kept": 11, "rejected": 1, "failed": 0}
    kept = read_jsonl(build / "traces" / "traces.jsonl")
    assert all(t["outputs"]["reasoning"].startswith("This asks about") for t in kept)
    assistant = read_jsonl(build / "dataset" / "dataset.jsonl")[0]["messages"][-1]["content"]
    assert assistant.index("[[ ## reasoning ## ]]") < assistant.index("[[ ## answer ## ]]")
    checks = json.loads((build / "export" / "self_check.json").read_text())
    assert checks and all(c["max_hidden_difference"] < 0.01 for c in checks)
    evaluation = json.loads((build / "bundle" / "eval.json").read_text())
    teacher = evaluation["teacher"]
    assert teacher["score"] == 1.0  # the stand-in answers the references; the judge agrees
    manifest = json.loads((build / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["teacher"] == "openai/gold-cot-teacher"
    labels = [s["label"] for s in evaluation["students"]]
    assert labels == ["untuned student (F16), zero-shot", "untuned student (F16), 2-shot",
                      "distilled Q8_0"]  # fmt: skip
    # The judge's calls: at least one per scored traced and evaluated answer, all parsed.
    judge = evaluation["judge"]
    assert judge["model"] == "openai/gold-cot-teacher" and judge["failures"] == 0
    assert judge["calls"] >= 11 and judge["prompt_tokens"] > 0
    # The teacher as the API: timed per call, its tokens counted (the stand-in counts words),
    # priced from the spec: 1000 x (in x 0.15 + out x 0.6) / 1e6.
    assert teacher["usage"]["calls"] == 4 and teacher["latency_p50_ms"] > 0
    assert teacher["prompt_tokens_per_call"] > 20 and teacher["completion_tokens_per_call"] > 3
    decision = json.loads((build / "bundle" / "decision.json").read_text())
    api = decision["api"]
    expected = (
        api["prompt_tokens_per_call"] * 0.15 + api["completion_tokens_per_call"] * 0.6
    ) / 1e3
    assert api["measured"] and api["cost"]["per_1k_calls"] == pytest.approx(expected)
    assert api["cost"]["source"] == "spec cost.api_*_per_1m_tokens"
    report_md = (build / "bundle" / "report.md").read_text()
    assert f"{expected:.4g} USD" in report_md and "Metric judged by" in report_md

    server = start_runtime("--bundle", str(build / "bundle"), "--n-ctx", "2048")
    try:
        with InferenceClient(server.target) as client:
            info = client.info()
            reply = client.predict({"question": dev[0]["question"]})
    finally:
        server.terminate()
    assert [f.name for f in info.signature.output_fields] == ["reasoning", "answer"]
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED, reply
    assert reply.outputs["reasoning"] and reply.outputs["answer"]

    # The dataset's answers label no reasoning: a gold teacher is refused, saying what to do.
    spec.write_text(re.sub(r"teacher: .*", "teacher: {model: gold}", spec.read_text()))
    refused = run_build(spec)
    assert refused.returncode == 2
    assert "teacher: gold has no 'reasoning' to teach" in refused.stderr
    assert "use an API teacher" in refused.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("program: not-an-import-path", "program: 'not-an-import-path' is not an import path"),
        ("program: examples.nowhere:build", "program: cannot import 'examples.nowhere'"),
        (
            "program: examples/ticket_triage/program.py",
            "'examples/ticket_triage/program.py' is not an import path like "
            "package.module:function; name the program in examples/ticket_triage/program.py "
            "after a colon, e.g. examples.ticket_triage.program:build",
        ),
        (
            "program: optimized_program/",
            "optimized_program/ is a saved program: name a function that returns it, e.g. "
            "`def build(): return dspy.load('optimized_program/', allow_pickle=True)`",
        ),
        (
            "program: examples.ticket_triage.program:TicketTriage",
            "TicketTriage is a signature, "
            "not a program; name a module, e.g. a function `def build(): return "
            "dspy.Predict(TicketTriage)`",
        ),
        ("quantizations: [Q3_X]", "quantizations: Value error, 'Q3_X' is not one of"),
        ("lora: {rank: 0}", "lora.rank: Input should be greater than or equal to 1"),
        (
            "teacher: {model: gold, flavour: spicy}",
            "teacher.flavour: not a key the spec has; the keys here are model, api_base,",
        ),
        (
            "quantization: [Q8_0]",
            "quantization: not a key the spec has; did you mean 'quantizations'?",
        ),
        ("lora: {rnak: 8}", "lora.rnak: not a key the spec has; did you mean 'rank'?"),
        ("data: {train: missing.jsonl, dev: dev.jsonl}", "data.train:"),
        ("data: {train: train.jsonl, test: dev.jsonl}", "data.dev: required: held-out rows the"),
    ],
)
def test_spec_errors_are_named(tmp_path: Path, change: str, message: str) -> None:
    write_jsonl(tmp_path / "train.jsonl", balanced("train", 1))
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    base = {
        "name": "x",
        "program": "examples.ticket_triage.program:build",
        "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "output": str(tmp_path / "build"),
    }
    import yaml

    key = change.split(":", 1)[0]
    spec_data = {**base, key: yaml.safe_load(change)[key]}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_data))
    proc = run_build(spec)
    assert proc.returncode == 2, proc.stderr
    assert message.replace("Value error, ", "") in " ".join(proc.stderr.split()), proc.stderr


def test_a_program_may_be_named_by_its_file(tmp_path: Path) -> None:
    """`program: app/main.py:build` (or `./program.py:build`), as people write a file, is the
    module `app.main`, looked up beside the spec like any import path; `teacher:` and
    `student:` may name the model alone."""
    import yaml

    from services.builder.spec import load_spec

    write_jsonl(tmp_path / "train.jsonl", balanced("train", 1))
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    for written, module in (("./program.py:build", "program:build"),
                            ("app/main.py:Pipeline", "app.main:Pipeline"),
                            ("metrics.py:score", "metrics:score")):  # fmt: skip
        key = "metric" if written.startswith("metrics") else "program"
        other = {"program": "program:build"} if key == "metric" else {}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
            "name": "x", key: written, **other,
            "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        }))  # fmt: skip
        assert getattr(load_spec(tmp_path / "spec.yaml"), key) == module
    # no `output:`: the build folder is the spec's own, never one another spec writes to
    assert load_spec(tmp_path / "spec.yaml").output == Path("build/x")
    # `teacher:` and `student:` may be the model alone, as people first write them.
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "x", "program": "program:build", "teacher": "openai/gpt-4o-mini",
        "student": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
    }))  # fmt: skip
    shorthand = load_spec(tmp_path / "spec.yaml")
    assert shorthand.teacher.model == "openai/gpt-4o-mini" and shorthand.teacher.num_threads == 4
    assert shorthand.student.source == "HuggingFaceTB/SmolLM2-360M-Instruct"


# Chat-template tokens around a record's three messages (SmolLM2: 5 per message), with room.
TEMPLATE_ALLOWANCE = 32


@pytest.mark.parametrize(
    "spec_path", sorted(REPO.glob("examples/*/spec.yaml")), ids=lambda p: p.parent.name
)
def test_every_example_loads_and_its_gold_traces_fit_the_default_recipe(
    spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shipped example builds on a first try: its spec, program and data load and split, and
    (gold teacher, one predictor) every training record fits lora.max_length in the default
    student's tokens. A signature with eight Literal labels once made every record longer than
    the old 512, so the build had nothing to train on."""
    import llama_cpp
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    monkeypatch.setenv("OPENAI_API_KEY", "unused: loading a spec calls no model")
    spec = load_spec(spec_path)
    ctx = BuildContext.load(spec, Console(quiet=True))
    assert ctx.trainset and ctx.calibset and ctx.testset
    if not spec.teacher.is_gold or ctx.pipeline is not None:
        return  # an API teacher's answers, or several predictors' calls: known at build time
    vocab = llama_cpp.Llama(str(smollm2_gguf()), vocab_only=True, verbose=False)
    longest = 0
    for example in ctx.trainset:
        outputs = {name: example[name] for name in ctx.output_names}
        record = ctx.codec.format_finetune(dict(example.inputs()), outputs)
        text = "".join(message["content"] for message in record["messages"])
        longest = max(longest, len(vocab.tokenize(text.encode(), add_bos=False)))
    assert longest + TEMPLATE_ALLOWANCE <= spec.lora.max_length, longest


ORDERS_PROGRAM = '''
import dspy

from testkit.structured import Line, Size


class ParseOrder(dspy.Signature):
    """Extract the order."""

    message: str = dspy.InputField()
    line: Line = dspy.OutputField()
    size: Size = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    priority: int = dspy.OutputField()
    gift: bool = dspy.OutputField()


def build():
    return dspy.Predict(ParseOrder)
'''


def order_rows(count: int, start: int) -> list[dict[str, Any]]:
    items = [("mug", "kitchen"), ("lamp", "home"), ("pen", "office"), ("scarf", "clothing")]
    out = []
    for n in range(start, start + count):
        item, tag = items[n % 4]
        size = "large" if n % 3 == 0 else "small"
        out.append({"message": f"{n % 5 + 1} {item}s in a {size} box, order {n}",
                    "line": {"item": item, "quantity": n % 5 + 1}, "size": size, "tags": [tag],
                    "priority": n % 3 + 1, "gift": n % 2 == 0})  # fmt: skip
    return out


def parse_line_signature() -> Any:
    import dspy

    from testkit.structured import Line

    fields = {"message": (str, dspy.InputField()), "line": (Line, dspy.OutputField())}
    return dspy.Signature(fields, "Extract the order line.")


def test_an_api_teachers_model_answer_is_traced_as_its_json_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teacher's typed answer (a pydantic model, through DSPy from an OpenAI-compatible API:
    the gold STAND-IN) is written to traces.jsonl as the JSON data a label row holds, and the
    training record answers it as JSON; Python's repr there would teach the student a form
    typed decoding never lets it write."""
    import dspy

    from services.builder.data import load_examples
    from services.builder.metrics import TypedMetric, exact_match
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import collect_traces
    from services.core.program import ProgramSpec, PromptCodec, output_annotations
    from testkit.openai_standin import OpenAIStandIn

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    rows = [{"message": f"{n} mugs please", "line": {"item": "mug", "quantity": n}}
            for n in (2, 3)]  # fmt: skip
    trainset = load_examples(write_jsonl(tmp_path / "train.jsonl", rows), ["message"], ["line"],
                             "data.train")  # fmt: skip
    program = dspy.Predict(parse_line_signature())
    gold = {row["message"]: json.dumps(row["line"]) for row in rows}
    with OpenAIStandIn(gold, input_field="message", output_field="line") as api:
        counts = collect_traces(
            program=program, trainset=trainset, threshold=1.0, output_names=["line"],
            teacher=TeacherSpec(model="openai/standin", api_base=api.base_url, num_threads=1),
            metric=TypedMetric(exact_match, output_annotations(program)),
            out_dir=tmp_path, runner=None, progress=lambda n: None,
        )  # fmt: skip
    assert counts.kept == 2
    traces = read_jsonl(tmp_path / "traces.jsonl")
    assert [t["outputs"]["line"] for t in traces] == [row["line"] for row in rows]
    codec = PromptCodec(ProgramSpec.from_signature(program.signature))
    answer = codec.format_finetune(traces[0]["inputs"], traces[0]["outputs"])["messages"][-1]
    assert '{"item": "mug", "quantity": 2}' in answer["content"], answer


def test_a_program_with_models_and_enums_trains_on_what_it_serves(tmp_path: Path) -> None:
    """A single Predict with a pydantic model, an Enum, a list, an int and a bool: the gold
    traces pass exact_match (the typed teacher answer equals the JSON row), and the runtime's
    codec, rebuilt from program.json alone, parses every training answer back to its row."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.metrics import canonical
    from services.builder.pipeline import STAGES, build
    from services.builder.spec import load_spec
    from services.core.program import ProgramSpec, PromptCodec

    (tmp_path / "orders_prog.py").write_text(ORDERS_PROGRAM)
    train = order_rows(8, 0)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", order_rows(8, 100))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "name: orders\nprogram: orders_prog:build\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {tmp_path / 'build'}\n"
    )
    spec = load_spec(spec_path)
    result = build(spec, Console(file=io.StringIO()), stages=STAGES[:2])
    assert result.ran == ["traces", "dataset"]
    counts = json.loads((tmp_path / "build" / "traces" / "counts.json").read_text())
    assert counts["kept"] == 8 and counts["rejected"] == 0, counts
    records = (tmp_path / "build" / "dataset" / "dataset.jsonl").read_text().splitlines()
    described = BuildContext.load(spec, Console(quiet=True)).program_spec.model_dump_json()
    served = PromptCodec(ProgramSpec.model_validate_json(described))
    assert [f.type for f in served.spec.outputs][:3] == ["Line", "Size", "list[str]"]
    for line, row in zip(records, train, strict=True):
        answer = json.loads(line)["messages"][-1]["content"]
        parsed = served.parse(answer)
        assert parsed is not None, answer
        values = json.loads(parsed.outputs_json)
        assert all(canonical(values[k]) == canonical(row[k]) for k in values), (values, row)
        assert isinstance(values["gift"], bool) and isinstance(values["priority"], int)


CHAT_PROGRAM = """
import dspy


class Chat(dspy.Signature):
    \"\"\"Answer the user's IT question, taking the conversation so far into account.\"\"\"

    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()


def build():
    return dspy.Predict(Chat)
"""


def test_a_chat_program_trains_on_its_history_as_earlier_turns(tmp_path: Path) -> None:
    """A dspy.History input in the rows (its JSON, or the bare list of turns) is trained as
    DSPy prompts it, earlier user and assistant turns before the question; a row whose history
    is not one stops the build naming it."""
    from rich.console import Console

    from services.builder.pipeline import STAGES, build
    from services.builder.spec import SpecError, load_spec

    (tmp_path / "chat_prog.py").write_text(CHAT_PROGRAM)
    turns = [{"question": "My VPN drops.", "answer": "Update the VPN client."}]
    rows = [{"question": f"Still dropping, try {n}?", "answer": f"Reinstall it ({n}).",
             "history": turns if n % 2 else {"messages": turns}} for n in range(6)]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows[:4])
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "name: chat\nprogram: chat_prog:build\nmetric: token_f1\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {tmp_path / 'build'}\n"
    )
    build(load_spec(spec_path), Console(file=io.StringIO()), stages=STAGES[:2])
    records = read_jsonl(tmp_path / "build" / "dataset" / "dataset.jsonl")
    assert len(records) == 6
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"], roles
        assert "My VPN drops." in record["messages"][1]["content"]
        assert "Update the VPN client." in record["messages"][2]["content"]
    write_jsonl(tmp_path / "train.jsonl", [*rows, {**rows[0], "history": "My VPN drops."}])
    with pytest.raises(SpecError, match=r"line 7: input history 'My VPN drops.' is not of type"):
        build(load_spec(spec_path), Console(file=io.StringIO()), stages=STAGES[:2])


def test_a_program_with_demos_trains_on_the_prompt_it_is_served_with(tmp_path: Path) -> None:
    """A saved, optimized program loaded by its factory keeps its demos: the training records
    and the bundle's program.json prompt with them alike."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec
    from services.core.program import ProgramSpec, PromptCodec

    (tmp_path / "saved_prog.py").write_text(
        "import dspy\nfrom examples.ticket_triage.program import build as triage\n\n"
        "def build():\n    program = triage()\n"
        "    program.demos = [dspy.Example(ticket='I was billed twice', category='billing')]\n"
        "    return program\n"
    )
    write_jsonl(tmp_path / "train.jsonl", balanced("train", 1))
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    (tmp_path / "spec.yaml").write_text(
        "name: saved\nprogram: saved_prog:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
    )
    ctx = BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
    served = PromptCodec(ProgramSpec.load(ctx.write_program(tmp_path / "program")))
    inputs = {"ticket": "My card was declined"}
    trained = ctx.codec.format_finetune(inputs, {"category": "billing"})["messages"][:-1]
    assert served.format_messages(inputs) == trained
    assert "I was billed twice" in json.dumps(trained)


def test_a_program_beside_its_spec_imports_without_being_a_package(tmp_path: Path) -> None:
    """A user's folder with spec.yaml and inbox_prog.py (no __init__.py, nothing installed):
    the spec's folder is on the import path; a wrong module name says where it looked."""
    folder = tmp_path / "trial"
    folder.mkdir()
    shutil.copy(TICKETS / "program.py", folder / "inbox_prog.py")
    write_jsonl(folder / "train.jsonl", balanced("train", 1))
    write_jsonl(folder / "dev.jsonl", balanced("dev", 1))
    spec = folder / "spec.yaml"
    spec.write_text("name: trial\nprogram: inbox_prog:build\ndata: {train: train.jsonl, "
                    "dev: dev.jsonl}\n")  # fmt: skip
    check = (
        "import sys; from pathlib import Path; from services.builder.spec import load_spec; "
        "from services.builder.context import load_program; "
        "spec = load_spec(Path(sys.argv[1])); "
        "print(type(load_program(spec.program).predictors()[0]).__name__)"
    )
    elsewhere = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120,
                 "env": {**os.environ, "PYTHONPATH": str(REPO)}}  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", check, str(spec)], **elsewhere)  # type: ignore[call-overload]
    assert loaded.returncode == 0 and loaded.stdout.strip() == "Predict", loaded.stderr
    spec.write_text(spec.read_text().replace("inbox_prog:build", "inbox_program:build"))
    proc = subprocess.run([sys.executable, "-m", "services.cli", "build", str(spec)], **elsewhere)  # type: ignore[call-overload]
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "program: cannot import 'inbox_program'" in message
    assert str(folder) in message and "put inbox_program.py under one of those folders" in message


def test_missing_spec_file_and_bad_rows_are_clear(tmp_path: Path) -> None:
    proc = run_build(tmp_path / "nope.yaml")
    assert proc.returncode == 2 and "no such spec file" in proc.stderr
    (tmp_path / "train.jsonl").write_text('{"ticket": "a"}\n')
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: x\nprogram: examples.ticket_triage.program:build\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {tmp_path / 'b'}\n"
    )
    proc = run_build(spec)
    assert proc.returncode == 2
    assert "line 1: missing field 'category'" in " ".join(proc.stderr.split())
    # A label the Literal does not allow: the served model could never answer it.
    write_jsonl(
        tmp_path / "train.jsonl", [*balanced("train", 1), {"ticket": "b", "category": "Refunds"}]
    )
    proc = run_build(spec)
    message = " ".join(proc.stderr.split())
    assert (
        proc.returncode == 2 and "line 7: category 'Refunds' is not a value of the field" in message
    )
    assert "one of: network, hardware" in message


def test_a_row_whose_typed_input_the_runtime_would_refuse_stops_the_build(
    tmp_path: Path,
) -> None:
    """A data row's typed input is checked as a request's is: a CSV's `3` is an int, `three`
    is not, and the build says which row before anything runs."""
    from services.builder.data import check_values
    from services.builder.spec import SpecError
    from services.core.program import FieldSpec

    fields = [FieldSpec(name="text"), FieldSpec(name="max_stars", type="int"),
              FieldSpec(name="tags", type="list[str]")]  # fmt: skip
    path = tmp_path / "train.csv"
    path.write_text('text,max_stars,tags,stars\na,3,"[""x""]",1\nb,three,[],2\n')
    with pytest.raises(SpecError, match=r"row 3: input max_stars 'three' is not of type int"):
        check_values(path, "data.train", {"stars": int}, fields)
    path.write_text('text,max_stars,tags,stars\na,3,"[""x""]",1\n')
    check_values(path, "data.train", {"stars": int}, fields)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "max_stars": 3, "tags": ["x"]},
                                           {"text": "b", "max_stars": 3, "tags": "x"}])  # fmt: skip
    with pytest.raises(SpecError, match=r"line 2: input tags 'x' is not of type list\[str\]"):
        check_values(tmp_path / "train.jsonl", "data.train", {}, fields)


def test_labels_are_trained_and_scored_as_their_types_values(tmp_path: Path) -> None:
    """A spreadsheet's `yes`/`no` for a bool, `3.0` for an int, ` high ` for a Literal are the
    values DSPy's parser reads them as: the student is trained to write `True` (what typed
    decoding lets it write) and its `True` matches the row's `yes`."""
    import dspy
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.metrics import exact_match
    from services.builder.spec import load_spec

    (tmp_path / "alerts.py").write_text(
        "from typing import Literal\nimport dspy\n\nclass Alert(dspy.Signature):\n"
        "    text: str = dspy.InputField()\n    urgent: bool = dspy.OutputField()\n"
        "    level: Literal['low', 'high'] = dspy.OutputField()\n"
        "    count: int = dspy.OutputField()\n\n"
        "def build():\n    return dspy.Predict(Alert)\n"
    )
    rows = [{"text": f"t{n}", "urgent": "yes" if n % 2 else "no",
             "level": " high " if n % 2 else "low", "count": "3.0"} for n in range(8)]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows)
    (tmp_path / "spec.yaml").write_text(
        "name: alerts\nprogram: alerts:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
    )
    ctx = BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
    first = next(e for e in ctx.trainset if e.text == "t1")
    assert (first.urgent, first.level, first.count) == (True, "high", 3)
    answer = ctx.codec.format_finetune(dict(first.inputs()), dict(first.labels()))
    assert (
        "[[ ## urgent ## ]]\nTrue\n\n[[ ## level ## ]]\nhigh\n\n[[ ## count ## ]]\n3\n"
        in (answer["messages"][-1]["content"])
    )
    held = next(e for e in ctx.calibset + ctx.testset if e.urgent)
    assert exact_match(held, dspy.Prediction(urgent="True", level="high", count="3"))


def test_an_image_field_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """A student here reads and writes text: a `dspy.Image` input (or a list of them) is named
    at load, not met as a type error in the data or a prompt of a URL."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import SpecError, load_spec

    (tmp_path / "photos.py").write_text(
        "import dspy\n\nclass Caption(dspy.Signature):\n"
        "    photos: list[dspy.Image] = dspy.InputField()\n"
        "    caption: str = dspy.OutputField()\n\n"
        "def build():\n    return dspy.Predict(Caption)\n"
    )
    rows = [{"photos": ["https://example.com/a.png"], "caption": "a cat"}] * 4
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows)
    (tmp_path / "spec.yaml").write_text(
        "name: photos\nprogram: photos:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
    )
    with pytest.raises(SpecError, match=r"field 'photos' is list\[Image\]: the students are text"):
        BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))


def test_typed_values_are_scored_per_field_by_exact_match_free_text_by_f1(tmp_path: Path) -> None:
    """A number or a list with a value of its own in most rows is no label (no strata, no
    balance) but is no wording either: per field it is right or wrong, as data; only `str`
    fields get token F1's partial credit."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    (tmp_path / "receipts.py").write_text(
        "import dspy\n\nclass Read(dspy.Signature):\n    text: str = dspy.InputField()\n"
        "    total: float = dspy.OutputField()\n    skus: list[str] = dspy.OutputField()\n"
        "    note: str = dspy.OutputField()\n    paid: bool = dspy.OutputField()\n\n"
        "def build():\n    return dspy.Predict(Read)\n"
    )
    rows = [{"text": f"t{n}", "total": n + 0.5, "skus": [f"s{n}"], "note": f"note {n}",
             "paid": n % 2 == 0} for n in range(30)]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "dev.jsonl", rows[20:])
    (tmp_path / "spec.yaml").write_text(
        "name: receipts\nprogram: receipts:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
        f"metric: token_f1\noutput: {tmp_path / 'build'}\n"
    )
    ctx = BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
    assert ctx.label_names == ["paid"]
    assert ctx.exact_names == ["total", "skus", "paid"] and ctx.free_text_names == ["note"]


def test_a_choice_of_many_values_is_a_label_and_its_rare_values_are_split(tmp_path: Path) -> None:
    """A Literal of 30 codes is a label field (exact match per field, stratified split,
    balance) whatever the row count; values held by one dev row share a stratum, so they are
    split like the rest instead of all falling to the test part."""
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import load_spec

    codes = [f"c{n:02d}" for n in range(30)]
    (tmp_path / "codes.py").write_text(
        "from typing import Literal\nimport dspy\n\nclass Code(dspy.Signature):\n"
        f"    text: str = dspy.InputField()\n    code: Literal{codes!r} = dspy.OutputField()\n\n"
        "def build():\n    return dspy.Predict(Code)\n"
    )
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{n}", "code": codes[n % 30]}
                                           for n in range(40)])  # fmt: skip
    twice, once = codes[:10] * 2, codes[10:20]
    write_jsonl(tmp_path / "dev.jsonl", [{"text": f"d{n}", "code": code}
                                         for n, code in enumerate(twice + once)])  # fmt: skip
    (tmp_path / "spec.yaml").write_text(
        "name: codes\nprogram: codes:build\ndata: {train: train.jsonl, dev: dev.jsonl}\n"
        f"output: {tmp_path / 'build'}\n"
    )
    ctx = BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
    assert ctx.label_names == ["code"] and ctx.free_text_names == []
    calibration = [e.code for e in ctx.calibset]
    assert sorted(set(calibration) & set(codes[:10])) == codes[:10]  # one of each pair
    assert 3 <= len(set(calibration) & set(once)) <= 7, calibration


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".csv;", ".tsv"])
def test_a_dataset_is_jsonl_a_json_array_or_csv(tmp_path: Path, suffix: str) -> None:
    """The same rows in each format load as the same examples and groups (a CSV separated by
    commas, by semicolons as a spreadsheet in a decimal-comma locale saves it, or by tabs); a
    broken file names where it broke and the formats that are read."""
    import csv

    from services.builder.data import load_grouped
    from services.builder.metrics import canonical

    rows = [{"ticket": f"t{n}, again", "category": "billing" if n % 2 else "account",
             "group": "g1" if n < 2 else ""} for n in range(4)]  # fmt: skip
    path = tmp_path / f"train{suffix.rstrip(';')}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        delimiter = {".csv": ",", ".csv;": ";", ".tsv": "\t"}[suffix]
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    examples, groups = load_grouped(path, ["ticket"], ["category"], "data.train")
    assert [canonical(dict(e)) for e in examples] == [
        canonical({k: v for k, v in r.items() if k != "group"}) for r in rows
    ]
    assert groups[:2] == ["g1", "g1"] and len(set(groups[2:])) == 2 and "" not in groups


def test_a_broken_dataset_file_says_where_and_how(tmp_path: Path) -> None:
    from services.builder.data import load_examples
    from services.builder.spec import SpecError

    cases = {
        "a.jsonl": ('{"ticket": "x", "category": "a"}\n{"ticket": "y",\n', "line 2: not JSON"),
        "b.json": ('{"ticket": "x"}', "a .json dataset is an array of row objects"),
        "c.json": ('[{"ticket": "x", "category": "a"}, 3]', "item 2: a row is a JSON object"),
        "d.csv": ("ticket,category\nx,billing\ny\n", "row 3: its values do not match"),
        "e.csv": ("ticket\nx\n", "row 2: missing field 'category' \\(the row has 'ticket'\\)"),
        "f.csv": ("ticket, category\nx,billing\n", "the row has 'ticket', ' category'"),
        "g.csv": ("ticket,category\ncaf\xe9,billing\n", "line 2: not UTF-8 .*as UTF-8"),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        (tmp_path / name).write_bytes(text.encode("latin-1"))
        with pytest.raises(SpecError, match=message):
            load_examples(tmp_path / name, ["ticket"], ["category"], "data.train")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_dataset_saved_with_a_byte_order_mark_loads(tmp_path: Path, suffix: str) -> None:
    """Spreadsheets and some editors write UTF-8 with a byte-order mark; it is not part of the
    first column's name or of the first JSON row."""
    from services.builder.data import load_examples

    text = {
        ".jsonl": '{"ticket": "caf\u00e9", "category": "billing"}\n',
        ".json": '[{"ticket": "caf\u00e9", "category": "billing"}]',
        ".csv": "ticket,category\r\ncaf\u00e9,billing\r\n",
    }[suffix]
    path = tmp_path / f"train{suffix}"
    path.write_bytes(text.encode("utf-8-sig"))
    [example] = load_examples(path, ["ticket"], ["category"], "data.train")
    assert (example.ticket, example.category) == ("caf\u00e9", "billing")


def test_api_teacher_traces_are_metric_filtered_and_failures_counted(
    openai_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dspy

    from services.builder.data import load_examples
    from services.builder.metrics import exact_match
    from services.builder.pipeline import load_program
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import TeacherError, collect_traces

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test-not-a-real-key")
    data = balanced("train", 1)[:2]  # each answered ticket costs seconds of sampling
    # Three tickets far over the teacher server's 1024-token context: the API errors on them.
    data += [{"ticket": "my printer is broken " * 400, "category": "hardware"} for _ in range(3)]
    path = write_jsonl(tmp_path / "train.jsonl", data)
    program = load_program("examples.ticket_triage.program:build")
    trainset = load_examples(path, ["ticket"], ["category"], "data.train")
    teacher = TeacherSpec(
        model="openai/teacher-smol", api_base=openai_server, api_key_env="TEST_TEACHER_KEY",
        num_threads=2, max_failure_fraction=1.0, max_tokens=64,
    )  # fmt: skip
    lm_before = dspy.settings.lm
    counts = collect_traces(
        program=program, teacher=teacher, trainset=trainset, metric=exact_match,
        threshold=1.0, output_names=["category"], out_dir=tmp_path,
    )  # fmt: skip
    assert counts.total == 5 and counts.kept + counts.rejected + counts.failed == 5
    assert counts.failed >= 3
    failed = read_jsonl(tmp_path / "failed.jsonl")
    assert sum(len(f["inputs"]["ticket"]) > 5000 for f in failed) == 3
    kept = read_jsonl(tmp_path / "traces.jsonl")
    gold = {r["ticket"]: r["category"] for r in data}
    for trace in kept:  # only answers that pass the metric are kept
        assert trace["outputs"]["category"] == gold[trace["inputs"]["ticket"]]
    rejected = read_jsonl(tmp_path / "rejected.jsonl")
    for trace in rejected:
        assert trace["outputs"]["category"] != gold[trace["inputs"]["ticket"]]
    assert dspy.settings.lm is lm_before  # the teacher's LM was never made the global one

    strict = teacher.model_copy(update={"max_failure_fraction": 0.2})
    with pytest.raises(TeacherError, match=r"max_failure_fraction=0\.2"):
        collect_traces(  # the overlong tickets alone: every call fails
            program=program, teacher=strict, trainset=trainset[2:], metric=exact_match,
            threshold=1.0, output_names=["category"], out_dir=tmp_path,
        )  # fmt: skip
    # A server that is not there fails every call: the first one stops the build alone.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    unreachable = teacher.model_copy(update={"api_base": closed})
    with pytest.raises(TeacherError, match=r"first call failed: LMTransportError.*nothing else"):
        collect_traces(
            program=program, teacher=unreachable, trainset=trainset, metric=exact_match,
            threshold=1.0, output_names=["category"], out_dir=tmp_path,
        )  # fmt: skip
    # The key never lands on disk.
    for file in tmp_path.iterdir():
        assert "sk-test-not-a-real-key" not in file.read_text(errors="replace")


def test_api_teacher_evaluation_is_timed_tokened_and_priced(
    openai_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher's held-out answers from a real OpenAI-compatible server (llama-cpp-python's,
    SmolLM2): per-call latency, the server's own token counts, and the cost they come to at
    the spec's price."""
    from services.builder.cost import api_cost_per_1k
    from services.builder.evaluate import evaluate_teacher
    from services.builder.metrics import exact_match
    from services.builder.pipeline import load_program
    from services.builder.spec import CostSpec, TeacherSpec

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    program = load_program("examples.ticket_triage.program:build")
    import dspy

    examples = [dspy.Example(**r).with_inputs("ticket") for r in balanced("dev", 1)[:3]]
    teacher = TeacherSpec(model="openai/teacher-smol", api_base=openai_server, num_threads=1,
                          max_tokens=32)  # fmt: skip
    result = evaluate_teacher(
        program=program, teacher=teacher, examples=examples,
        splits=["calibration", "test", "test"], metric=exact_match, output_names=["category"],
    )  # fmt: skip
    assert result["n"] == 2 and not result["gold"]
    assert result["usage"]["calls"] >= 3  # one per example, more when DSPy retries a parse
    # ChatAdapter's system message alone is over 100 tokens of SmolLM2's tokenizer.
    assert result["prompt_tokens_per_call"] > 100 and result["completion_tokens_per_call"] > 0
    assert 0 < result["latency_p50_ms"] <= result["latency_p95_ms"]
    assert all(e["latency_ms"] > 0 for e in result["examples"])
    priced = api_cost_per_1k(
        prompt_tokens_per_call=result["prompt_tokens_per_call"],
        completion_tokens_per_call=result["completion_tokens_per_call"],
        cost=CostSpec(api_input_per_1m_tokens=1.0, api_output_per_1m_tokens=2.0),
        model=teacher.model,
    )  # fmt: skip
    assert priced is not None
    usage = result["usage"]
    by_hand = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6 / 3 * 1000
    assert priced["per_1k_calls"] == pytest.approx(by_hand)


def test_a_killed_build_leaves_no_bundle_and_a_rerun_resumes(
    tiny: tuple[Path, Path, object],
) -> None:
    spec, build, _ = tiny
    later = ("quantize", "evaluate", "calibrate", "package", "bundle")
    for name in later:
        shutil.rmtree(build / name, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "build", str(spec)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (build / ".quantize.partial").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "quantize never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-stage, as a power cut would
    proc.wait(30)
    assert not (build / "bundle").exists(), "a killed build must not leave a bundle"
    assert not (build / "quantize").exists(), "nor a finished-looking stage"

    rerun = run_build(spec)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in ("traces", "dataset", "student", "finetune", "export"):
        assert f"{stage}: inputs unchanged, skipped" in rerun.stdout
    for stage in ("quantize", "evaluate", "calibrate", "package"):
        assert f"• {stage}\n" in rerun.stdout
    Bundle.open(build / "bundle")  # complete and verified


EARLY_STAGES = ("traces", "dataset", "student", "finetune", "export")
LATE_STAGES = ("quantize", "evaluate", "calibrate", "package")


def fill(disk: Path) -> Path:
    """Write a filler until the filesystem is full; the filler's path."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


def assert_no_bundle_and_nothing_partial(build: Path) -> None:
    assert not (build / "bundle").exists(), "no bundle may be left after a failed build"
    leftovers = [p.name for p in build.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"partial outputs left behind: {leftovers}"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="a size-limited filesystem (tmpfs) needs root to mount; .ci/run runs as root",
)
def test_out_of_disk_leaves_no_bundle_and_a_rerun_resumes(
    tiny: tuple[Path, Path, object], tmp_path: Path
) -> None:
    spec, finished, _ = tiny
    disk = tmp_path / "disk"
    disk.mkdir()
    # 64 MB: the early stages (linked from the finished build) fit, the 145 MB Q8_0 does not.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:  # root without CAP_SYS_ADMIN (some containers)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        build = disk / "build"
        build.mkdir()
        for stage in EARLY_STAGES:
            (build / stage).symlink_to(finished / stage)

        failed = run_build(spec, "--output", str(build))
        assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
        message = " ".join(failed.stderr.split())  # rich wraps lines
        assert "out of disk space" in message and "run the build again" in message
        assert "Traceback" not in failed.stderr
        assert_no_bundle_and_nothing_partial(build)
        assert not (build / "quantize").exists()
        assert shutil.disk_usage(disk).used < 1 << 20, "the failed stage's output was not freed"

        subprocess.run(["mount", "-o", "remount,size=1g", str(disk)], check=True)
        resumed = run_build(spec, "--output", str(build))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        for stage in EARLY_STAGES:
            assert f"{stage}: inputs unchanged, skipped" in resumed.stdout
        for stage in LATE_STAGES:
            assert f"• {stage}\n" in resumed.stdout
        Bundle.open(build / "bundle")

        # Full again, now when only the bundle is left to write.
        shutil.rmtree(build / "bundle")
        filler = fill(disk)
        failed = run_build(spec, "--output", str(build))
        assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
        assert "out of disk space" in failed.stderr
        assert_no_bundle_and_nothing_partial(build)
        filler.unlink()
        resumed = run_build(spec, "--output", str(build))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "• package\n" in resumed.stdout and "quantize: inputs unchanged" in resumed.stdout
        Bundle.open(build / "bundle")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_hub_student_comes_from_the_local_cache_when_offline(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1: a hub id resolves from the local cache, or fails naming what to do."""
    cache = tmp_path / "hub"
    repo = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    probe = (
        "import sys; from services.builder.student import resolve_student\n"
        "from services.builder.spec import SpecError\n"
        "try:\n"
        "    s = resolve_student(sys.argv[1]); print(s.hf_dir, s.gguf)\n"
        "except SpecError as err:\n"
        "    print('SpecError:', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}

    def resolve(source: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", probe, source], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=120, check=True,
        ).stdout.strip()  # fmt: skip

    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == f"{snapshot} None"
    missing = resolve("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert missing.startswith("SpecError: student.source: HuggingFaceTB/SmolLM2-360M-Instruct is")
    assert "not in the local Hugging Face cache" in missing


def test_bootstrap_fewshot_teacher_keeps_only_demos_over_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """teacher.optimize=bootstrap_fewshot with a float metric: a bootstrapped demo must reach
    the threshold (DSPy's own filter would take any non-zero token F1). The teacher is the
    OpenAI-compatible STAND-IN, partly right on the first three questions."""
    import dspy

    from services.builder.data import load_examples
    from services.builder.metrics import token_f1
    from services.builder.pipeline import load_program
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import make_teacher
    from testkit.openai_standin import OpenAIStandIn

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    qa = REPO / "examples" / "technical_qa"
    questions = read_jsonl(qa / "train.jsonl")
    questions = [row for row in questions if len(row["answer"].split()) >= 4][:8]
    path = write_jsonl(tmp_path / "train.jsonl", questions)
    trainset = load_examples(path, ["question"], ["reasoning", "answer"], "data.train")
    answers = {row["question"]: row["answer"] for row in questions}
    partly_right = {row["question"] for row in questions[:3]}
    for question in partly_right:
        answers[question] = answers[question].split()[0] + " and nothing else of any use"
    by_question = {example["question"]: example for example in trainset}
    for question in partly_right:
        f1 = token_f1(by_question[question], dspy.Prediction(answer=answers[question]))
        assert 0 < f1 < 0.5
    program = load_program("examples.technical_qa.program:build")
    standin = OpenAIStandIn(answers, input_field="question", output_field="answer", reasoning=True)
    with standin as api:
        teacher = TeacherSpec(
            model="openai/standin-fewshot", api_base=api.base_url, optimize="bootstrap_fewshot"
        )
        compiled = make_teacher(program, teacher, trainset, token_f1, threshold=0.5)
    demos = [demo for demo in compiled.predictors()[0].demos if demo.get("augmented")]
    assert len(demos) == 4
    for demo in demos:
        assert demo["question"] not in partly_right
        assert demo["reasoning"].startswith("This asks about")
        example = by_question[demo["question"]]
        assert token_f1(example, dspy.Prediction(answer=demo["answer"])) >= 0.5


def test_mipro_light_teacher_runs_against_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """teacher.optimize=mipro_light end to end against an OpenAI-compatible API (the STAND-IN:
    it answers the optimizer's own prompts with a plain instruction): proposals and trials run
    on the teacher LM and the optimized program answers."""
    from services.builder.data import load_examples
    from services.builder.metrics import token_f1
    from services.builder.pipeline import load_program
    from services.builder.spec import TeacherSpec
    from services.builder.teacher import make_teacher
    from testkit.openai_standin import OpenAIStandIn

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    qa = REPO / "examples" / "technical_qa"
    questions = read_jsonl(qa / "train.jsonl")[:20]
    path = write_jsonl(tmp_path / "train.jsonl", questions)
    trainset = load_examples(path, ["question"], ["reasoning", "answer"], "data.train")
    answers = {row["question"]: row["answer"] for row in questions}
    program = load_program("examples.technical_qa.program:build")
    standin = OpenAIStandIn(answers, input_field="question", output_field="answer", reasoning=True)
    with standin as api:
        teacher = TeacherSpec(
            model="openai/standin-mipro", api_base=api.base_url, optimize="mipro_light",
            num_threads=2,
        )  # fmt: skip
        compiled = make_teacher(program, teacher, trainset, token_f1, threshold=0.5)
        prediction = compiled(question=questions[0]["question"])
    assert prediction.answer == questions[0]["answer"]
    assert api.requests > 2 * len(questions)  # instruction proposals and trials, not one pass


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_the_converter_unpacks_on_pythons_without_tarfiles_data_filter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_data_filter: bool
) -> None:
    """Debian 12's Python 3.11.2 (the CPU builder image's) has no `filter=` for extractall:
    the converter's files still unpack there, and a member leaving the folder is refused."""
    import io
    import tarfile

    from services.builder.student import ConversionError, _unpack_converter

    if not has_data_filter:  # as Python 3.11.2's tarfile is
        monkeypatch.delattr(tarfile, "data_filter")
        extractall = tarfile.TarFile.extractall

        def without_filter(self: Any, path: Any = ".", members: Any = None, **kw: Any) -> None:
            if kw:
                raise TypeError(
                    f"extractall() got an unexpected keyword argument {next(iter(kw))!r}"
                )
            extractall(self, path, members)

        monkeypatch.setattr(tarfile.TarFile, "extractall", without_filter)

    def sdist(path: Path, names: list[str]) -> Path:
        with tarfile.open(path, "w:gz") as archive:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 3
                archive.addfile(info, io.BytesIO(b"x=1"))
        return path

    root = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    good = sdist(tmp_path / "good.tar.gz", [root + "convert_hf_to_gguf.py", root + "README.md"])
    tree = _unpack_converter(good, tmp_path / "out")
    assert sorted(p.name for p in tree.iterdir()) == ["convert_hf_to_gguf.py"]
    bad = sdist(tmp_path / "bad.tar.gz", [root + "convert_hf_to_gguf.py",
                                          root + "gguf-py/../../../../../evil.py"])  # fmt: skip
    with pytest.raises((ConversionError, tarfile.TarError)):
        _unpack_converter(bad, tmp_path / "out2")
    assert not (tmp_path / "evil.py").exists()


def test_a_blank_reasoning_is_no_reasoning_to_teach(tmp_path: Path) -> None:
    """A ChainOfThought with a gold teacher needs a reasoning in every train row: a blank one
    (a CSV's empty column) would train the student to skip it, so it is refused like a
    missing one, with the count."""
    rows = [json.loads(line) for line in (REPO / "examples/technical_qa/train.jsonl")
            .read_text().splitlines()[:6]]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl",
                [{**row, "reasoning": "" if i else "Port 443 is HTTPS's."}
                 for i, row in enumerate(rows)])  # fmt: skip
    write_jsonl(tmp_path / "dev.jsonl", rows[:4])
    (tmp_path / "spec.yaml").write_text(
        "name: x\nprogram: examples.technical_qa.program:build\nmetric: token_f1\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl}}\noutput: {tmp_path / 'build'}\n"
    )
    refused = run_build(tmp_path / "spec.yaml")
    assert refused.returncode == 2, refused.stderr
    said = " ".join(refused.stderr.split())
    assert "gold has no 'reasoning' to teach" in said and "5 of 6 rows" in said, said


def test_quantizing_keeps_llama_cpps_per_tensor_log_to_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """SmolLM2's rows of 576 values are no whole number of Q4_K_M's 256-value blocks: llama.cpp
    logs a line per tensor (180 of them) as it falls back. The build prints one line for all."""
    from services.builder.export import quantize
    from testkit.processes import smollm2_gguf

    note = quantize(smollm2_gguf(), tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", 2)
    assert note is not None and re.fullmatch(
        r"\d+ of \d+ tensors quantized as [a-z0-9_, ]+ \(rows of 576 are no multiple of 256\)", note
    ), note
    said = capfd.readouterr()
    assert "not divisible" not in said.err + said.out
    assert quantize(smollm2_gguf(), tmp_path / "m.Q8_0.gguf", "Q8_0", 2) is None


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def build(:\n    pass\n",
         r"importing '{m}' raised SyntaxError: invalid syntax \(at .*{m}\.py:1\)"),
        ("import surely_not_installed_pkg\n", r"'{m}' imports 'surely_not_installed_pkg', which is "
         r"not installed in this environment \(.*\): pip install it here \(at .*{m}\.py:1\)"),
        ("from dspy import NotAThing\n", r"importing '{m}' raised ImportError: cannot import name "
         r"'NotAThing' from 'dspy' .*\(at .*{m}\.py:1\)"),
        ("def build():\n    raise RuntimeError('no key set')\n",
         r"program: {m}:build raised RuntimeError: no key set \(at .*{m}\.py:2\)"),
        ("def build():\n    return 42\n", r"build did not give a dspy\.Module \(it gave int 42\)"),
        ("import dspy\nclass build(dspy.Module):\n    def __init__(self, labels):\n"
         "        super().__init__()\n",
         r"program: {m}:build raised TypeError: .*missing 1 required positional argument: "
         r"'labels'; the build calls it with no arguments: name a function that makes it, e\.g\. "
         r"`def make\(\): return build\(\.\.\.\)`"),
    ],
)  # fmt: skip
def test_a_program_that_fails_to_load_is_named_at_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    """The user's code failing as it is imported or built is said in one line with where in
    their file, not as the CLI's traceback; a dependency it imports that is missing is not
    mistaken for the program file not being found."""
    from services.builder.context import load_program
    from services.builder.spec import SpecError

    module = f"prog_{abs(hash(source))}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match=message.format(m=module)):
        load_program(f"{module}:build")


def test_a_data_path_written_from_the_working_directory_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data/train.jsonl` in specs/spec.yaml is looked up as specs/data/train.jsonl; when the
    file is where the command was run from, the error says how to write it."""
    from services.builder.spec import SpecError, load_spec

    (tmp_path / "specs").mkdir()
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", balanced("train", 1))
    (tmp_path / "specs" / "spec.yaml").write_text(
        "name: x\nprogram: examples.ticket_triage.program:build\n"
        "data: {train: data/train.jsonl, dev: data/train.jsonl}\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"data.train: specs/data/train.jsonl does not exist; "
                       r"paths in a spec are relative to its folder \(specs\): write "
                       r"/.*/data/train.jsonl or \.\./data/train.jsonl"):  # fmt: skip
        load_spec(Path("specs/spec.yaml"))


def test_a_blank_csv_cell_of_an_optional_field_is_none(tmp_path: Path) -> None:
    """CSV has no null: an empty `age` cell of an `int | None` field is the label None (checked
    and trained as None); of a plain `int` it is still refused."""
    from services.builder.context import with_typed_labels
    from services.builder.data import check_values, load_examples
    from services.builder.spec import SpecError

    path = tmp_path / "train.csv"
    path.write_text("text,age\nI am Ana.,\nI am Ben at 27.,27\n")
    check_values(path, "data.train", {"age": int | None})
    examples = load_examples(path, ["text"], ["age"], "data.train")
    with_typed_labels(examples, {"age": int | None})
    assert [e.age for e in examples] == [None, 27]
    with pytest.raises(SpecError, match=r"row 2: age '' is not"):
        check_values(path, "data.train", {"age": int})


def test_a_metric_of_the_users_own_that_asks_an_lm_is_judged_by_metric_lm(tmp_path: Path) -> None:
    """A judge predictor inside the user's metric calls the context's LM, as
    `dspy.configure(lm=...)` gave it where the metric was written: the build's is metric_lm.
    Without one (and a gold teacher) the check on the train labels names the fix."""
    import dspy
    import yaml
    from rich.console import Console

    from services.builder.context import BuildContext
    from services.builder.spec import SpecError, load_spec
    from testkit.openai_standin import OpenAIStandIn

    rows = balanced("train", 1)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    spec = {"name": "judged", "program": "examples.ticket_triage.program:build",
            "metric": "tests.programs.judged:metric", "output": str(tmp_path / "build"),
            "data": {"train": "train.jsonl", "dev": "dev.jsonl"}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"No LM is loaded.*The metric calls an LM \(a judge\): "
                       r"set metric_lm"):  # fmt: skip
        BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
    teams = {r["category"]: "True" for r in rows}
    with OpenAIStandIn(teams, input_field="answer", output_field="correct") as api:
        spec["metric_lm"] = {"model": "openai/judge", "api_base": api.base_url}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        ctx = BuildContext.load(load_spec(tmp_path / "spec.yaml"), Console(quiet=True))
        asked = api.requests
        assert asked >= 1  # the labels were checked through the judge
        assert ctx.metric(ctx.trainset[0], dspy.Prediction(category="network")) == 1.0
        assert ctx.metric(ctx.trainset[0], dspy.Prediction(category="nowhere")) == 0.0
        assert api.requests > asked + 1  # each answer asked of the judge
    assert dspy.settings.lm is None  # never made the global LM


def test_a_program_file_named_like_a_module_python_has_says_rename_it(tmp_path: Path) -> None:
    """`dspy.py` importing dspy imports itself; `types.py` is never imported (Python's `types`
    already is): each build stops naming the file and the fix, not a circular-import puzzle or
    a missing attribute."""
    write_jsonl(tmp_path / "train.jsonl", balanced("train", 1))
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 1))
    program = "import dspy\n\n\nclass Triage(dspy.Signature):\n    '''x'''\n"
    for name, said in (
        ("dspy", "dspy.py imports the package it is named like"),
        ("types", "types.py is not what was imported: 'types' is already a module"),
    ):
        (tmp_path / f"{name}.py").write_text(program)
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"name: x\nprogram: {name}:build\n"
                        "data: {train: train.jsonl, dev: dev.jsonl}\n")  # fmt: skip
        proc = run_build(spec)
        message = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and said in message, proc.stderr
        assert "rename" in message and f"(e.g. my_{name}.py)" in message
        (tmp_path / f"{name}.py").unlink()


def test_build_check_reads_everything_asks_the_teacher_once_and_trains_nothing(
    tmp_path: Path,
) -> None:
    """`edgedistill build --check`: the spec, program, rows and labels checked and summarised,
    an API teacher asked the first train row (one request), nothing written under the build
    folder; a teacher that cannot be reached fails it (exit 1) naming the error, a bad row
    fails it (exit 2) as the build would."""
    from testkit.openai_standin import OpenAIStandIn

    train = balanced("train", 2)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", balanced("dev", 2))
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.format(gate=0.0, output=tmp_path / "build"))
    checked = run_build(spec, "--check")
    assert checked.returncode == 0, checked.stderr[-2000:]
    said = re.sub(r"\s+", " ", checked.stdout + checked.stderr)
    assert "ticket -> category" in said and "rows: 12 train, 6 calibration, 6 test" in said
    assert "checked" in said and not (tmp_path / "build").exists()

    gold = {row["ticket"]: row["category"] for row in train}
    with OpenAIStandIn(gold) as api:
        asked = run_build(spec, "--check", "--teacher-model", "openai/standin",
                          "--teacher-api-base", api.base_url)  # fmt: skip
        assert api.requests == 1
    said = re.sub(r"\s+", " ", asked.stdout + asked.stderr)
    assert asked.returncode == 0, said[-2000:]
    assert (f"answers train row 1: {{'category': '{train[0]['category']}'}}, scoring 1.00 "
            "against its labels (kept: metric_threshold 1)") in said  # fmt: skip
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = free.getsockname()[1]
    unreachable = run_build(spec, "--check", "--teacher-model", "openai/standin",
                            "--teacher-api-base", f"http://127.0.0.1:{dead}/v1")  # fmt: skip
    said = re.sub(r"\s+", " ", unreachable.stderr)
    assert unreachable.returncode == 1 and "openai/standin cannot be asked" in said, said

    write_jsonl(tmp_path / "train.jsonl", [*train, {"ticket": "x", "category": "printer"}])
    refused = run_build(spec, "--check")
    assert refused.returncode == 2 and "printer" in refused.stderr


def test_a_probed_choice_is_one_of_its_values(tmp_path: Path) -> None:
    """The probes' model in training writes a choice field as serving does: one of its values
    (a value that begins another, `card` of `card_arrival`, included), whatever its weights
    favour; here a randomly initialised model's, which unconstrained writes anything."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.builder.finetune import greedy_answers
    from testkit.tiny_models import smollm2_tokenizer, tiny_checkpoint

    folder = tiny_checkpoint("llama", smollm2_tokenizer(tmp_path / "tok"), tmp_path / "rnd")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompts = [[{"role": "user", "content": f"Ticket {i}: my card {'x' * i}"}] for i in range(24)]
    starts = ["[[ ## intent ## ]]\n"] * len(prompts)
    choices = ("card", "card_arrival", "exchange_rate", "None")
    free = greedy_answers(model, tokenizer, prompts, 12, "cpu", starts, ("\n",))
    chosen = greedy_answers(model, tokenizer, prompts, 12, "cpu", starts, ("\n",), choices)
    assert not set(free) & set(choices)
    assert set(chosen) <= set(choices) and len(set(chosen)) > 1


def test_a_teacher_whose_answers_do_not_parse_is_told_what_to_change() -> None:
    """Most calls failing to parse means the model cannot follow the program's format: the
    error says to change the teacher; other failures (a server error, a long input) do not."""
    from services.builder.teacher import unparsed_advice

    unparsed = {"error": "AdapterParseError: Failed to parse field relevant: ..."}
    other = {"error": "ContextWindowExceededError: the input is too long"}
    assert "use a stronger teacher model" in unparsed_advice([unparsed, unparsed, other])
    assert "2 of them" in unparsed_advice([unparsed, unparsed, other])
    assert unparsed_advice([unparsed, other, other]) == "" and unparsed_advice([]) == ""

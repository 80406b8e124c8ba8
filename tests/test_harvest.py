"""The edge harvest: the router records fallbacks (and sampled local answers) in 0600 files
under size and retention limits, never credentials; `edgedistill harvest export` packs them
with checksums (and a signature), `inspect` verifies and summarises, tampering is refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.core.harvest import HarvestError, HarvestRecord, pack, read_harvest, summary
from services.router.harvest import HarvestWriter, StoredFile, expired
from testkit.processes import REPO

PLANTED_KEY = "sk-planted-harvest-0ddba11-never-store"
PLANTED_TOKEN = "tok-planted-harvest-c0ffee"


def record(n: int, kind: str = "fallback") -> HarvestRecord:
    return HarvestRecord(
        time="2026-12-03T10:00:00+00:00", kind=kind, bundle="capitals@1",  # type: ignore[arg-type]
        inputs={"country": f"Country {n}"}, local_outputs={"capital": "?"}, local_confidence=0.2,
        local_outcome="PREDICT_OUTCOME_PARSED", api_outputs={"capital": f"City {n}"},
        route_reason="low_confidence",
    )  # fmt: skip


def test_retention_removes_the_oldest_files_first_and_never_the_newest() -> None:
    files = [StoredFile("a", 40, 900.0), StoredFile("b", 40, 500.0), StoredFile("c", 40, 10.0)]
    assert expired(files, None, None) == []
    assert expired(files, 100, None) == ["a"]  # 120 > 100: drop a, 80 left
    assert expired(files, 50, None) == ["a", "b"]
    assert expired(files, 10, None) == ["a", "b"]  # the newest stays, over the limit or not
    assert expired(files, None, 600.0) == ["a"]
    assert expired(files, None, 1.0) == ["a", "b"]


def test_the_writer_rotates_by_size_keeps_files_private_and_applies_retention(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "harvest"
    writer = HarvestWriter(folder, max_file_bytes=2000, max_records=None, max_age_s=None,
                           sample_rate=0.0)  # fmt: skip
    for n in range(30):
        writer.write(record(n))
    files = sorted(folder.glob("harvest-*.jsonl"))
    assert len(files) > 3 and all(f.stat().st_size <= 2000 for f in files)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert writer.records_on_disk() == 30

    capped = HarvestWriter(tmp_path / "capped", max_file_bytes=1 << 20, max_records=16,
                           max_age_s=None, sample_rate=0.0)  # fmt: skip
    for n in range(100):
        capped.write(record(n))
    assert 16 <= capped.records_on_disk() <= 16 + 16 // 8  # within an eighth of the limit

    old = sorted(folder.glob("harvest-*.jsonl"))[:2]
    for path in old:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    HarvestWriter(folder, max_file_bytes=2000, max_records=None, max_age_s=3600,
                  sample_rate=0.0)  # fmt: skip  # a restart applies the age limit
    assert not any(p.exists() for p in old)


def test_a_pack_round_trips_and_refuses_tampering_and_a_missing_signature(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "harvest"
    writer = HarvestWriter(folder, max_file_bytes=3000, max_records=None, max_age_s=None,
                           sample_rate=0.0)  # fmt: skip
    for n in range(12):
        writer.write(record(n, "fallback" if n % 3 else "sample"))
    out = tmp_path / "harvest.tar"
    manifest = pack(folder, out)
    assert manifest["records"] == 12
    records = read_harvest(out)
    assert sorted(r.inputs["country"] for r in records) == sorted(f"Country {n}" for n in range(12))
    assert summary(records)["kinds"] == {"sample": 4, "fallback": 8}

    tampered = tmp_path / "tampered.tar"
    data = bytearray(out.read_bytes())
    at = data.find(b"City 5")
    data[at : at + 6] = b"City 6"
    tampered.write_bytes(bytes(data))
    with pytest.raises(HarvestError, match="does not match its checksum"):
        read_harvest(tampered)

    from services.builder.ship import generate_keypair

    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    with pytest.raises(HarvestError, match="not signed"):
        read_harvest(out, tmp_path / "key.pub")
    signed = tmp_path / "signed.tar"
    pack(folder, signed, tmp_path / "key.pem")
    assert len(read_harvest(signed, tmp_path / "key.pub")) == 12
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    with pytest.raises(HarvestError, match="signature does not verify"):
        read_harvest(signed, tmp_path / "other.pub")


def test_the_router_harvests_fallbacks_and_samples_without_credentials(
    tmp_path: Path, gguf_path: Path
) -> None:
    from services.core.client import InferenceClient
    from testkit.bundles import CAPITALS_PROGRAM, make_bundle
    from testkit.openai_standin import OpenAIStandIn
    from testkit.processes import free_port, start_router, start_runtime

    bundle = make_bundle(tmp_path / "bundle", gguf_path, CAPITALS_PROGRAM)
    token = tmp_path / "token"
    token.write_text(PLANTED_TOKEN)
    runtime = start_runtime("--bundle", str(bundle), "--n-ctx", "1024",
                            "--auth-token-file", str(token))  # fmt: skip
    harvest, metrics_port = tmp_path / "harvest", free_port()
    answers = {"Chile": "Santiago", "Peru": "Lima"}
    with OpenAIStandIn(answers, input_field="country", output_field="capital") as api:
        # Every answer is below a 1.01 threshold: each call falls back and is harvested.
        router = start_router(
            bundle, runtime.target, "--threshold", "1.01", "--fallback-model", "openai/gold",
            "--fallback-api-base", api.base_url, "--fallback-key-env", "PLANTED_API_KEY",
            "--local-token-file", str(token), "--harvest", str(harvest),
            "--metrics-port", str(metrics_port), env={"PLANTED_API_KEY": PLANTED_KEY},
        )  # fmt: skip
        try:
            with InferenceClient(router.target, timeout_s=60) as client:
                for country in ("Chile", "Peru"):
                    client.predict({"country": country})
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        finally:
            router.terminate()
        sampled = start_router(
            bundle, runtime.target, "--threshold", "0.0", "--mode", "local_only",
            "--local-token-file", str(token), "--harvest", str(harvest),
            "--harvest-sample-rate", "1.0",
        )  # fmt: skip
        try:
            with InferenceClient(sampled.target, timeout_s=60) as client:
                client.predict({"country": "Norway"})
        finally:
            sampled.terminate()
            runtime.terminate()
    assert b'edgedistill_router_harvested_total{kind="fallback"} 2.0' in metrics
    stored = b"".join(p.read_bytes() for p in harvest.glob("harvest-*.jsonl"))
    assert PLANTED_KEY.encode() not in stored and PLANTED_TOKEN.encode() not in stored

    out = tmp_path / "harvest.tar"
    cli = [sys.executable, "-m", "services.cli", "harvest"]
    exported = subprocess.run([*cli, "export", str(harvest), str(out)], cwd=REPO,
                              capture_output=True, text=True)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "3 records" in exported.stdout
    inspected = subprocess.run([*cli, "inspect", str(out), "--json"], cwd=REPO,
                               capture_output=True, text=True)  # fmt: skip
    facts = json.loads(inspected.stdout)
    assert facts["kinds"] == {"fallback": 2, "sample": 1} and facts["with_api_answer"] == 2
    records = {r.inputs["country"]: r for r in read_harvest(out)}
    assert records["Chile"].api_outputs == {"capital": "Santiago"}
    assert records["Chile"].route_reason == "low_confidence"
    assert records["Chile"].local_outputs and records["Chile"].local_confidence is not None
    assert records["Norway"].kind == "sample" and records["Norway"].api_outputs is None

    missing = subprocess.run([*cli, "export", str(tmp_path / "nowhere"), str(out)], cwd=REPO,
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "give the router's --harvest DIR" in missing.stderr


def test_the_intake_keeps_new_api_answers_and_never_a_held_out_input() -> None:
    import dspy

    from services.builder.data import input_key
    from services.builder.harvested import harvested_traces
    from services.builder.metrics import exact_match

    def rec(country: str, api: str | None, local: str = "?") -> HarvestRecord:
        return record(0).model_copy(update={
            "inputs": {"country": country}, "local_outputs": {"capital": local},
            "api_outputs": {"capital": api} if api else None,
        })  # fmt: skip

    train = dspy.Example(country="Peru", capital="Lima").with_inputs("country")
    records = [rec("Chile", "Santiago"), rec("  chile ", "Santiago"),  # the same input
               rec("Kenya", "Nairobi"), rec("Peru", "Cusco"), rec("Japan", None),
               rec("Norway", "Oslo", local="Oslo")]  # fmt: skip
    kept, counts = harvested_traces(
        records, input_names=["country"], output_names=["capital"],
        held_out={input_key({"country": "Kenya"})}, taken=set(),
        labelled={input_key({"country": "Peru"}): train}, metric=exact_match, threshold=1.0,
    )  # fmt: skip
    assert [t["inputs"]["country"] for t in kept] == ["Chile", "Norway"]
    assert counts == {"records": 6, "kept": 2, "duplicate": 1, "held_out_input": 1,
                      "rejected_by_metric": 1, "no_api_answer": 1}  # fmt: skip
    assert kept[1]["local_outputs"] == {"capital": "Oslo"}
    with pytest.raises(ValueError, match="from another program"):
        harvested_traces([record(1).model_copy(update={"inputs": {"city": "x"}})],
                         input_names=["country"], output_names=["capital"], held_out=set(),
                         taken=set(), labelled={}, metric=exact_match, threshold=1.0)  # fmt: skip

"""Settings and the CLI: wrong settings and bad model files are refused at start, by name."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.config import RuntimeSettings, SettingsError, load_settings
from testkit.processes import REPO, ServerProcess, start_runtime


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_settings_read_environment_and_flags_win(
    gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEDISTILL_N_CTX", "1024")
    monkeypatch.setenv("EDGEDISTILL_MAX_QUEUE", "3")
    settings = load_settings(RuntimeSettings, model=str(gguf_path), max_queue="7")
    assert settings.n_ctx == 1024 and settings.max_queue == 7


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"n_ctx": "12"}, "n_ctx (--n-ctx / EDGEDISTILL_N_CTX)"),
        ({"port": "70000"}, "port (--port / EDGEDISTILL_PORT)"),
        ({"max_queue": "many"}, "max_queue (--max-queue / EDGEDISTILL_MAX_QUEUE)"),
        ({"kv_cache_type": "q3"}, "kv_cache_type (--kv-cache-type / EDGEDISTILL_KV_CACHE_TYPE)"),
        ({"embed_ctx": "8"}, "embed_ctx (--embed-ctx / EDGEDISTILL_EMBED_CTX)"),
        ({"model": "/nonexistent.gguf"}, "model (--model / EDGEDISTILL_MODEL)"),
        ({"bogus": "1"}, "bogus"),
    ],
)
def test_wrong_setting_is_named(gguf_path: Path, overrides: dict[str, str], named: str) -> None:
    base = {"model": str(gguf_path)}
    with pytest.raises(SettingsError) as caught:
        load_settings(RuntimeSettings, **{**base, **overrides})
    assert named in str(caught.value)


def test_serve_without_a_model_says_what_to_give() -> None:
    proc = run_cli("serve", "--port", "0")
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "--bundle" in proc.stderr


def test_route_names_its_own_variables() -> None:
    """The router's settings read EDGEDISTILL_ROUTER_*, and its errors say so (once)."""
    proc = run_cli("route", "--port", "0", "--fallback-model", "openai/x")
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "local (--local / EDGEDISTILL_ROUTER_LOCAL)" in said, said


def test_serve_rejects_bad_env_setting(gguf_path: Path) -> None:
    proc = run_cli("serve", "--model", str(gguf_path), env={"EDGEDISTILL_N_THREADS": "0"})
    assert proc.returncode == 2
    assert "EDGEDISTILL_N_THREADS" in proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_gguf_is_refused_at_start(gguf_path: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad.gguf"
    data = gguf_path.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"GGUF" + b"\xff" * 4096)
    else:
        bad.write_bytes(b"")
    proc = run_cli("serve", "--model", str(bad), "--port", "0", "--metrics-port", "0")
    assert proc.returncode == 3, proc.stderr
    assert "cannot serve" in proc.stderr and "bad.gguf" in proc.stderr


def test_a_port_another_process_holds_is_named_with_the_fix(gguf_path: Path) -> None:
    """A second server on a taken gRPC or metrics port says which port, what the OS said and
    what to pass, before the model loads (not gRPC's 'Failed to bind' traceback)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        grpc_port = run_cli("serve", str(gguf_path), "--port", port, "--metrics-port", "0")
        metrics_port = run_cli("serve", str(gguf_path), "--port", "0", "--metrics-port", port)
    said = " ".join(grpc_port.stderr.split())
    assert grpc_port.returncode == 3, said
    assert f"port: cannot listen on 127.0.0.1:{port} (Address already in use)" in said, said
    assert "choose another --port" in said and "Traceback" not in said
    said = " ".join(metrics_port.stderr.split())
    assert metrics_port.returncode == 3, said
    assert f"metrics_port: cannot listen on 127.0.0.1:{port} (Address already in use)" in said
    assert "or 0 to turn metrics off" in said and "Traceback" not in said


def test_serve_takes_the_model_or_bundle_as_its_argument(tmp_path: Path, gguf_path: Path) -> None:
    """`edgedistill serve build/bundle` or `serve model.gguf`, as `ollama run` takes its model."""
    from services.cli.serve import served_path

    assert served_path(str(tmp_path), {}) == {"bundle": str(tmp_path)}
    assert served_path(str(gguf_path), {"bundle": None}) == {"model": str(gguf_path)}
    with pytest.raises(SettingsError, match="give the bundle or model once"):
        served_path(str(gguf_path), {"model": str(gguf_path)})
    missing = run_cli("serve", str(tmp_path / "nope.gguf"), "--port", "0")
    assert missing.returncode == 2
    assert "nope.gguf: no such file or directory" in " ".join(missing.stderr.split())
    twice = run_cli("route", str(tmp_path), "--bundle", str(tmp_path), "--port", "0")
    assert twice.returncode == 2 and "as PATH or as --bundle" in twice.stderr


def test_rows_answers_are_tallied_against_the_rows_labels() -> None:
    """--rows' pure parts: only the program's inputs are sent; an answer agrees with a row's
    label as the build counts labels (a CSV's text `3` is the int 3, case and spaces aside);
    the summary counts rows, failures, outcomes and who answered."""
    from services.cli.rows import Tally, agrees, load_rows, request_inputs
    from services.core.rows import RowsError

    with pytest.raises(RowsError, match=r"--rows: nope\.csv: no such file"):
        load_rows("nope.csv")

    assert request_inputs({"country": "Norway", "capital": "Oslo", "id": 7}, ["country"]) == {
        "country": "Norway"
    }
    assert request_inputs({"id": 7}, ["country"]) == {}  # the server names what is missing
    assert agrees(3, "3") and agrees("Oslo ", "oslo") and agrees(["a", "b"], '["a", "b"]')
    assert not agrees("Bergen", "Oslo") and not agrees(True, "no")

    tally = Tally()
    parsed = {"outcome": "PREDICT_OUTCOME_PARSED", "served_by": "SERVED_BY_LOCAL"}
    tally.add({"capital": "Oslo"}, {**parsed, "outputs": {"capital": "Oslo"}}, ["capital"])
    tally.add({"capital": "Oslo"}, {**parsed, "outputs": {"capital": "Bergen"}}, ["capital"])
    tally.add({"capital": "Oslo"}, {"outcome": "PREDICT_OUTCOME_UNPARSED",
                                    "served_by": "SERVED_BY_LOCAL"}, ["capital"])  # fmt: skip
    tally.add({}, {**parsed, "outputs": {"capital": "Rome"}}, ["capital"])  # no label: not compared
    tally.add({"capital": "Oslo"}, {"error": {"code": "INVALID_ARGUMENT"}}, ["capital"])
    said = tally.summary()
    assert said[0] == "answered 4 of 5 rows; 1 failed (their lines say why)"
    assert said[1] == "outcome: parsed 3, unparsed 1; by: local 4"
    assert said[2].startswith("capital: 1 of 3 answers agree with the rows' capital (33.3%, 95%")


def test_cli_predict_answers_every_row_of_a_file(runtime: ServerProcess, tmp_path: Path) -> None:
    """`predict --rows`: a JSON line per row in the file's order (JSONL, CSV, stdin); a row
    the server refuses is a line naming the field, the rows after it are answered, and the
    command exits 1; the summary compares answers with the rows' labels."""
    one = run_cli("predict", "--target", runtime.target, "--json", "--input", "country=Norway")
    answer = json.loads(one.stdout)["outputs"]["capital"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"country": "Norway", "capital": answer, "id": 1}) + "\n"
        + json.dumps({"nation": "Peru"}) + "\n\n"
        + json.dumps({"country": "Norway", "capital": "Atlantis"}) + "\n"
    )  # fmt: skip
    done = run_cli("predict", "--target", runtime.target, "--rows", str(rows),
                   "--concurrency", "2")  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["row"] for line in lines] == ["line 1", "line 2", "line 4"]
    assert lines[0]["outputs"] == lines[2]["outputs"] == {"capital": answer}
    assert lines[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert "country" in lines[1]["error"]["message"]
    said = " ".join(done.stderr.split())
    assert "answered 2 of 3 rows; 1 failed" in said
    assert "capital: 1 of 2 answers agree with the rows' capital" in said

    table = tmp_path / "rows.csv"
    table.write_text("country,capital\nNorway,Oslo\nNorway,Oslo\n")
    from_csv = run_cli("predict", "--target", runtime.target, "--rows", str(table))
    assert from_csv.returncode == 0, from_csv.stderr
    assert [json.loads(line)["row"] for line in from_csv.stdout.splitlines()] == ["row 2", "row 3"]

    piped = subprocess.run(
        [sys.executable, "-m", "services.cli", "predict", "--target", runtime.target,
         "--rows", "-"], cwd=REPO, capture_output=True, text=True, timeout=120,
        input='{"country": "Norway"}\n',
    )  # fmt: skip
    assert piped.returncode == 0 and json.loads(piped.stdout)["outputs"] == {"capital": answer}

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"country": "Norway"}\n{"country": \n')
    refused = run_cli("predict", "--target", runtime.target, "--rows", str(broken))
    assert refused.returncode == 2 and "line 2: not JSON" in " ".join(refused.stderr.split())
    assert refused.stdout == ""  # nothing is asked before the whole file reads
    both = run_cli("predict", "--target", runtime.target, "--rows", str(rows), "-i", "country=x")
    assert both.returncode == 2 and "pick one" in both.stderr


def test_cli_predict_generate_and_info(gguf_path: Path, program_path: Path, tmp_path: Path) -> None:
    server = start_runtime(str(gguf_path), "--program", str(program_path))
    try:
        predicted = run_cli("predict", "--target", server.target, "--input", "country=Norway")
        assert predicted.returncode == 0, predicted.stderr
        assert predicted.stdout.startswith("capital: ")
        assert "parsed" in predicted.stderr and "confidence" in predicted.stderr

        bad = run_cli("predict", "--target", server.target, "--input", "nation=Norway")
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "inputs['nation']" in bad.stderr

        malformed = run_cli("predict", "--target", server.target, "--input", "Norway")
        assert malformed.returncode == 2 and "name=value" in malformed.stderr

        document = program_path.parent / "country.txt"
        document.write_text("Norway")
        from_file = run_cli("predict", "--target", server.target, "--input-file",
                            f"country={document}")  # fmt: skip
        assert from_file.stdout == predicted.stdout, from_file.stderr
        missing = run_cli("predict", "--target", server.target, "--input-file", "country=nope.txt")
        said = " ".join(missing.stderr.split())
        assert missing.returncode == 2 and "--input-file country=nope.txt: No such file" in said

        generated = run_cli(
            "generate", "--target", server.target, "--max-tokens", "8", "--temperature", "0", "Hi"
        )
        assert generated.returncode == 0, generated.stderr
        assert generated.stdout.strip() and "tokens" in generated.stderr
        greedy = ("--target", server.target, "--max-tokens", "8", "--temperature", "0")
        continued = run_cli("generate", *greedy, "--raw", "The capital of France is")
        from services.core.client import InferenceClient

        with InferenceClient(server.target) as client:  # the text continued as it is
            chunks = client.generate([], prompt="The capital of France is", max_tokens=8,
                                     temperature=0)  # fmt: skip
            assert continued.stdout.strip() == "".join(c.text for c in chunks).strip()
        assert continued.returncode == 0 and continued.stdout.strip(), continued.stderr
        probed = run_cli("generate", *greedy, "--logprobs", "2", "Hi")
        assert probed.stdout == generated.stdout, probed.stderr  # the same answer, then a table
        row = re.compile(r"^\s*(['\"]).*\1\s+([01]\.\d{3})\s+(-\d+\.\d{3}|0\.000)\s")
        rows = [found for line in probed.stderr.splitlines() if (found := row.match(line))]
        assert 1 <= len(rows) <= 8, probed.stderr  # a row per token: probability, logprob
        assert all(math.isclose(float(r[2]), math.exp(float(r[3])), abs_tol=2e-3) for r in rows)
        counted = run_cli("tokenize", "--target", server.target, "Hi")
        raw_count = run_cli("tokenize", "--target", server.target, "--raw", "Hi there")
        with InferenceClient(server.target) as client:
            chat = client.tokenize([("user", "Hi")])
            text = client.tokenize(prompt="Hi there", with_pieces=True)
        assert f"{len(chat.tokens)} tokens of a " in counted.stderr, counted.stderr
        assert counted.stdout.startswith(f"{chat.tokens[0]}:'<|im_start|>' ")  # as the model has it
        listed = " ".join(f"{t}:{p.token!r}" for t, p in zip(text.tokens, text.pieces, strict=True))
        assert raw_count.stdout.strip() == listed, raw_count.stderr
        too_many = run_cli("generate", *greedy, "--logprobs", "21", "Hi")
        assert too_many.returncode == 2 and "--logprobs 21: use 0..20" in too_many.stderr
        (tmp_path / "yes.gbnf").write_text('root ::= "yes" | "no"\n')
        for grammar in ('root ::= "yes" | "no"', f"@{tmp_path / 'yes.gbnf'}"):
            answered = run_cli("generate", *greedy[:-1], "1.5", "--grammar", grammar, "Wet?")
            assert answered.stdout.strip() in ("yes", "no"), answered.stderr
        unparsed = run_cli("generate", *greedy, "--grammar", "root ::= x", "Wet?")
        assert unparsed.returncode == 1 and "Undefined rule identifier 'x'" in unparsed.stderr
        no_file = run_cli("generate", *greedy, "--grammar", "@nope.gbnf", "Wet?")
        assert no_file.returncode == 2 and "--grammar @nope.gbnf: No such file" in no_file.stderr
        with InferenceClient(server.target) as client:  # the greedy answer's first token, banned
            first = client.tokenize(prompt=generated.stdout.strip(), bare=True).tokens[0]
        banned = run_cli("generate", *greedy, "--logit-bias", f"{first}=-100", "Hi")
        assert banned.returncode == 0 and banned.stdout != generated.stdout, banned.stderr
        not_an_id = run_cli("generate", *greedy, "--logit-bias", "hello=-100", "Hi")
        assert not_an_id.returncode == 2 and "write it as TOKEN_ID=BIAS" in not_an_id.stderr

        info = run_cli("info", "--target", server.target)
        assert '"quantization": "Q4_1"' in info.stdout
    finally:
        server.terminate()


def test_json_output_keeps_characters_readable(capsys: pytest.CaptureFixture[str]) -> None:
    """`--json` (predict, info, harvest inspect) prints `日本語` as such: still JSON."""
    from services.cli.common import print_json

    print_json({"idioma": "日本語", "producto": None})
    out = capsys.readouterr().out
    assert '"idioma": "日本語"' in out and json.loads(out) == {"idioma": "日本語", "producto": None}


def test_errors_quoting_a_type_print_it_whole(capsys: pytest.CaptureFixture[str]) -> None:
    """`list[str]` in a message is text: rich markup would have eaten `[str]`."""
    from services.cli.common import fail

    fail("inputs['tags']: '[1]' is not of type list[str] ([bold] stays too)")
    said = " ".join(capsys.readouterr().err.split())
    assert "is not of type list[str] ([bold] stays too)" in said, said


def test_chat_entries_are_lines_or_blocks_and_commands_change_the_conversation() -> None:
    from services.cli.chat import HELP, Conversation, command, entries

    typed = ["Hi\n", "\n", '"""first\n', "second\n", 'third"""\n', '"""one line"""\n',
             '"""unended\n', "end"]  # fmt: skip
    assert list(entries(typed)) == ["Hi", "first\nsecond\nthird", "one line", "unended\nend"]
    talk = Conversation(system="Be brief.")
    assert talk.messages("a") == [("system", "Be brief."), ("user", "a")]
    talk.answered("a", "b")
    assert talk.messages("c") == [("system", "Be brief."), ("user", "a"), ("assistant", "b"),
                                  ("user", "c")]  # fmt: skip
    assert command("a message", talk) is None
    assert command("/set system Answer in French.", talk) == "Set the system message."
    assert talk.system == "Answer in French."
    assert command("/clear", talk) == "Cleared the conversation." and not talk.turns
    assert talk.messages("c") == [("system", "Answer in French."), ("user", "c")]
    assert command("/set system", talk) == "Removed the system message." and talk.system is None
    assert command("/bye", talk) == "bye" and command("/?", talk) == HELP
    assert command("/nope", talk) == "unknown command /nope; /? lists them"


def test_chat_keeps_the_conversation_and_piped_lines_are_turns(gguf_path: Path) -> None:
    """`edgedistill chat`, as `ollama run`: each turn is Generate over the whole conversation
    so far (greedy: the answers gRPC gives that chat), /clear forgets it, /bye ends; with piped
    input the first failed turn ends it with exit 1, naming /clear."""
    from services.core.client import InferenceClient

    server = start_runtime(str(gguf_path), "--n-ctx", "512")
    try:
        greedy = ("chat", "--target", server.target, "--max-tokens", "12", "--temperature", "0")
        typed = "Name three colours.\nAnd two more?\n/clear\nName three colours.\n/bye\nNo.\n"
        talked = subprocess.run([sys.executable, "-m", "services.cli", *greedy], input=typed,
                                cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert talked.returncode == 0, talked.stderr
        with InferenceClient(server.target) as client:

            def answer(messages: list[tuple[str, str]]) -> str:
                chunks = client.generate(messages, max_tokens=12, temperature=0)
                return "".join(chunk.text for chunk in chunks)

            first = answer([("user", "Name three colours.")])
            second = answer([("user", "Name three colours."), ("assistant", first),
                             ("user", "And two more?")])  # fmt: skip
        assert first != second
        assert talked.stdout == f"{first}\n\n{second}\n\n{first}\n\n"  # "No." is never sent
        assert "Cleared the conversation." in talked.stderr
        overflow = subprocess.run([sys.executable, "-m", "services.cli", *greedy],
                                  input="Tell me a long story. " * 100 + "\nHi\n", cwd=REPO,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        said = " ".join(overflow.stderr.split())
        assert overflow.returncode == 1 and overflow.stdout.strip() == ""
        assert "over the context of 512" in said and "/clear starts over" in said
    finally:
        server.terminate()

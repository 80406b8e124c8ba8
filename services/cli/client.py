"""Client commands: `predict`, `generate`, `info`, `health` against a runtime or router."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from services.cli.common import TargetOption, TimeoutOption, app, err_console, fail, print_json
from services.core.sampling import TOP_LOGPROBS_LIMIT


def connect(target: str, timeout: float) -> Any:
    """A client of the runtime or router at `target`, with EDGEDISTILL_CLIENT_* security."""
    from services.core.client import InferenceClient

    credentials, token = _client_security()
    return InferenceClient(target, timeout_s=timeout, credentials=credentials, token=token)


def _client_security() -> tuple[Any, str | None]:
    """TLS credentials and token from EDGEDISTILL_CLIENT_* (a clear message when wrong)."""
    from services.core.config import ClientSettings, SettingsError, load_settings
    from services.core.security import channel_credentials

    try:
        settings = load_settings(ClientSettings)
        credentials = (
            channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
            if settings.uses_tls
            else None
        )
        return credentials, settings.token()
    except (SettingsError, OSError) as err:
        raise fail(f"client settings (EDGEDISTILL_CLIENT_*): {err}", code=2) from None


def rpc_failure(err: Exception) -> typer.Exit:
    import grpc

    if isinstance(err, grpc.RpcError):
        return fail(f"{err.code().name}: {err.details()}", code=1)
    raise err


@app.command("predict")
def predict(
    target: TargetOption = "127.0.0.1:50051",
    inputs: Annotated[
        list[str], typer.Option("--input", "-i", help="an input field as name=value (repeat)")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    input_files: Annotated[
        list[str], typer.Option("--input-file", help="an input field read from a file: name=path")
    ] = [],  # noqa: B006
    max_tokens: Annotated[Optional[int], typer.Option(help="most tokens to generate")] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option(help="0 is greedy")] = None,  # noqa: UP045
    raw: Annotated[bool, typer.Option("--raw", help="also print the model's raw text")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="print the values as the model writes them")
    ] = False,
    rows: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="each row of a JSONL, JSON or CSV file (-: stdin): a JSON line each"),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="with --rows: calls in flight at once")] = 4,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Run the served DSPy program once: --input field=value ... -> output fields; or on every
    row of a file (--rows)."""
    import grpc

    options = {"max_tokens": max_tokens, "temperature": temperature, "include_raw_text": raw}
    if rows is not None:
        if inputs or input_files or stream:
            raise fail("--rows answers each row of a file; --input, --input-file and --stream "
                       "are for one call: pick one")  # fmt: skip
        _predict_rows(target, timeout, rows, concurrency, options)
        return
    values = {**named_values(inputs, "--input"), **file_values(input_files)}
    if stream and as_json:
        raise fail("--stream prints text as it comes; --json prints the whole response: pick one")
    try:
        with connect(target, timeout) as client:
            reply = (
                _streamed(client.predict_stream(values, **options))
                if stream
                else client.predict(values, **options)
            )
    except grpc.RpcError as err:
        raise rpc_failure(err) from None
    typed = json.loads(reply.outputs_json) if reply.outputs_json else None
    if stream:
        _summary(reply)
        return
    if as_json:
        print_json(_response_data(reply))
        return
    for name, value in (typed or dict(reply.outputs)).items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(f"{name}: {text}")
    _summary(reply)


def _response_data(reply: Any) -> dict[str, Any]:
    """A PredictResponse as JSON, its outputs typed in the signature's order (not the map)."""
    from google.protobuf.json_format import MessageToDict

    data: dict[str, Any] = MessageToDict(reply, preserving_proto_field_name=True)
    if reply.outputs_json:
        data.pop("outputs_json")
        data["outputs"] = json.loads(reply.outputs_json)
    return data


def _predict_rows(
    target: str, timeout: float, source: str, concurrency: int, options: dict[str, Any]
) -> None:
    """Each row answered (services/cli/rows.py), its line printed as the file's order allows;
    exit 1 when any row failed."""
    import grpc

    from services.cli import rows as batch
    from services.core.rows import RowsError

    if concurrency < 1:
        raise fail(f"--concurrency {concurrency}: at least 1 call must be in flight")
    try:
        found = batch.load_rows(source)
    except RowsError as err:
        raise fail(str(err)) from None
    with connect(target, timeout) as client:
        try:
            signature = client.info().signature
        except grpc.RpcError as err:
            raise rpc_failure(err) from None
        if not signature.input_fields:
            raise fail(f"{target} serves no program: --rows answers a program's inputs", code=1)
        input_names = [f.name for f in signature.input_fields]
        output_names = [f.name for f in signature.output_fields]

        def answer(row: dict[str, Any]) -> dict[str, Any]:
            try:
                reply = client.predict(batch.request_inputs(row, input_names), **options)
            except grpc.RpcError as err:
                return {"error": {"code": err.code().name, "message": err.details()}}
            return _response_data(reply)

        tally = batch.Tally()
        for (where, row), line in batch.answered_in_order(found, answer, concurrency):
            print(batch.json_line(where, line), flush=True)
            tally.add(row, line, output_names)
    for said in tally.summary():
        err_console.print(said, highlight=False, soft_wrap=True)
    if tally.failed:
        raise typer.Exit(1)


def _streamed(chunks: Any) -> Any:
    """Print each value as it is written (`field: text`, a line per field; a multi-step
    program's steps' fields too), then give the response."""
    from services.core.predict_stream import restart_note

    shown: tuple[str, str] | None = None
    for chunk in chunks:
        if chunk.HasField("response"):
            if shown is not None:
                print()
            return chunk.response
        if chunk.HasField("restart"):  # a router withdrew what it sent: a new answer follows
            if shown is not None:
                print()
            shown = None
            err_console.print(f"[dim]{restart_note(chunk.restart)}[/]", highlight=False)
            continue
        delta = chunk.delta
        if (delta.predictor, delta.field) != shown:
            sys.stdout.write(("\n" if shown else "") + f"{delta.field}: ")
            shown = (delta.predictor, delta.field)
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    raise fail("the stream ended without a response", code=1)


def _summary(reply: Any) -> None:
    """The call's outcome, confidence, who answered, tokens and time on stderr; the raw text,
    when the answer carries it, on stdout."""
    from services.core.api import pb

    outcome = pb.PredictOutcome.Name(reply.outcome).removeprefix("PREDICT_OUTCOME_").lower()
    served = pb.ServedBy.Name(reply.served_by).removeprefix("SERVED_BY_").lower()
    calls = f"{len(reply.lm_calls)} LM calls · " if len(reply.lm_calls) > 1 else ""
    err_console.print(
        f"[dim]{outcome} · confidence {reply.confidence:.3f} · {served} ({reply.model_id}) · "
        f"{calls}{reply.usage.prompt_tokens}+{reply.usage.completion_tokens} tokens · "
        f"{reply.latency_ms:.0f} ms[/]",
        highlight=False,
    )
    if reply.raw_text:
        err_console.print("[dim]raw:[/]", highlight=False)
        print(reply.raw_text)


def named_values(items: list[str], flag: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise fail(f"{flag} {item!r}: write it as name=value, e.g. --input ticket='VPN down'")
        values[name] = value
    return values


def file_values(items: list[str]) -> dict[str, str]:
    """`--input-file name=path`: the field's value is the file's text (a long document, a
    conversation's JSON)."""
    values = named_values(items, "--input-file")
    for name, path in values.items():
        try:
            with open(path, encoding="utf-8") as handle:
                values[name] = handle.read()
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise fail(f"--input-file {name}={path}: {why}") from None
    return values


def _chat(text: str, system: str | None, raw: bool) -> list[tuple[str, str]]:
    """The chat `generate` and `tokenize` send: the system message and the user's, or none
    with --raw (the text goes as it is)."""
    if raw and system:
        raise fail("--system is a chat message; with --raw, put it in the text")
    return [] if raw else ([("system", system)] if system else []) + [("user", text)]


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message (with --raw: the text)")],
    target: TargetOption = "127.0.0.1:50051",
    system: Annotated[Optional[str], typer.Option(help="a system message")] = None,  # noqa: UP045
    raw: Annotated[bool, typer.Option(help="continue the text as it is, no chat template")] = False,
    max_tokens: Annotated[Optional[int], typer.Option(help="most tokens to generate")] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option(help="0 is greedy")] = None,  # noqa: UP045
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = None,  # noqa: UP045
    top_k: Annotated[Optional[int], typer.Option(help="k likeliest tokens; 0: all")] = None,  # noqa: UP045
    min_p: Annotated[Optional[float], typer.Option(help="least share of the top")] = None,  # noqa: UP045
    repeat_penalty: Annotated[
        Optional[float], typer.Option(help="penalise the last 64 tokens; 1 is off")  # noqa: UP045
    ] = None,
    frequency_penalty: Annotated[
        Optional[float], typer.Option(help="less of what the last 64 tokens repeat; 0 is off")  # noqa: UP045
    ] = None,
    presence_penalty: Annotated[
        Optional[float], typer.Option(help="less of what the last 64 tokens hold; 0 is off")  # noqa: UP045
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,  # noqa: UP045
    stop: Annotated[list[str], typer.Option(help="stop string (repeat)")] = [],  # noqa: B006
    json_schema: Annotated[
        Optional[str], typer.Option(help="constrain output to this JSON Schema (text or @file)")  # noqa: UP045
    ] = None,
    grammar: Annotated[
        Optional[str], typer.Option(help="constrain output to this GBNF grammar (text or @file)")  # noqa: UP045
    ] = None,
    logit_bias: Annotated[
        list[str], typer.Option(help="ID=BIAS added to a token's logit, -100..100 (repeat)")
    ] = [],  # noqa: B006
    logprobs: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="then list each token's log-probability and this many likeliest (0..20)"),
    ] = None,
    timeout: TimeoutOption = 300.0,
) -> None:
    """Chat with the raw model; the answer streams to the terminal."""
    import grpc

    from services.core.api import pb

    schema = _text_or_file(json_schema or "", "--json-schema")
    gbnf = _text_or_file(grammar or "", "--grammar")
    biases = _biases(logit_bias)
    messages = _chat(prompt, system, raw)
    if logprobs is not None and not 0 <= logprobs <= TOP_LOGPROBS_LIMIT:
        raise fail(f"--logprobs {logprobs}: use 0..{TOP_LOGPROBS_LIMIT} (the likeliest tokens "
                   "listed beside each one; 0 lists each token's own only)")  # fmt: skip
    listed: list[pb.GeneratedTokenLogprob] = []
    try:
        with connect(target, timeout) as client:
            last = None
            for chunk in client.generate(
                messages,
                prompt=prompt if raw else "",
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                repeat_penalty=repeat_penalty,
                frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty,
                seed=seed,
                stop=stop,
                json_schema=schema,
                grammar=gbnf,
                logit_bias=biases,
                logprobs=logprobs is not None,
                top_logprobs=logprobs or 0,
            ):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                listed += chunk.logprobs
                last = chunk
    except grpc.RpcError as err:
        print()
        raise rpc_failure(err) from None
    print()
    if last is not None:
        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        err_console.print(
            f"[dim]{reason} · {last.usage.prompt_tokens}+{last.usage.completion_tokens} tokens · "
            f"first token {last.time_to_first_token_ms:.0f} ms · {last.latency_ms:.0f} ms[/]",
            highlight=False,
        )
    if listed:
        err_console.print(logprob_table(listed))


def _biases(items: list[str]) -> dict[int, float]:
    """`--logit-bias ID=BIAS` pairs: token ids (`edgedistill tokenize --raw` lists them)."""
    biases: dict[int, float] = {}
    for item in items:
        token, _, bias = item.partition("=")
        try:
            biases[int(token)] = float(bias)
        except ValueError:
            raise fail(f"--logit-bias {item!r}: write it as TOKEN_ID=BIAS, e.g. --logit-bias "
                       "28=-100 (the ids: edgedistill tokenize --raw TEXT)") from None  # fmt: skip
    return biases


def _text_or_file(value: str, flag: str) -> str:
    """A flag's text, or with `@path` the file's."""
    if not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise fail(f"{flag} {value}: {why}") from None


def logprob_table(listed: list[Any]) -> Any:
    """Each generated token, its probability and log-probability, and the likeliest tokens at
    its position."""
    import math

    from rich.table import Table

    table = Table("token", "p", "logprob", "likeliest", box=None, show_edge=False)
    for item in listed:
        likeliest = "  ".join(f"{t.token!r} {math.exp(t.logprob):.3f}" for t in item.top_logprobs)
        table.add_row(repr(item.token.token), f"{math.exp(item.token.logprob):.3f}",
                      f"{item.token.logprob:.3f}", likeliest)  # fmt: skip
    return table


@app.command("tokenize")
def tokenize(
    text: Annotated[str, typer.Argument(help="the user message (with --raw: the text)")],
    target: TargetOption = "127.0.0.1:50051",
    system: Annotated[Optional[str], typer.Option(help="a system message")] = None,  # noqa: UP045
    raw: Annotated[bool, typer.Option(help="the text as it is, no chat template")] = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Count the model's tokens for a chat (as `generate` prompts it) or a text, and list them."""
    import grpc

    messages = _chat(text, system, raw)
    try:
        with connect(target, timeout) as client:
            reply = client.tokenize(messages, prompt=text if raw else "", with_pieces=True)
    except grpc.RpcError as err:
        raise rpc_failure(err) from None
    print(" ".join(f"{token}:{piece.token!r}" for token, piece in
                   zip(reply.tokens, reply.pieces, strict=True)))  # fmt: skip
    err_console.print(f"[dim]{len(reply.tokens)} tokens of a {reply.context_length}-token "
                      "context[/]", highlight=False)  # fmt: skip


@app.command("embed")
def embed(
    texts: Annotated[
        list[str], typer.Argument(help="texts to embed; - reads them from stdin, one per line")
    ],
    target: TargetOption = "127.0.0.1:50051",
    truncate: Annotated[
        bool,
        typer.Option(
            help="embed the first tokens of a text longer than the context (else an error)"
        ),
    ] = False,
    normalize: Annotated[bool, typer.Option(help="unit-length vectors")] = True,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Each text's vector from the served model: one JSON array per line, in order."""
    import grpc

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        with connect(target, timeout) as client:
            reply = client.embed(texts, truncate=truncate, normalize=normalize)
    except grpc.RpcError as err:
        raise rpc_failure(err) from None
    for item in reply.embeddings:
        print(json.dumps(list(item.values)))
    cut = sum(item.truncated for item in reply.embeddings)
    err_console.print(f"[dim]{len(reply.embeddings)} vectors of {len(reply.embeddings[0].values)} "
                      f"({reply.pooling} pooling), {reply.usage.prompt_tokens} tokens read"
                      f"{f', {cut} truncated' if cut else ''}[/]", highlight=False)  # fmt: skip


@app.command("info")
def info(target: TargetOption = "127.0.0.1:50051", timeout: TimeoutOption = 10.0) -> None:
    """Describe the model and program a runtime or router serves."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    try:
        with connect(target, timeout) as client:
            reply = client.info()
    except grpc.RpcError as err:
        raise rpc_failure(err) from None
    print_json(MessageToDict(reply, preserving_proto_field_name=True))


@app.command("health")
def health_check(
    target: TargetOption = "127.0.0.1:50051",
    service: Annotated[str, typer.Option(help="service name; empty is the whole server")] = "",
    timeout: TimeoutOption = 3.0,
) -> None:
    """Exit 0 when the server's gRPC health check says SERVING (container HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.core.security import channel, token_metadata

    credentials, token = _client_security()
    with channel(target, credentials=credentials) as health_channel:
        try:
            reply = health_pb2_grpc.HealthStub(health_channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                metadata=token_metadata(token),
            )
        except grpc.RpcError as err:
            raise rpc_failure(err) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)

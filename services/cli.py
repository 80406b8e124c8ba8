"""The one CLI. Each command imports its service lazily, so `predict` never loads llama.cpp
and `serve` never loads torch."""

from __future__ import annotations

import errno
import inspect
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from pydantic_settings import BaseSettings
from rich.console import Console

app = typer.Typer(
    name="edgedistill",
    help="Distill a DSPy program into a small local model and serve it over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _settings_options(
    settings_cls: type[BaseSettings],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one --flag per setting, so flags and EDGEDISTILL_* never drift apart.

    The command receives the flags that were given as a dict in `overrides`.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        params = []
        annotations: dict[str, Any] = {}
        for name, field in settings_cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            annotation: Any = Optional[str]  # noqa: UP045 - typer needs Optional at runtime
            option = typer.Option(None, flag, help=field.description or name, show_default=False)
            if "list[" in str(field.annotation):
                annotation = Optional[list[str]]  # noqa: UP045
                option = typer.Option(None, flag, help=field.description or name)
            elif field.annotation is bool:
                annotation = Optional[bool]  # noqa: UP045
                option = typer.Option(
                    None, f"{flag}/--no-{flag[2:]}", help=field.description or name
                )
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option))
            annotations[name] = annotation

        def command(**kwargs: Any) -> Any:
            return func(
                overrides={k: (v or None) if isinstance(v, list) else v for k, v in kwargs.items()}
            )

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = annotations
        command.__doc__ = func.__doc__
        command.__name__ = func.__name__
        return command

    return decorate


def _runtime_settings_cls() -> type[BaseSettings]:
    from services.core.config import RuntimeSettings

    return RuntimeSettings


@app.command("serve")
@_settings_options(_runtime_settings_cls())
def serve(overrides: dict[str, Any]) -> None:
    """Serve a GGUF model (and its DSPy program) over gRPC: Predict, Generate, GetModelInfo.

    Every flag also reads EDGEDISTILL_<NAME>, e.g. EDGEDISTILL_N_CTX=4096.
    """
    import asyncio

    from services.core.config import RuntimeSettings, SettingsError, load_settings

    try:
        settings = load_settings(RuntimeSettings, **overrides)
    except SettingsError as err:
        raise _fail(str(err)) from None
    from services.runtime import _logging
    from services.runtime.loading import LoadError
    from services.runtime.server import serve as run_server

    _logging.configure(settings.log_level)

    def announce(port: int) -> None:
        print(f"edgedistill runtime listening on {settings.host}:{port}", flush=True)

    try:
        code = asyncio.run(run_server(settings, ready=announce))
    except LoadError as err:
        raise _fail(f"cannot serve: {err}", code=3) from None
    except OSError as err:
        raise _fail(str(err), code=3) from None
    raise typer.Exit(code)


def _router_settings_cls() -> type[BaseSettings]:
    from services.core.config import RouterSettings

    return RouterSettings


@app.command("route")
@_settings_options(_router_settings_cls())
def route(overrides: dict[str, Any]) -> None:
    """Route Predict calls: local runtimes first, an API model for low-confidence answers.

    Every flag also reads EDGEDISTILL_ROUTER_<NAME>. The API key comes from
    --fallback-key-env VAR or --fallback-key-file PATH, never from the bundle or the image.
    """
    import asyncio

    from services.core.config import RouterSettings, SettingsError, load_settings

    try:
        settings = load_settings(RouterSettings, **overrides)
        settings.fallback_key()  # fail at start, not at the first fallback
    except SettingsError as err:
        raise _fail(str(err).replace("EDGEDISTILL_", "EDGEDISTILL_ROUTER_")) from None
    from services.core.bundle import BundleError
    from services.core.program import ProgramFormatError
    from services.router.server import serve as run_router
    from services.runtime import _logging

    _logging.configure(settings.log_level)

    def announce(port: int) -> None:
        print(f"edgedistill router listening on {settings.host}:{port}", flush=True)

    try:
        code = asyncio.run(run_router(settings, ready=announce))
    except (BundleError, ProgramFormatError, ValueError, OSError) as err:
        raise _fail(f"cannot route: {err}", code=3) from None
    raise typer.Exit(code)


def _client(target: str, timeout: float) -> Any:
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
        raise _fail(f"client settings (EDGEDISTILL_CLIENT_*): {err}", code=2) from None


def _rpc_error(err: Exception) -> typer.Exit:
    import grpc

    if isinstance(err, grpc.RpcError):
        return _fail(f"{err.code().name}: {err.details()}", code=1)
    raise err


TargetOption = Annotated[str, typer.Option("--target", help="HOST:PORT of a runtime or router")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="deadline in seconds")]


@app.command("build")
def build(
    spec: Annotated[str, typer.Argument(help="the build spec (YAML)")],
    teacher_model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="TEACHER_MODEL", help="teacher: gold or a DSPy model string"),
    ] = None,
    teacher_api_base: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="TEACHER_API_BASE", help="OpenAI-compatible base URL of the teacher"),
    ] = None,
    teacher_api_key_env: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="TEACHER_API_KEY_ENV", help="name of the variable holding the key"),
    ] = None,
    output: Annotated[Optional[str], typer.Option(help="build folder")] = None,  # noqa: UP045
    version: Annotated[Optional[str], typer.Option(help="bundle version")] = None,  # noqa: UP045
    epochs: Annotated[Optional[float], typer.Option(help="LoRA epochs")] = None,  # noqa: UP045
) -> None:
    """Distill: teacher traces -> LoRA student -> GGUF -> quantized -> evaluated -> bundle."""
    from pathlib import Path

    from services.builder.export import ExportError
    from services.builder.pipeline import QualityGateFailed
    from services.builder.pipeline import build as run_build
    from services.builder.spec import SpecError, load_spec
    from services.builder.student import ConversionError
    from services.builder.teacher import TeacherError

    try:
        build_spec = load_spec(
            Path(spec),
            **{
                "teacher.model": teacher_model,
                "teacher.api_base": teacher_api_base,
                "teacher.api_key_env": teacher_api_key_env,
                "output": output,
                "version": version,
                "lora.epochs": epochs,
            },
        )
        result = run_build(build_spec)
    except SpecError as err:
        raise _fail(str(err)) from None
    except QualityGateFailed as err:
        raise _fail(str(err), code=4) from None
    except TeacherError as err:
        raise _fail(f"teacher: {err}", code=1) from None
    except ExportError as err:
        raise _fail(f"export: {err}", code=1) from None
    except ConversionError as err:
        raise _fail(f"student.source: {err}", code=1) from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = Path(err.filename).parent if err.filename else "the build folder"
        raise _fail(
            f"out of disk space ({err.strerror}) writing under {where}: free some space there "
            "(or point --output at a larger disk) and run the build again; finished stages "
            "are kept and skipped, and no bundle was written",
            code=1,
        ) from None
    err_console.print(
        f"[green]built[/] {result.bundle} in {result.seconds:.0f} s "
        f"(ran: {', '.join(result.ran) or 'nothing'}; "
        f"skipped: {', '.join(result.skipped) or 'nothing'})",
        highlight=False,
    )


@app.command("ship")
def ship(
    bundle: Annotated[str, typer.Argument(help="the model bundle folder")],
    out: Annotated[str, typer.Option(help="where the .tar goes")] = "dist",
    image: Annotated[
        list[str], typer.Option(help="an image archive as name=path.tar (repeat)")
    ] = [],  # noqa: B006
    signing_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Ed25519 private key (PEM) to sign the manifest"),
    ] = None,
) -> None:
    """Pack a bundle (and image archives) into one verifiable <name>-<version>.tar."""
    from pathlib import Path

    from services.builder.ship import ship as pack
    from services.core.bundle import BundleError

    images = {}
    for item in image:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise _fail(f"--image {item!r}: write it as name=path.tar with an existing file")
        images[name] = Path(path)
    try:
        shipped = pack(
            bundle_dir=Path(bundle),
            images=images,
            out_dir=Path(out),
            signing_key=Path(signing_key) if signing_key else None,
        )
    except (BundleError, ValueError, OSError) as err:
        raise _fail(f"cannot ship: {err}") from None
    print(shipped)


@app.command("keygen")
def keygen(
    private_key: Annotated[str, typer.Argument(help="where to write the private key (PEM)")],
    public_key: Annotated[str, typer.Argument(help="where to write the public key (PEM)")],
) -> None:
    """Make an Ed25519 key pair for signing bundles (SIGNING_KEY / PUBLIC_KEY)."""
    from pathlib import Path

    from services.builder.ship import generate_keypair

    generate_keypair(Path(private_key), Path(public_key))


@app.command("predict")
def predict(
    target: TargetOption = "127.0.0.1:50051",
    inputs: Annotated[
        list[str], typer.Option("--input", "-i", help="an input field as name=value (repeat)")
    ] = [],  # noqa: B006 - typer reads the default, never mutates it
    max_tokens: Annotated[Optional[int], typer.Option(help="most tokens to generate")] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option(help="0 is greedy")] = None,  # noqa: UP045
    raw: Annotated[bool, typer.Option("--raw", help="also print the model's raw text")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Run the served DSPy program once: --input field=value ... -> output fields."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    values: dict[str, str] = {}
    for item in inputs:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _fail(f"--input {item!r}: write it as name=value, e.g. --input ticket='VPN down'")
        values[name] = value
    try:
        with _client(target, timeout) as client:
            reply = client.predict(
                values, max_tokens=max_tokens, temperature=temperature, include_raw_text=raw
            )
    except grpc.RpcError as err:
        raise _rpc_error(err) from None
    if as_json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return
    for name, value in reply.outputs.items():
        print(f"{name}: {value}")
    from services.core.api import pb

    outcome = pb.PredictOutcome.Name(reply.outcome).removeprefix("PREDICT_OUTCOME_").lower()
    served = pb.ServedBy.Name(reply.served_by).removeprefix("SERVED_BY_").lower()
    err_console.print(
        f"[dim]{outcome} · confidence {reply.confidence:.3f} · {served} ({reply.model_id}) · "
        f"{reply.usage.prompt_tokens}+{reply.usage.completion_tokens} tokens · "
        f"{reply.latency_ms:.0f} ms[/]",
        highlight=False,
    )
    if reply.raw_text:
        err_console.print("[dim]raw:[/]", highlight=False)
        print(reply.raw_text)


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message")],
    target: TargetOption = "127.0.0.1:50051",
    system: Annotated[Optional[str], typer.Option(help="a system message")] = None,  # noqa: UP045
    max_tokens: Annotated[Optional[int], typer.Option(help="most tokens to generate")] = None,  # noqa: UP045
    temperature: Annotated[Optional[float], typer.Option(help="0 is greedy")] = None,  # noqa: UP045
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,  # noqa: UP045
    stop: Annotated[list[str], typer.Option(help="stop string (repeat)")] = [],  # noqa: B006
    json_schema: Annotated[
        Optional[str], typer.Option(help="constrain output to this JSON Schema (text or @file)")  # noqa: UP045
    ] = None,
    timeout: TimeoutOption = 300.0,
) -> None:
    """Chat with the raw model; the answer streams to the terminal."""
    import grpc

    from services.core.api import pb

    schema = json_schema or ""
    if schema.startswith("@"):
        try:
            with open(schema[1:]) as handle:
                schema = handle.read()
        except OSError as err:
            raise _fail(f"--json-schema {schema}: {err.strerror}") from None
    messages = ([("system", system)] if system else []) + [("user", prompt)]
    try:
        with _client(target, timeout) as client:
            last = None
            for chunk in client.generate(
                messages,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=stop,
                json_schema=schema,
            ):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
    except grpc.RpcError as err:
        print()
        raise _rpc_error(err) from None
    print()
    if last is not None:
        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        err_console.print(
            f"[dim]{reason} · {last.usage.prompt_tokens}+{last.usage.completion_tokens} tokens · "
            f"first token {last.time_to_first_token_ms:.0f} ms · {last.latency_ms:.0f} ms[/]",
            highlight=False,
        )


@app.command("info")
def info(target: TargetOption = "127.0.0.1:50051", timeout: TimeoutOption = 10.0) -> None:
    """Describe the model and program a runtime or router serves."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    try:
        with _client(target, timeout) as client:
            reply = client.info()
    except grpc.RpcError as err:
        raise _rpc_error(err) from None
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))


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
            raise _rpc_error(err) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

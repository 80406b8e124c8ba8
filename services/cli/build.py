"""`edgedistill build` and `ship`: the build side (torch is imported only when they run)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from services.cli.common import app, err_console, fail


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
    prompt_format: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="prefix-first (default) or chat: DSPy's ChatAdapter as is"),
    ] = None,
    add_traces: Annotated[
        list[str],
        typer.Option(
            help="a harvest from `edgedistill harvest export` (repeat): its API "
            "answers become teacher traces"
        ),
    ] = [],  # noqa: B006
    traces_public_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Ed25519 public key (PEM) the added harvests must be signed with"),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="check the spec, program, data and metric as the build does, ask an API "
            "teacher one row, and stop: nothing is trained",
        ),
    ] = False,
) -> None:
    """Distill: teacher traces -> LoRA student -> GGUF -> quantized -> evaluated -> bundle."""
    from pathlib import Path

    from services.builder.choice import NoStudentFits
    from services.builder.export import ExportError
    from services.builder.pipeline import QualityGateFailed
    from services.builder.pipeline import build as run_build
    from services.builder.pipeline import check as check_build
    from services.builder.spec import SpecError, load_spec
    from services.builder.stages.base import disk_full
    from services.builder.student import ConversionError
    from services.builder.teacher import TeacherError
    from services.core.harvest import HarvestError

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
                "prompt_format": prompt_format,
                # relative to the working directory, as typed (the spec's own are to its folder)
                "traces.added": [str(Path(p).resolve()) for p in add_traces] or None,
                "traces.public_key": str(Path(traces_public_key).resolve())
                if traces_public_key
                else None,
            },
        )
        if check:
            check_build(build_spec)
            err_console.print(f"[green]checked[/] {spec}: nothing was trained", highlight=False)
            return
        result = run_build(build_spec)
    except SpecError as err:
        raise fail(str(err)) from None
    except HarvestError as err:
        raise fail(str(err), code=1) from None
    except QualityGateFailed as err:
        raise fail(str(err), code=4) from None
    except NoStudentFits as err:
        raise fail(f"choice: {err}", code=4) from None
    except TeacherError as err:
        raise fail(f"teacher: {err}", code=1) from None
    except ExportError as err:
        raise fail(f"export: {err}", code=1) from None
    except ConversionError as err:
        raise fail(f"student.source: {err}", code=1) from None
    except OSError as err:
        if not disk_full(err):
            raise
        where = Path(err.filename).parent if err.filename else "the build folder"
        raise fail(
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
    model_only: Annotated[
        bool, typer.Option(help="no images: the host already holds them (give --requires)")
    ] = False,
    requires: Annotated[
        list[str],
        typer.Option(
            help="with --model-only: an image the host must hold, as name=IMAGE_ID "
            "(runtime and router)"
        ),
    ] = [],  # noqa: B006
) -> None:
    """Pack a bundle (and image archives) into one verifiable <name>-<version>.tar."""
    from pathlib import Path

    from services.builder.ship import ship as pack
    from services.core.bundle import BundleError

    images = {}
    for item in image:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise fail(f"--image {item!r}: write it as name=path.tar with an existing file")
        images[name] = Path(path)
    required = dict(item.partition("=")[::2] for item in requires)
    if model_only and (images or not {"runtime", "router"} <= set(required)):
        raise fail(
            "--model-only ships no images: give --requires runtime=ID --requires router=ID "
            "(e.g. from `podman image inspect --format {{.Id}} TAG`) and no --image"
        )
    if required and not model_only:
        raise fail("--requires goes with --model-only")
    try:
        shipped = pack(
            bundle_dir=Path(bundle),
            images=images,
            out_dir=Path(out),
            signing_key=Path(signing_key) if signing_key else None,
            requires=required or None,
        )
    except (BundleError, ValueError, OSError) as err:
        raise fail(f"cannot ship: {err}") from None
    print(shipped)

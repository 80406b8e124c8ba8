"""Stage 8, bundle: one verifiable folder the runtime and router serve from.

Written into the package stage's staging folder, which the stage runner renames into place
(BUILD/bundle), so an interrupted build never leaves a partial bundle that looks valid.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core.bundle import MANIFEST, Manifest, write_manifest
from services.core.pipeline import PipelineSpec, dump_signature_json
from services.core.program import COMPLETED_MARKER, ProgramSpec

_CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


# Gemma's turns as services/builder/families.py writes them: the system message opens the
# first user turn.
_GEMMA_TEMPLATE = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}'
    "{{ $system = .Content }}{{- end }}{{- end }}{{- $first := true }}"
    '{{- range .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
    "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ $first = false }}{{ end }}"
    '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
    "{{ .Content }}<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n"
)
# Marker in the GGUF's template -> (Ollama TEMPLATE, its end-of-turn stop).
_OLLAMA_TEMPLATES = {
    "<|im_start|>": (_CHATML_TEMPLATE, "<|im_end|>"),
    "<start_of_turn>": (_GEMMA_TEMPLATE, "<end_of_turn>"),
}


def modelfile(gguf_name: str, chat_template: str, n_ctx: int = 4096) -> str:
    """An Ollama Modelfile whose TEMPLATE and stop parameters match the GGUF's chat template."""
    lines = [f"FROM ./model/{gguf_name}"]
    known = next((v for marker, v in _OLLAMA_TEMPLATES.items() if marker in chat_template), None)
    if known is not None:
        template, stop = known
        lines.append(f'TEMPLATE """{template}"""')
        lines.append(f'PARAMETER stop "{stop}"')
    else:
        # Ollama reads the chat template from the GGUF itself when TEMPLATE is absent.
        lines.append("# TEMPLATE: taken by Ollama from the GGUF's tokenizer.chat_template")
    lines += [
        f'PARAMETER stop "{COMPLETED_MARKER}"',
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {n_ctx}",
    ]
    return "\n".join(lines) + "\n"


def add_section(root: Path, name: str, data: dict[str, Any], section: tuple[str, str]) -> None:
    """NAME.json, and its section (markdown, HTML) appended to both reports."""
    (root / f"{name}.json").write_text(json.dumps(data, indent=2))
    md, page = section
    report_md = root / "report.md"
    report_md.write_text(report_md.read_text() + md + "\n")
    report_html = root / "report.html"
    report_html.write_text(report_html.read_text().replace("</body>", page + "</body>"))


def library_versions() -> dict[str, str]:
    versions = {}
    for name in (
        "edgedistill",
        "dspy",
        "llama-cpp-python",
        "gguf",
        "torch",
        "transformers",
        "peft",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_bundle(
    root: Path,
    *,
    name: str,
    version: str,
    ggufs: dict[str, Path],  # quantization -> file, first is the default
    program: ProgramSpec | PipelineSpec,
    write_program: Callable[[Path], Path],
    chat_template: str,
    evaluation_dir: Path,
    calibration: dict[str, Any] | None,
    provenance: dict[str, Any],
    compared: dict[str, Any] | None = None,
    rounds: dict[str, Any] | None = None,
) -> Manifest:
    """Write the bundle's files and its manifest into the (empty) folder `root`;
    `write_program(folder)` writes program/ (program.json, a multi-step program's source and
    state)."""
    (root / "model").mkdir()
    models = {}
    for quant, source in ggufs.items():
        target = root / "model" / f"{name}.{quant}.gguf"
        try:
            os.link(source, target)  # same filesystem: no copy of hundreds of MB
        except OSError:
            shutil.copy2(source, target)
        models[quant] = f"model/{target.name}"
    default = next(iter(models.values()))
    write_program(root / "program")
    (root / "signature.json").write_text(dump_signature_json(program) + "\n")
    (root / "Modelfile").write_text(modelfile(Path(default).name, chat_template))
    for report in ("eval.json", "decision.json", "report.md", "report.html"):
        shutil.copy2(evaluation_dir / report, root / report)
    if calibration is not None:
        (root / "calibration.json").write_text(json.dumps(calibration, indent=2))
    from services.builder.report import rounds_section, students_section

    if rounds is not None:
        add_section(root, "rounds", rounds, rounds_section(rounds))
    if compared is not None:
        add_section(root, "students", compared, students_section(compared))
    manifest = write_manifest(
        root,
        Manifest(
            name=name,
            version=version,
            default_model=default,
            models=models,
            calibration="calibration.json" if calibration is not None else None,
            provenance={**provenance, "libraries": library_versions()},
        ),
    )
    assert (root / MANIFEST).is_file()
    # Readable by the containers' unprivileged user, whatever the umask.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return manifest

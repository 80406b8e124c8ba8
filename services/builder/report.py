"""The evaluation report: a table on the terminal, Markdown, and HTML with a plot."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.core.stats import compare, score_interval

COLUMNS = (
    "model", "score [95% CI]", "vs untuned", "retention", "p50 ms", "p95 ms", "gen tok/s",
    "size MB", "peak MB",
)  # fmt: skip


def interval(result: dict[str, Any]) -> dict[str, Any]:
    """A result's score interval (computed from its examples for evaluations written before
    intervals were recorded)."""
    recorded: dict[str, Any] | None = result.get("interval")
    return recorded or score_interval([e["score"] for e in result["examples"]])


def score_cell(result: dict[str, Any]) -> str:
    ci = interval(result)
    return f"{result['score']:.1%} [{ci['low'] * 100:.1f}–{ci['high'] * 100:.1f}]"


def rows(evaluation: dict[str, Any]) -> list[list[str]]:
    """One row per model. "vs untuned" says gain or loss only when the two 95% intervals do
    not overlap."""
    teacher = evaluation["teacher"]
    untuned = next((s for s in evaluation["students"] if s["label"].startswith("untuned")), None)
    out = [[teacher["label"], score_cell(teacher), "", "100%", "", "", "", "", ""]]
    for variant in evaluation["students"]:
        retention = variant["score"] / teacher["score"] if teacher["score"] else 0.0
        versus = ""
        if untuned is not None and variant is not untuned:
            versus = compare(interval(variant), interval(untuned))
        out.append(
            [
                variant["label"],
                score_cell(variant),
                versus,
                f"{retention:.0%}",
                f"{variant['latency_p50_ms']:.0f}",
                f"{variant['latency_p95_ms']:.0f}",
                f"{variant['generation_tokens_per_s'] or 0:.0f}",
                f"{variant['size_bytes'] / 1e6:.1f}",
                f"{variant['peak_rss_mb']:.0f}",
            ]
        )
    return out


def print_table(evaluation: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{evaluation['name']}: held-out dev set (n={evaluation['dev_examples']})")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows(evaluation):
        table.add_row(*row)
    console.print(table)


def _plot_png(evaluation: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = evaluation["students"]
    teacher = evaluation["teacher"]["score"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, xlabel in (
        (axes[0], "size_bytes", "file size (MB)"),
        (axes[1], "latency_p50_ms", "latency p50 (ms)"),
    ):
        for variant in students:
            x = variant[key] / 1e6 if key == "size_bytes" else variant[key]
            axis.scatter(x, variant["score"] * 100, s=60)
            axis.annotate(variant["label"], (x, variant["score"] * 100), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")  # fmt: skip
        axis.axhline(teacher * 100, linestyle="--", color="grey", label="teacher")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("dev score (%)")
        axis.set_ylim(0, 105)
        axis.legend(loc="lower right")
    fig.suptitle(f"{evaluation['name']}: quality against size and latency")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_reports(
    evaluation: dict[str, Any], calibration: dict[str, Any] | None, out_dir: Path
) -> None:
    table = rows(evaluation)
    md = [f"# {evaluation['name']} — distillation report", ""]
    md.append(f"Teacher: `{evaluation['teacher']['label']}`. Dev set: {evaluation['dev_examples']} "
              "held-out examples. Students served exactly as the runtime serves them. Scores with "
              "95% intervals (Wilson for accuracies, bootstrap for graded metrics).")  # fmt: skip
    md += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    if calibration:
        md += [
            "",
            "## Router calibration",
            "",
            f"Threshold **{calibration['threshold']:.4f}** on `{calibration['variant']}`: "
            f"{calibration['fallback_rate']:.1%} of requests fall back, system quality "
            f"{calibration['system_quality']:.1%} (target {calibration['target_retention']:.0%} of "
            f"the teacher's {calibration['teacher_quality']:.1%}; student alone "
            f"{calibration['student_quality']:.1%}).",
        ]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")

    png = base64.b64encode(_plot_png(evaluation)).decode()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table
    )
    calibration_html = ""
    if calibration:
        calibration_html = f"<h2>Router calibration</h2><p>{html.escape(md[-1])}</p>"
    (out_dir / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(evaluation['name'])} report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child{text-align:left}</style></head><body>"
        f"<h1>{html.escape(evaluation['name'])} — distillation report</h1>"
        f"<table><tr>{head}</tr>{body}</table>"
        f"<img alt='quality against size and latency' src='data:image/png;base64,{png}'>"
        f"{calibration_html}</body></html>\n"
    )

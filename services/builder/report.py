"""The evaluation report: a table on the terminal, Markdown, and HTML with a plot."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.builder.decision import bands_spanned, retention
from services.builder.probe import unformatted_note
from services.core.stats import compare, score_interval

COLUMNS = (
    "model", "score [95% CI]", "vs best untuned", "retention", "p50 ms", "p95 ms", "gen tok/s",
    "size MB", "peak MB",
)  # fmt: skip


def interval(result: dict[str, Any]) -> dict[str, Any]:
    """A result's score interval (computed from its examples for evaluations written before
    intervals were recorded)."""
    recorded: dict[str, Any] | None = result.get("interval")
    return recorded or score_interval([e["score"] for e in result["examples"]])


def percent_interval(ci: dict[str, Any] | list[float]) -> str:
    low, high = (ci["low"], ci["high"]) if isinstance(ci, dict) else ci
    return f"[{low * 100:.1f}–{high * 100:.1f}]"


def score_cell(result: dict[str, Any]) -> str:
    return f"{result['score']:.1%} {percent_interval(interval(result))}"


def best_untuned(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    untuned = [s for s in evaluation["students"] if s["label"].startswith("untuned")]
    return max(untuned, key=lambda s: s["score"]) if untuned else None


def rows(evaluation: dict[str, Any]) -> list[list[str]]:
    """One row per model, on the test part. "vs best untuned" says gain or loss only when the
    two 95% intervals do not overlap."""
    teacher = evaluation["teacher"]
    baseline = best_untuned(evaluation)

    def kept(score: float) -> str:  # none to keep when the teacher scores 0
        return f"{retention(score, teacher['score']):.0%}" if teacher["score"] else "—"

    out = [[teacher["label"], score_cell(teacher), "", kept(teacher["score"]),
            *latency_cells(teacher), "", "", ""]]  # fmt: skip
    for variant in evaluation["students"]:
        versus = ""
        if baseline is not None and not variant["label"].startswith("untuned"):
            versus = compare(interval(variant), interval(baseline))
        out.append(
            [
                variant["label"],
                score_cell(variant),
                versus,
                kept(variant["score"]),
                *latency_cells(variant),
                _speed(variant["generation_tokens_per_s"]),
                f"{variant['size_bytes'] / 1e6:.1f}",
                f"{variant['peak_rss_mb']:.0f}",
            ]
        )
    return out


def latency_cells(result: dict[str, Any]) -> list[str]:
    if result.get("latency_p50_ms") is None:
        return ["", ""]
    return [f"{result['latency_p50_ms']:.0f}", f"{result['latency_p95_ms']:.0f}"]


def money(value: float | None, currency: str) -> str:
    if value is None:
        return "no price (set cost.* in the spec)"
    return f"{value:.4g} {currency}" if value else f"0 {currency} (marginal)"


def decision_rows(decision: dict[str, Any]) -> list[list[str]]:
    """The side-by-side table: API teacher, local model, hybrid router."""
    api, local, hybrid = decision["api"], decision["local"], decision["hybrid"]
    currency = decision["currency"]
    api_latency = (
        f"{api['latency_p50_ms']:.0f} / {api['latency_p95_ms']:.0f}"
        if api["measured"] else "not measured (gold labels)"
    )  # fmt: skip
    tokens = (
        f"{api['prompt_tokens_per_call']:.0f} in / {api['completion_tokens_per_call']:.0f} out"
        + ("" if api["measured"] else " (estimated: the local prompts)")
    )
    api_cost = money(None, "")
    if api["cost"]:
        api_cost = f"{money(api['cost']['per_1k_calls'], currency)} ({api['cost']['source']})"
    share = hybrid["api_share"]
    return [
        ["quality [95% CI]", f"{api['quality']:.1%} {percent_interval(api['interval'])}",
         f"{local['quality']:.1%} {percent_interval(local['interval'])}",
         f"{hybrid['quality']:.1%} {percent_interval(hybrid['interval'])}"],
        ["calls sent to the API", "100%", "0%",
         f"{share:.1%} {percent_interval(hybrid['api_share_interval'])}"],
        ["latency p50 / p95 ms", api_latency,
         f"{local['latency_p50_ms']:.0f} / {local['latency_p95_ms']:.0f}",
         "" if hybrid["latency_p50_ms"] is None
         else f"{hybrid['latency_p50_ms']:.0f} / {hybrid['latency_p95_ms']:.0f}"],
        ["tokens per call", tokens, "", ""],
        ["cost per 1K calls", api_cost, money(local["cost_per_1k_calls"], currency),
         money(hybrid["cost_per_1k_calls"], currency)],
        ["data leaves the machine", "yes, every call", "no", f"yes, for {share:.0%} of calls"],
        ["runs offline", "no", "yes", "yes (the API share is answered locally when offline)"],
    ]  # fmt: skip


def verdict_line(decision: dict[str, Any]) -> str:
    low, high = decision["retention_range"]
    if not decision["api"]["quality"]:
        return f"retention: none to measure, n={decision['n']}: {decision['next_step']}"
    spanned = bands_spanned(low, high)
    unsettled = (
        f" (the range reaches from {spanned[-1]} to {spanned[0]}: more held-out rows would "
        "settle the band)" if len(spanned) > 1 else ""
    )  # fmt: skip
    # The teacher's own score beside it: retention of a weak teacher's quality is no praise.
    return (
        f"retention {decision['retention']:.0%} of the teacher's {decision['api']['quality']:.1%}"
        f" (95% range {low:.0%}–{high:.0%}, n={decision['n']}): {decision['band']}{unsettled}; "
        f"next step: {decision['next_step']}"
    )


def calibration_line(calibration: dict[str, Any], gold: bool) -> str:
    calib, test = calibration["calibration"], calibration["test"]
    line = (
        f"Threshold {calibration['threshold']:.4f} on {calibration['variant']}, chosen on the "
        f"calibration part (n={calib['n']}: {calib['fallback_rate']:.1%} fall back, system "
        f"quality {calib['system_quality']:.1%}, target {calibration['target_retention']:.0%} of "
        f"the teacher). On the test part (n={test['n']}): {test['fallback_rate']:.1%} fall back, "
        f"system quality {test['system_quality']:.1%} "
        f"{percent_interval(test['system_interval'])}."
    )
    if gold:
        line += (" The teacher is the gold labels: the fallback's quality is the labels', "
                 "an upper bound on what an API model would give.")  # fmt: skip
    return line


def field_lines(evaluation: dict[str, Any]) -> list[str]:
    """Each model's score per output field on the test part (teacher, untuned, distilled)."""
    lines = []
    for model in [evaluation["teacher"], *evaluation["students"]]:
        if model.get("fields"):
            cells = ", ".join(f"{name} {value['score']:.1%} {percent_interval(value['interval'])}"
                              for name, value in model["fields"].items())  # fmt: skip
            lines.append(f"{model['label']}, per field: {cells}")
    return lines


def field_table(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-field scores as a table: one row per model, one column per field."""
    models = [m for m in [evaluation["teacher"], *evaluation["students"]] if m.get("fields")]
    if not models:
        return [], []
    names = list(models[0]["fields"])
    header = ["model (test part)"] + [
        f"{n} ({models[0]['fields'][n].get('measure', 'exact match')})" for n in names
    ]
    body = [[m["label"]] + [field_cell(m["fields"][n]) for n in names] for m in models]
    return header, body


def field_cell(value: dict[str, Any]) -> str:
    return f"{value['score']:.1%} {percent_interval(value['interval'])}"


def training_lines(training: dict[str, Any] | None) -> list[str]:
    """How the fine-tune went: its steps, the calibration curve and the checkpoint kept, and
    what the final model answers on train rows."""
    if not training:
        return []
    lines = [
        f"{training['steps']} optimizer steps of {training['planned_steps']} planned "
        f"({training['epochs']:g} epochs over {training['examples']} training records"
        + (", label-balanced" if training.get("balanced") else "")
        + "); kept step "
        f"{training['chosen_step']}."
    ]
    curve = training.get("calibration_curve") or []
    if curve:
        points = ", ".join(f"step {p['step']} {p['score']:.1%}" for p in curve)
        lines.append(f"Calibration part (n={curve[0]['n']}) during training: {points}.")
    probe = training.get("train_probe")
    if probe:
        fields = ", ".join(f"{name} {value:.0%}" for name, value in probe["fields"].items())
        said = f" ({fields})" if fields else ""
        lines.append(f"On {probe['n']} train rows: {probe['score']:.1%}{said}"
                     f"{unformatted_note(probe)}.")  # fmt: skip
    return lines


def print_table(evaluation: dict[str, Any], console: Console) -> None:
    split = evaluation["split"]
    table = Table(title=f"{evaluation['name']}: test part (n={split['test']}; "
                        f"calibration part n={split['calibration']})")  # fmt: skip
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows(evaluation):
        table.add_row(*row)
    console.print(table)
    for line in field_lines(evaluation):
        console.print(line, highlight=False)


def print_decision(decision: dict[str, Any], console: Console) -> None:
    table = Table(title=f"API vs local vs hybrid (test part, n={decision['n']})")
    for column in ("", "API (teacher)", f"local ({decision['variant']})", "hybrid (router)"):
        table.add_column(column, justify="left")
    for row in decision_rows(decision):
        table.add_row(*row)
    console.print(table)
    console.print(verdict_line(decision))


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
        axis.set_ylabel("test score (%)")
        axis.set_ylim(0, 105)
        axis.legend(loc="lower right")
    fig.suptitle(f"{evaluation['name']}: quality against size and latency")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in body
    )
    return f"<table><tr>{head}</tr>{cells}</table>"


def write_reports(
    evaluation: dict[str, Any], calibration: dict[str, Any], decision: dict[str, Any],
    out_dir: Path, training: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    split = evaluation["split"]
    gold = bool(evaluation["teacher"].get("gold"))
    intro = (
        f"Teacher: `{evaluation['teacher']['label']}`. Held-out rows ({split['source']}): "
        f"{split['calibration']} for calibration, {split['test']} for test; every score below "
        "is on the test part, with its 95% interval (Wilson for accuracies, bootstrap for graded "
        f"metrics). Students are served as the runtime serves them (max_tokens "
        f"{evaluation['max_tokens']})."
    )
    judge = evaluation.get("judge")
    judge_line = ""
    if judge:
        judge_line = (
            f"Metric judged by `{judge['model']}`: {judge['calls']} calls, "
            f"{judge['prompt_tokens']} prompt and {judge['completion_tokens']} completion "
            f"tokens, {judge['failures']} unparseable verdicts (scored 0)."
        )
    errors = evaluation.get("metric_errors")
    if errors:
        judge_line = (
            f"{judge_line} The metric raised on {errors['count']} answers, scored 0 (first: "
            f"`{errors['first']}`)."
        ).strip()
    decision_header = ["", "API (teacher)", f"local ({decision['variant']})", "hybrid (router)"]
    verdict = verdict_line(decision)
    calibration_text = calibration_line(calibration, gold)
    md = [f"# {evaluation['name']} — distillation report", "", intro, ""]
    md += markdown_table(list(COLUMNS), rows(evaluation))
    field_header, field_body = field_table(evaluation)
    train = training_lines(training)
    if field_body:
        md += ["", "## Per field", "", *markdown_table(field_header, field_body)]
    md += ["", "## Training", "", *train] if train else []
    md += ["", "## Decision", "", f"**{verdict}**", ""]
    md += markdown_table(decision_header, decision_rows(decision))
    md += ["", "## Router calibration", "", calibration_text]
    harvest = harvest_line(evaluation.get("harvest"))
    if harvest:
        md += ["", "## Harvested inputs", "", harvest]
    if judge_line:
        md += ["", judge_line]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")

    png = base64.b64encode(_plot_png(evaluation)).decode()
    (out_dir / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(evaluation['name'])} report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child{text-align:left}</style></head><body>"
        f"<h1>{html.escape(evaluation['name'])} — distillation report</h1>"
        f"<p>{html.escape(intro)}</p>{html_table(list(COLUMNS), rows(evaluation))}"
        + ("<h2>Per field</h2>" + html_table(field_header, field_body) if field_body else "")
        + (
            "<h2>Training</h2>" + "".join(f"<p>{html.escape(line)}</p>" for line in train)
            if train
            else ""
        )
        + f"<img alt='quality against size and latency' src='data:image/png;base64,{png}'>"
        f"<h2>Decision</h2><p><b>{html.escape(verdict)}</b></p>"
        f"{html_table(decision_header, decision_rows(decision))}"
        f"<h2>Router calibration</h2><p>{html.escape(calibration_text)}</p>"
        + (f"<h2>Harvested inputs</h2><p>{html.escape(harvest)}</p>" if harvest else "")
        + f"<p>{html.escape(judge_line)}</p></body></html>\n"
    )


def harvest_line(harvest: dict[str, Any] | None) -> str:
    """The edge's hard cases, added as traces: how the served model and this one answer them."""
    if not harvest:
        return ""
    before, after = harvest["before"], harvest["after"]
    return (
        f"{harvest['n']} inputs from edge harvests, scored against the API's answers: the model "
        f"that served them {interval_text(before)}, this model {interval_text(after)} (these "
        "inputs are in this model's training data: the second figure says it learned them, "
        "not how it generalises; the test part above says that)."
    )


def interval_text(result: dict[str, Any]) -> str:
    low, high = result["interval"]["low"], result["interval"]["high"]
    return f"{result['score']:.1%} [{low:.1%}–{high:.1%}]"


STUDENT_COLUMNS = ("student", "test score [95% CI]", "n", "p50 ms", "tokens/s", "size MB",
                   "peak RSS MB", "training min", "")  # fmt: skip


def student_rows(compared: dict[str, Any]) -> list[list[str]]:
    """Each candidate's default quantization on the test part, and why it shipped or not."""
    body = []
    for c in compared["candidates"]:
        low, high = c["interval"]
        shipped = "shipped" if c["source"] == compared["chosen"] else ""
        note = shipped or "; ".join(c["excluded"]) or "lower score"
        body.append([
            f"{c['source']} ({c['quantization']})",
            f"{c['score']:.1%} [{low:.1%}–{high:.1%}]", str(c["n"]), f"{c['latency_p50_ms']:.0f}",
            _speed(c["tokens_per_s"]), f"{c['size_mb']:.0f}",
            "" if c["peak_rss_mb"] is None else f"{c['peak_rss_mb']:.0f}",
            "" if c["training_s"] is None else f"{c['training_s'] / 60:.1f}", note,
        ])  # fmt: skip
    return body


def students_section(compared: dict[str, Any]) -> tuple[str, str]:
    """The comparison as a markdown section and as HTML, for the shipped bundle's reports."""
    rule = compared["rule"]
    budgets = [f"p50 ≤ {rule['max_latency_ms']:g} ms" if rule["max_latency_ms"] else "",
               f"size ≤ {rule['max_size_mb']:g} MB" if rule["max_size_mb"] else ""]  # fmt: skip
    within = " within " + " and ".join(b for b in budgets if b) if any(budgets) else ""
    text = (
        f"Each student trained on the same traces and evaluated on the same test part; the "
        f"rule ships the best test score{within}, equal scores to the smaller file: "
        f"{compared['chosen']}."
    )
    rows_ = student_rows(compared)
    md = "\n".join(["", "## Students compared", "", text, "",
                    *markdown_table(list(STUDENT_COLUMNS), rows_)])  # fmt: skip
    page = (f"<h2>Students compared</h2><p>{html.escape(text)}</p>"
            f"{html_table(list(STUDENT_COLUMNS), rows_)}")  # fmt: skip
    return md, page


def _speed(tokens_per_s: float | None) -> str:
    """Blank when not measured (one sampled token per answer leaves no decode to time)."""
    return "" if not tokens_per_s else f"{tokens_per_s:.0f}"


ROUND_COLUMNS = ("round", "traces added", "traces", "calibration score [95% CI]", "n",
                 "retention", "gate")  # fmt: skip


def rounds_section(loop: dict[str, Any]) -> tuple[str, str]:
    """The retrain loop's rounds: what each added and its score on the calibration part (the
    gate's part; the test part is only this report's tables above)."""
    body = []
    for r in loop["rounds"]:
        gate = r["calibration"]
        low, high = gate["interval"]["low"], gate["interval"]["high"]
        added = ", ".join(f"{n} {source}" for source, n in r["added"].items()) or "none"
        verdict = "passed" if gate["passed"] else "under"
        body.append([str(r["round"]), added, str(r["traces"]),
                     f"{gate['score']:.1%} [{low:.1%}–{high:.1%}]", str(gate["n"]),
                     f"{gate['retention']:.0%}", verdict])  # fmt: skip
    gate = loop["rounds"][-1]["calibration"]
    text = (
        f"Each round trained from the base on every trace so far; the gate is "
        f"min_retention {gate['min_retention']:.0%} of the teacher's score on the calibration "
        f"part. The loop stopped: {loop['stopped']} (loop.max_rounds {loop['max_rounds']}); "
        f"this bundle is round {loop['rounds'][-1]['round']}'s."
    )
    md = "\n".join(["", "## Rounds", "", text, "", *markdown_table(list(ROUND_COLUMNS), body)])
    page = (f"<h2>Rounds</h2><p>{html.escape(text)}</p>"
            f"{html_table(list(ROUND_COLUMNS), body)}")  # fmt: skip
    return md, page

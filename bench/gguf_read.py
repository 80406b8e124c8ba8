"""What reading a GGUF's header costs: gguf-py's GGUFReader against open_gguf (the same
reader, its arrays read in one pass), which every runtime start and several build stages do.

Side by side in one run, interleaved read by read, on the two real GGUFs the project ships
with: SmolLM2-135M (49k-token vocabulary) and Gemma 3 270M (262k tokens).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.results import write_results
from services.builder.student import gemma3_270m_gguf
from services.core.gguf_metadata import open_gguf
from testkit.processes import smollm2_gguf

ROUNDS = 5


def seconds(read: Callable[[Path], object], path: Path) -> float:
    started = time.perf_counter()
    read(path)
    return time.perf_counter() - started


def main() -> None:
    import gguf

    console = Console()
    table = Table(title=f"Reading a GGUF header (median of {ROUNDS}, interleaved)")
    for column in ("model", "vocabulary", "gguf-py s", "open_gguf s", "ratio"):
        table.add_column(column, justify="right" if column != "model" else "left")
    figures = {}
    for name, path in (
        ("SmolLM2-135M Q4_1", smollm2_gguf()),
        ("Gemma 3 270M Q4_K_M", gemma3_270m_gguf()),
    ):
        times: dict[str, list[float]] = {"gguf_py": [], "open_gguf": []}
        for _ in range(ROUNDS):
            times["gguf_py"].append(seconds(gguf.GGUFReader, path))
            times["open_gguf"].append(seconds(open_gguf, path))
        vocabulary = len(open_gguf(path).fields["tokenizer.ggml.tokens"].data)
        medians = {k: statistics.median(v) for k, v in times.items()}
        ratio = medians["open_gguf"] / medians["gguf_py"]
        figures[name] = {"file": path.name, "vocabulary": vocabulary, "seconds": times,
                         "median_s": medians, "ratio": ratio}  # fmt: skip
        table.add_row(name, f"{vocabulary:,}", f"{medians['gguf_py']:.2f}",
                      f"{medians['open_gguf']:.2f}", f"{ratio:.3f}x")  # fmt: skip
    console.print(table)
    write_results("gguf_read", {"rounds": ROUNDS}, figures)

"""Shared by the benchmark sections: a result row, medians, and the Markdown table.

Every figure is measured beside its baseline in the same run (median of at least 3 runs) and
reported as a ratio, because these machines are shared and noisy. A section module exposes
`run(context) -> list[Row]`; bench/run.py runs the sections, prints the table and writes JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
JFK = SHARED / "audio" / "jfk.flac"
JFK_TEXT = SHARED / "audio" / "jfk.txt"


@dataclass
class Row:
    """One line of the table: a figure beside its baseline, as a ratio, against its goal."""

    section: str
    metric: str
    value: float | str
    unit: str = ""
    baseline: float | str | None = None
    baseline_name: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""
    runs: list = field(default_factory=list)


@dataclass
class Context:
    """What every section gets: a scratch folder, the repetition count and a quick flag."""

    scratch: Path
    repeats: int = 3
    quick: bool = False


def median_of(function: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """Run `function` `repeats` times; return the median of what it returns and every value."""
    values = [function() for _ in range(repeats)]
    return statistics.median(values), values


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(rows: list[Row]) -> str:
    """The README's benchmark table."""
    lines = ["| section | metric | value | baseline | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        value = f"{_cell(row.value)} {row.unit}".strip()
        baseline = f"{_cell(row.baseline)} ({row.baseline_name})" if row.baseline is not None else ""
        ratio = f"{row.ratio:.2f}x" if isinstance(row.ratio, (int, float)) else ""
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        note = f" {row.note}" if row.note else ""
        lines.append(f"| {row.section} | {row.metric}{note} | {value} | {baseline} | {ratio} | {row.goal} | {met} |")
    return "\n".join(lines) + "\n"


def write_json(rows: list[Row], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(row) for row in rows]}, indent=1, default=str))

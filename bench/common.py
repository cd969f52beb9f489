"""Shared by the benchmark sections: a result row, medians, rounds in rotating order, word error
rates, and the Markdown table.

Every figure is measured beside its baseline in the same run (median of at least 3 runs) and
reported as a ratio, because these machines are shared and noisy. A section module exposes
`run(context) -> list[Row]`; bench/run.py runs the sections, prints the table and writes JSON.
This module imports nothing beyond the standard library at load time (jiwer on first use of `wer`),
so the GPU check (bench/gpu/check.py) uses it on a machine without PyAV.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def rounds(methods: dict[str, Callable[[], Any]], repeats: int,
           stop: Callable[[], bool] = lambda: False) -> dict[str, list]:
    """Each method `repeats` times, a round at a time, the order rotating from round to round; what
    each call returned, per method. `stop()` is asked after each round (from the second on) and ends
    the rounds early when it says so."""
    names = list(methods)
    runs: dict[str, list] = {name: [] for name in names}
    for index in range(repeats):
        if index and stop():
            break
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(methods[name]())
    return runs


def paired(values: list[float], baselines: list[float]) -> list[float]:
    """Each round's value over that round's baseline."""
    return [value / baseline for value, baseline in zip(values, baselines)]


def same_text(runs: list[tuple[float, Any]]) -> str:
    """Whether every (seconds, text) run gave the same text, in words for a table's note."""
    return "identical in every run" if len({repr(text) for _, text in runs}) == 1 else "text varied between runs: first run's"


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: what word error rates compare."""
    cleaned = "".join(character.lower() if character.isalnum() or character.isspace() else " " for character in text)
    return " ".join(cleaned.split())


def wer(references: list[str] | str, hypotheses: list[str] | str) -> float:
    """Word error rate in percent over all reference words (jiwer, lower case, punctuation dropped)."""
    import jiwer

    if isinstance(references, str):
        references, hypotheses = [references], [hypotheses]
    return 100.0 * jiwer.wer([normalise(text) for text in references], [normalise(text) for text in hypotheses])


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


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def skipped(section: str, metric: str, why: str) -> Row:
    """A row that says a figure was not measured, and why (no root, no sshd, no GPU...)."""
    return Row(section, metric, "not measured", note=f"({why})")


def root_problem() -> str | None:
    """Why root-only benchmarks (sshd, network namespaces) cannot run here, or None when they can."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "needs root to run sshd and create network namespaces"
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        return "needs OpenSSH sshd"
    return None


def section_folders(context: "Context", section: str) -> tuple[Path, Path]:
    """A section's scratch folder and a `staging` folder in it, where files are written before they
    are moved into an inbox: (scratch, staging)."""
    scratch = context.scratch / section
    scratch.mkdir()
    staging = scratch / "staging"
    staging.mkdir()
    return scratch, staging


@contextlib.contextmanager
def loopback_gpu_host(scratch: Path):
    """A GPU host on loopback for a section: a real sshd (tests/sshd.py) and a runner working the spool
    it serves, in `scratch`. Yields (server, runner); both are stopped when the block ends. Needs root
    (see root_problem)."""
    from sshd import SSHServer
    from test_remote import RunnerProcess

    server, runner = SSHServer(), None
    try:
        server.start()
        runner = RunnerProcess(scratch, server.spool).start()
        yield server, runner
    finally:
        if runner is not None:
            runner.stop()
        server.cleanup()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (from /proc/PID/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid` in MiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")

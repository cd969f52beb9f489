"""Every benchmark section (bench/run.py's SECTIONS) imports: a module the package reorganised under
it fails here, not in the middle of a benchmark run (bench_end_to_end imported a constant from the
module it had left)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_every_benchmark_section_imports():
    """Each `bench_<name>` of bench/run.py's SECTIONS imports, as bench/run.py imports it (its own process)."""
    code = ("import sys, importlib; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import run; "
            "[importlib.import_module(f'bench_{name}') for name in run.SECTIONS]; print(len(run.SECTIONS))")
    done = subprocess.run([sys.executable, "-c", code, str(BENCH), str(BENCH.parent / "tests")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 12

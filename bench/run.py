"""Run the benchmark suite: `python bench/run.py [--quick] [--only SECTION ...] [--repeats N]`.

Prints the Markdown table for the README and writes bench/out/results.json. Needs root for the
network-namespace sections (they are skipped, and say so, without it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import REPO, Context, Row, markdown, write_json  # noqa: E402

SECTIONS = ["bandwidth", "extraction", "upload", "resume", "end_to_end", "engine", "footprint", "engine_long", "models",
            "languages", "handback", "pauses"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=SECTIONS)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "results.json"))
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="wd-bench-") as scratch:
        context = Context(Path(scratch), repeats=max(3, args.repeats), quick=args.quick)
        for name in args.only or SECTIONS:
            module = importlib.import_module(f"bench_{name}")
            started = time.monotonic()
            print(f"# {name} ...", file=sys.stderr, flush=True)
            try:
                section_rows = module.run(context)
            except Exception as error:  # one broken section must not hide the others' figures
                traceback.print_exc()
                section_rows = [Row(name, "section failed", "error", note=f"({type(error).__name__}: {error})")]
            if args.quick:  # no quick figure may pass for a full one in a table
                for row in section_rows:
                    if "quick" not in row.metric + row.note:
                        row.note = f"{row.note} [quick: smaller inputs]".strip()
            rows.extend(section_rows)
            print(f"# {name}: {len(section_rows)} rows in {time.monotonic() - started:.0f} s", file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "quick": args.quick, "repeats": max(3, args.repeats)}
    write_json(rows, Path(args.out), meta)
    print(markdown(rows))
    print(f"JSON: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

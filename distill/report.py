"""A comparison report from finished runs: report.md, results.csv and PNG plots.

The command: parse arguments, call distill.study.report, print. distill.study.report documents the
method, distill.study.stats the intervals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.study.collect import find_runs
from distill.study.report import build_report


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-report", description="A comparison report from finished runs.")
    parser.add_argument("runs", nargs="+", help="run directories (or study directories holding runs)")
    parser.add_argument("--out", required=True, help="report directory")
    args = parser.parse_args(argv)

    def go() -> None:
        found = find_runs([Path(p) for p in args.runs])
        for note in found.skipped:
            print(f"report: skipped {note}")
        print(f"report: {build_report(found.runs, Path(args.out))}")

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())

"""A comparison report from finished runs: report.md, results.csv and PNG plots.

The command: parse arguments, call distill.study.report, print. distill.study.report documents the method.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.errors import DistillError
from distill.run.rundir import RunDir
from distill.study.report import build_report


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-report", description="A comparison report from finished runs.")
    parser.add_argument("runs", nargs="+", help="run directories (or study directories holding runs)")
    parser.add_argument("--out", required=True, help="report directory")
    args = parser.parse_args(argv)

    def go() -> None:
        dirs: list[Path] = []
        for p in map(Path, args.runs):
            if RunDir(p).finished():
                dirs.append(p)
            elif p.is_dir():  # a study directory: every finished run inside it
                dirs += sorted(c for c in p.iterdir() if RunDir(c).finished() and RunDir(c).metrics_file.is_file())
            else:
                raise DistillError(f"{p} is neither a run directory nor a directory of runs")
        print(f"report: {build_report(dirs, Path(args.out))}")

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())

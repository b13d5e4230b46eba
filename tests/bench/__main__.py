"""Run every benchmark: ``.venv/bin/python -m tests.bench [NAME ...]``.

Each ``bench_*.py`` module here exposes ``run(report)``. A figure is always
printed beside a reference measured in the same run on the same machine, as
a ratio, so the numbers mean something on a Pi and on a laptop alike.
Benchmarks are not part of ``pytest``: they take minutes and measure, they
do not assert.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from tests.bench.report import Report

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = set(argv)
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if wanted:
        unknown = wanted - {n.removeprefix("bench_") for n in names} - set(names)
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; available: "
                  f"{', '.join(n.removeprefix('bench_') for n in names)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted or n.removeprefix("bench_") in wanted]
    report = Report()
    failed = []
    for name in names:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"tests.bench.{name}").run(report)
        except Exception:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            traceback.print_exc()
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

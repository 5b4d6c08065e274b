"""The conformance suite's warm wall time at -n 2 on the reference kernel, this checkout against
another commit's, side by side in one run:

    .venv/bin/python bench/suite_time.py [--base REV] [--samples 5] [-- PYTEST ARGS]

Each sample is one `pytest test_suites -n 2` in a fresh process, with the base commit's
checkout (a temporary `git worktree`: its package first on PYTHONPATH, its suite and conftest)
or this one's; the sides alternate so both see the same machine load, and one unmeasured run
per side first warms the caches (images, snapshots, GDB index) that a side's payloads need.
Prints the medians, the test counts, the ratio this/base and MET where the ratio is within the
target (issue 19: at most 1.3x, the price of the tests that hold each entry check alone).
Exit status 0 unless a run failed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sides import alternate, base_and_this

# main before issue 19's audit tests.
DEFAULT_BASE = "10be98d"
TARGET = 1.30
RUN_TIMEOUT = 1800.0
SUMMARY = re.compile(r"(\d+ passed.*?) in [\d.]+s")


def _run(root: Path, extra: list[str]) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, "-m", "pytest", "test_suites", "-n", "2", "-q", "-p", "no:cacheprovider", *extra]
    start = time.monotonic()
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"the suite failed on {root} (exit {done.returncode}):\n{done.stdout[-3000:]}")
    found = SUMMARY.search(done.stdout)
    return elapsed, found.group(1) if found else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the commit to compare with (default {DEFAULT_BASE})")
    parser.add_argument("--samples", type=int, default=5, help="measured runs per side (default 5)")
    parser.add_argument("pytest_args", nargs="*", help="passed to both pytest runs (after --)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"base": [], "this": []}
    with base_and_this(args.base) as sides:
        counts = {side: _run(root, args.pytest_args)[1] for side, root in sides.items()}  # warm-up
        alternate(sides, args.samples, lambda side, root: times[side].append(_run(root, args.pytest_args)[0]))
    medians = {side: statistics.median(values) for side, values in times.items()}
    ratio = medians["this"] / medians["base"]
    print(f"conformance suite, warm, -n 2, {args.base} (base) vs this checkout, medians of {args.samples} runs:")
    for side in sides:
        runs = ", ".join(f"{t:.1f}" for t in times[side])
        print(f"  {side:<5} {medians[side]:7.1f} s  ({counts[side]}; runs {runs})")
    print(f"  ratio this/base {ratio:.2f} (target <= {TARGET:.2f}: {'MET' if ratio <= TARGET else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

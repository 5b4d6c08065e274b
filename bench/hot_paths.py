"""The hot paths of this checkout against another commit's, side by side in one run:

    .venv/bin/python bench/hot_paths.py [--base REV] [--samples 7]

Guest restore to ready (GDB attached), one MI round trip (a cached 3-register read) and one
syscall trace, timed by bench/hot_path_probe.py in a fresh interpreter per sample, with the
base commit's package (a temporary `git worktree`) or this checkout's first on PYTHONPATH;
the two sides alternate so that both see the same machine load. Prints the medians, the ratio
this/base, and MET where this checkout is at most 10 % slower (a shared 2-core machine is
noisier than that between two runs of the same code). Exit status 0 unless the benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from sides import alternate, base_and_this

BENCH_DIR = Path(__file__).resolve().parent
PROBE = BENCH_DIR / "hot_path_probe.py"
# The last commit of the flat package, before the layers.
DEFAULT_BASE = "771c386"
TOLERANCE = 1.10
PROBE_TIMEOUT = 900.0


def _sample(root: Path, rounds: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(PROBE), "--rounds", str(rounds)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    if done.returncode != 0:
        raise SystemExit(f"the probe failed on {root} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    package = Path(str(result.pop("package")))
    if not package.is_relative_to(root):
        raise SystemExit(f"the probe for {root} imported the package from {package}: PYTHONPATH did not win")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the commit to compare with (default {DEFAULT_BASE})")
    parser.add_argument("--samples", type=int, default=5, help="interpreters per side (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="restores and traces per interpreter (default 3)")
    args = parser.parse_args()
    samples: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}

    def take(side: str, root: Path) -> None:
        for name, values in _sample(root, args.rounds).items():
            samples[side].setdefault(name, []).extend(values)

    with base_and_this(args.base) as sides:
        alternate(sides, args.samples, take)
    print(f"hot paths, {args.base} (base) vs this checkout, medians of {args.samples} interpreters per side:")
    for name, unit, scale in (("restore", "s", 1.0), ("mi", "ms", 1000.0), ("trace", "s", 1.0)):
        base_median = statistics.median(samples["base"][name]) * scale
        this_median = statistics.median(samples["this"][name]) * scale
        ratio = this_median / base_median
        verdict = "MET" if ratio <= TOLERANCE else "MISSED"
        print(f"  {name:<8} base {base_median:8.3f} {unit:<2}  this {this_median:8.3f} {unit:<2}  "
              f"ratio {ratio:5.2f}  (target <= {TOLERANCE:.2f}: {verdict}; n={len(samples['this'][name])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

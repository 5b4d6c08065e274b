"""Timing this checkout against another commit's, side by side (bench/hot_paths.py,
bench/suite_time.py): the base commit as a temporary `git worktree`, and samples taken in
alternating order so that both sides see the same machine load."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def base_and_this(rev: str) -> Iterator[dict[str, Path]]:
    """{"base": a detached worktree of *rev*, "this": this checkout}; the worktree is removed after."""
    with tempfile.TemporaryDirectory(prefix="sirl-base-") as scratch:
        base = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), rev], cwd=ROOT, check=True)
        try:
            yield {"base": base, "this": ROOT}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)


def alternate(sides: dict[str, Path], samples: int, take: Callable[[str, Path], None]) -> None:
    """take(side, root) for each side, *samples* times, the order reversed every other time."""
    for number in range(samples):
        for side in list(sides) if number % 2 == 0 else list(reversed(sides)):
            take(side, sides[side])
        print(f"sample {number + 1}/{samples} done", file=sys.stderr)

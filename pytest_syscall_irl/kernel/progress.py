"""One progress line for a kernel build instead of make's scrolling output:

    building: 1234/~2871 steps (43%), 1:52 elapsed, ETA 2:26

A step is one line of kbuild's short output (`  CC      kernel/fork.o`, `  LD      vmlinux`, ...).
The total is what the last finished build with the same fragment took (recorded in its
`complete` file); without one the line shows the count and the elapsed time only. An
incremental build ends well before that total: the ETA is an upper bound then.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

KBUILD_STEP = re.compile(r"^  [A-Z][A-Z0-9_-]*\s+\S")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def previous_steps(kernels: Path, fragment_sha256: str) -> int | None:
    """Steps of the most recent finished build with this fragment under <cache>/kernels, if any."""
    best: tuple[float, int] | None = None
    for record in kernels.glob("*/complete"):
        try:
            data = json.loads(record.read_text())
            mtime = record.stat().st_mtime
        except (OSError, ValueError):
            continue
        steps = data.get("steps")
        if data.get("fragment_sha256") == fragment_sha256 and isinstance(steps, int) and steps > 0:
            if best is None or mtime > best[0]:
                best = (mtime, steps)
    return best[1] if best else None


class BuildProgress:
    """Counts kbuild steps from make's output and reports them through *show*, at most once
    per *interval* seconds (a terminal redraws one line; a CI log gets a line per interval)."""

    def __init__(self, show: Callable[[str], None], total: int | None = None, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.show = show
        self.total = total
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.steps = 0
        self._last_shown = float("-inf")

    def feed(self, line: str) -> None:
        """One line of make's output."""
        if not KBUILD_STEP.match(line):
            return
        self.steps += 1
        now = self.clock()
        if now - self._last_shown >= self.interval:
            self._last_shown = now
            self.show(self.render(now))

    def render(self, now: float | None = None) -> str:
        """The progress line as of *now*."""
        elapsed = (self.clock() if now is None else now) - self.started
        if not self.total:
            return f"building: {self.steps} steps, {_clock(elapsed)} elapsed"
        done = min(self.steps, self.total)
        eta = elapsed / done * (self.total - done) if done else 0.0
        return (f"building: {self.steps}/~{self.total} steps ({100 * done // self.total}%), "
                f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")

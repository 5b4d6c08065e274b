"""Throughput of guest command output: the agent's own serial port vs the shared console line.

    .venv/bin/python bench/channel.py          # standalone; bench/run.py calls `measure`

- command channel (ttyS1, frames): `cat` of a 10 MB file made in the guest, and 1 MB;
- shared line (ttyS0, a one-port machine, as a kernel with one 8250 port gets): 200 KB read
  with the search window pexpect now gets, and without it (the old quadratic reading).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pytest_syscall_irl.lab.guest import Guest, Lab  # noqa: E402
from pytest_syscall_irl.machine import console as console_module  # noqa: E402

MB = 1 << 20


@dataclass(frozen=True)
class Throughput:
    """Seconds to read each size of output, by channel."""

    channel_10mb: float
    channel_1mb: float
    line_200kb: float
    line_200kb_unwindowed: float | None  # None: skipped


def _read(guest: Guest, command: str, size: int) -> float:
    start = time.monotonic()
    result = guest.run(command, timeout=600)
    elapsed = time.monotonic() - start
    if len(result.output) != size and len(result.data) != size:
        raise RuntimeError(f"{command!r}: {len(result.data)} bytes, expected {size}")
    return elapsed


def _on_channel(lab: Lab) -> tuple[float, float]:
    guest = lab.boot()
    try:
        guest.run(f"head -c {10 * MB} /dev/urandom > /tmp/big").check()
        ten = _read(guest, "cat /tmp/big", 10 * MB)
        one = _read(guest, f"head -c {MB} /tmp/big", MB)
        return ten, one
    finally:
        guest.shutdown()


def _on_the_shared_line(lab: Lab, unwindowed: bool) -> tuple[float, float | None]:
    config = dataclasses.replace(lab.machine_config(), channel=False)
    guest = lab._cold_boot(f"one-port-{os.getpid()}", 90, config)
    command = f"head -c {200 * 1024} /dev/zero | tr '\\0' x"
    try:
        windowed = _read(guest, command, 200 * 1024)
        if not unwindowed:
            return windowed, None
        saved, console_module.SEARCH_WINDOW = console_module.SEARCH_WINDOW, None  # type: ignore[assignment]
        try:
            return windowed, _read(guest, command, 200 * 1024)
        finally:
            console_module.SEARCH_WINDOW = saved
    finally:
        guest.shutdown()


def measure(lab: Lab, unwindowed: bool = True) -> Throughput:
    """One sample of each (a 10 MB read takes seconds; the old line's 200 KB about as long)."""
    ten, one = _on_channel(lab)
    line, old = _on_the_shared_line(lab, unwindowed)
    return Throughput(ten, one, line, old)


def report(found: Throughput) -> list[str]:
    """The figures, one line each."""
    lines = [f"command output, channel ttyS1: 10 MB in {found.channel_10mb:.2f} s "
             f"({10 / found.channel_10mb:.2f} MB/s); 1 MB in {found.channel_1mb:.2f} s",
             f"command output, shared line ttyS0 (fallback), 200 KB: {found.line_200kb:.2f} s "
             f"({0.2 / found.line_200kb:.3f} MB/s) with pexpect's search window"]
    if found.line_200kb_unwindowed is not None:
        lines.append(f"  the same without a search window (the old reading): {found.line_200kb_unwindowed:.2f} s")
    return lines


def main() -> int:
    from run import settings
    with tempfile.TemporaryDirectory(prefix="sirl-bench-") as tmp:
        for line in report(measure(Lab(settings(), Path(tmp) / "logs"))):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

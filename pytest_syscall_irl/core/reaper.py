"""The reaper: one small process per pytest process that kills what pytest started once
pytest is gone, however it went (SIGKILL, os._exit, a crash).

PR_SET_PDEATHSIG (see `procs`) kills only a direct child: the real QEMU under a --qemu
wrapper script that does not `exec` outlives pytest with it. The reaper closes that gap.
It runs this file as a script (`python -I -S reaper.py`: standard library only, so that it
starts in milliseconds and imports nothing of the package), in a session of its own, with
the read end of a pipe as stdin; only pytest holds the write end. Each child that pytest
starts writes `+PGID` to the pipe itself, between fork and exec, so no window is left in
which a group runs unrecorded; pytest writes `-PGID` once it has ended that group. When
the pipe reaches end of file, the writer has died (or exited): the reaper SIGKILLs every
group still recorded and exits.

A recorded group that has emptied on its own is forgotten at the next look (once a second),
so that its number, free again, is never mistaken for a stranger's group.
"""

from __future__ import annotations

import os
import select
import signal

LOOK_EVERY = 1.0  # seconds between looks for groups that have emptied on their own


def _exists(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def apply(groups: set[int], line: bytes) -> None:
    """Apply one message of the protocol to *groups*: b"+123" records group 123, b"-123"
    forgets it; anything else is ignored (a reaper must not die of a bad line)."""
    sign, number = line[:1], line[1:]
    if not number.isdigit() or int(number) <= 1:
        return
    if sign == b"+":
        groups.add(int(number))
    elif sign == b"-":
        groups.discard(int(number))


def reap(groups: set[int]) -> None:
    """SIGKILL every group of *groups* that still exists."""
    for group in sorted(groups):
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def serve(fd: int = 0) -> None:
    """Read the protocol from *fd* until end of file, then reap what is still recorded."""
    groups: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], LOOK_EVERY)
        if not ready:
            groups = {group for group in groups if _exists(group)}
            continue
        data = os.read(fd, 4096)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            apply(groups, line.strip())
    reap(groups)


def main() -> None:
    # No terminal signal reaches a session leader without a terminal; a SIGINT sent to
    # pytest's group by hand must not take the reaper before pytest has finished either.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chdir("/")  # hold no directory busy (a tmpfs a test wants to unmount)
    serve(0)


if __name__ == "__main__":
    main()

"""The kernel's console (ttyS0) when the agent has a channel of its own: kernel messages only.

A thread reads the console socket all the time (an unread socket would stall the guest's
UART, and printk with it) and looks at each whole line: a panic, Oops, BUG or kernel
GP fault marks the kernel as crashed, a WARNING (``WARNING: CPU: 0 PID: 1 at ...``) is
recorded and nothing more: a WARN_ON is a kernel bug worth a report, but the guest still
runs and the command's answer is still true. QEMU itself writes the whole stream to the
console log file (``logfile=`` of the chardev); the thread keeps a tail for errors.

Program output never comes here, so it can never look like a crash.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import deque

log = logging.getLogger(__name__)

# A kernel GP fault reads "general protection fault: 0000 [#1]" or "..., probably for
# non-canonical address ...: 0000 [#1]"; a user one is a "traps: prog[pid] general
# protection fault ip:..." line, which is no crash of the kernel.
CRASH = re.compile(r"Kernel panic - not syncing|\bOops\b[:\s]|\bBUG: |general protection fault[:,]")
WARNING = re.compile(r"\bWARNING: CPU: \d+ PID: \d+")
TAIL_LINES = 400
RECV_SIZE = 65536


class KernelLog:
    """Reads the kernel's console from *sock* in a thread; `crash` and `warnings` tell
    what it saw. *seen* is what was read from the socket before (the boot's lines)."""

    def __init__(self, sock: socket.socket, seen: str = "") -> None:
        self._sock = sock
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial = ""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.crash: str | None = None  # the first crash line not yet reported
        self.crashed_at: float | None = None
        self.warnings: list[str] = []  # every WARNING line seen
        self._ended = False
        self._add(seen)
        self._thread = threading.Thread(target=self._read, name="sirl-kernel-log", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(RECV_SIZE)
                if not data:
                    break
                text = data.decode("utf-8", errors="replace")
                with self._lock:
                    self._add(text)
                    self._changed.notify_all()
        except OSError:  # closed by `close()`
            pass
        with self._lock:
            self._ended = True
            self._changed.notify_all()

    def _add(self, text: str) -> None:
        lines = (self._partial + text.replace("\r", "")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._lines.append(line)
            if CRASH.search(line) and self.crash is None:
                self.crash, self.crashed_at = line, time.monotonic()
                log.warning("guest kernel crashed: %s", line)
            elif WARNING.search(line):
                self.warnings.append(line)
                log.warning("guest kernel warning: %s", line)

    @property
    def ended(self) -> bool:
        """The console closed (QEMU exited)."""
        return self._ended

    def tail(self, lines: int = 60) -> str:
        """The last *lines* lines, the one being written included."""
        with self._lock:
            every = [*self._lines, self._partial] if self._partial else list(self._lines)
        return "\n".join(every[-lines:])

    def take_crash(self, grace: float) -> str | None:
        """The crash seen, if any, with the lines that followed within *grace* s of it (the
        trace), or until the console closed; a crash is reported once."""
        with self._lock:
            if self.crash is None or self.crashed_at is None:
                return None
            until = self.crashed_at + grace
            while not self._ended and time.monotonic() < until:
                self._changed.wait(until - time.monotonic())
            self.crash = self.crashed_at = None
        return self.tail()

    def wait_ended(self, timeout: float) -> bool:
        """Wait up to *timeout* s for the console to close; whether it did."""
        with self._lock:
            return self._changed.wait_for(lambda: self._ended, timeout)

    def close(self) -> None:
        """Stop reading and close the socket."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=2.0)
        self._sock.close()

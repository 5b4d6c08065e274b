"""The guest's serial console, driven with pexpect over QEMU's unix socket.

The guest runs an agent (guest/init) that reads one command per line and frames its
output with markers it writes to fd 3, never to fd 1. Markers are built in the
guest from an id the host sends, so the text the host sends never contains a marker
and an echo could never match one. Kernel messages interleaved with the output are
dropped from it; a panic, Oops or BUG raises GuestPanic at once with its text.
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pexpect
from pexpect import fdpexpect

from ..core.errors import ConsoleError, ConsoleTimeout, GuestPanic, tail

log = logging.getLogger(__name__)

READY = re.compile(r"SIRL\{READY:(\w+):(\S+)\}")
# A kernel GP fault reads "general protection fault: 0000 [#1]" or "..., probably for
# non-canonical address ...: 0000 [#1]"; a user one is a "traps: prog[pid] general
# protection fault ip:..." line, which is no crash of the kernel.
PANIC = re.compile(r"Kernel panic - not syncing|\bOops\b[:\s]|\bBUG: |general protection fault[:,]")
# One kernel message as the console prints it (printk.time=1): "[    4.324469] text\r\n". The
# console writes a record whole, but between any two bytes of what the guest's programs
# write to the same serial line, so a record may sit in the middle of a line of theirs.
KERNEL_RECORD = r"\[\s*\d+\.\d{6}\] [^\n]*\n"
KERNEL_RECORDS = re.compile(KERNEL_RECORD)
# After a panic line, keep reading this long to capture the trace that follows it.
PANIC_GRACE = 1.0


@dataclass(frozen=True)
class CommandResult:
    """What a guest command printed (kernel messages removed) and its exit status."""

    command: str
    output: str
    status: int

    def check(self) -> CommandResult:
        """Raise ConsoleError unless the command exited 0."""
        if self.status != 0:
            raise ConsoleError(f"guest command failed with status {self.status}: {self.command}",
                               exit_code=self.status, log_tail=self.output)
        return self


def clean_output(raw: str) -> str:
    """Drop the kernel messages (printk.time prefix) from *raw*, wherever they sit, and
    normalise line ends: "hel[    4.3] probe\r\nlo\r\n" is "hello\n"."""
    return KERNEL_RECORDS.sub("", raw.replace("\r", ""))


class PendingCommand:
    """A command sent to the guest whose end has not been read yet."""

    def __init__(self, console: GuestConsole, ident: int, command: str) -> None:
        self.console = console
        self.ident = ident
        self.command = command
        self.result: CommandResult | None = None
        self.begun = False  # its begin marker has been read

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Read the command's output until its end marker; returns its result."""
        if self.result is None:
            self.result = self.console._finish(self, timeout)
        return self.result

    def poll(self) -> CommandResult | None:
        """The command's result if it has ended, else None, without waiting (reads what
        the guest has printed so far)."""
        if self.result is None:
            try:
                self.result = self.console._finish(self, 0)
            except ConsoleTimeout:
                return None
        return self.result


class GuestConsole:
    """The serial console of a booted guest: `run()` commands, `wait_ready()` for boot."""

    def __init__(self, socket_path: Path, transcript: Path | None = None, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: PendingCommand | None = None
        self._sock: socket.socket | None = None
        self._log: IO[str] | None = open(transcript, "a", encoding="utf-8") if transcript else None
        self._child: fdpexpect.fdspawn | None = None
        self.delivery: str | None = None
        self.release: str | None = None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the console socket (QEMU creates it at launch)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ConsoleError(f"cannot connect to the guest console {self.socket_path}") from exc
                time.sleep(0.01)
        self._sock = sock
        self._child = fdpexpect.fdspawn(sock, encoding="utf-8", codec_errors="replace", timeout=timeout)
        self._child.logfile_read = self._log

    @property
    def child(self) -> fdpexpect.fdspawn:
        if self._child is None:
            raise ConsoleError("guest console is not connected")
        return self._child

    def expect(self, pattern: re.Pattern[str], timeout: float | None = None) -> re.Match[str]:
        """Wait for *pattern*; a panic, EOF or timeout raises with the console tail."""
        timeout = self.timeout if timeout is None else timeout
        try:
            index = self.child.expect([pattern, PANIC], timeout=timeout)
        except pexpect.TIMEOUT as exc:
            raise ConsoleTimeout(f"guest console: no {pattern.pattern!r} within {timeout:.0f} s",
                                 log_tail=tail(self._seen())) from exc
        except pexpect.EOF as exc:
            raise ConsoleError("guest console closed (QEMU exited?)", log_tail=tail(self._seen())) from exc
        if index == 1:
            raise GuestPanic("guest kernel crashed", log_tail=self._panic_text())
        match = self.child.match
        assert isinstance(match, re.Match)
        return match

    def _seen(self) -> str:
        child = self.child
        return str(child.before or "") + (child.after if isinstance(child.after, str) else "")

    def _panic_text(self) -> str:
        text = self._seen()
        try:
            self.child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=PANIC_GRACE)
            text += str(self.child.before or "")
        except Exception:
            pass
        return tail(text.replace("\r", ""), 60)

    def wait_ready(self, timeout: float = 60.0, silence: float | None = None) -> str:
        """Wait for the agent's ready line; returns the payload delivery it found.

        With *silence*, a guest that prints nothing at all within that many seconds is
        reported at once rather than after *timeout*: it is not booting slowly, it is not
        running (a KVM that hangs) or not talking on this console.
        """
        if silence is not None and silence < timeout:
            started = time.monotonic()
            try:
                self.child.expect(re.compile(".", re.DOTALL), timeout=silence)
                # Put the byte back: with `quiet` it may be the start of the READY line.
                self.child.buffer = str(self.child.after) + self.child.buffer
            except pexpect.TIMEOUT as exc:
                raise ConsoleError(f"the guest printed nothing at all on its console within {silence:.0f} s "
                                   "(a cold boot prints its first line in ~1.5 s under TCG): the vCPU is not "
                                   "running (under KVM: see --accel=tcg) or the kernel has no serial console "
                                   "(CONFIG_SERIAL_8250_CONSOLE)") from exc
            except pexpect.EOF as exc:
                raise ConsoleError("guest console closed before the guest printed anything (QEMU exited?)") from exc
            timeout -= time.monotonic() - started
        match = self.expect(READY, timeout)
        self.delivery, self.release = match.group(1), match.group(2)
        return self.delivery

    def start(self, command: str) -> PendingCommand:
        """Send *command* without waiting for it (e.g. while a debugger holds the guest)."""
        if "\n" in command or "\r" in command:
            raise ValueError("a guest command is one line: join commands with ';'")
        self.drain()
        pending = PendingCommand(self, next(self._ids), command)
        self.child.send(f"{pending.ident} {command}\n")
        self._pending = pending
        return pending

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run *command* in the guest; returns its output and exit status."""
        return self.start(command).wait(timeout)

    @property
    def pending(self) -> PendingCommand | None:
        """The command started last, if its end has not been read yet."""
        return self._pending

    def drain(self, timeout: float | None = None) -> None:
        """Finish reading a command started earlier, so output never mixes."""
        if self._pending is not None:
            self._pending.wait(timeout)

    def _finish(self, pending: PendingCommand, timeout: float | None) -> CommandResult:
        ident = pending.ident
        if not pending.begun:
            # Kernel messages may come between the marker and its line end.
            self.expect(re.compile(r"SIRL\{%d:B\}(?:\r*%s)*\r*\n" % (ident, KERNEL_RECORD)), timeout)
            pending.begun = True
        end = self.expect(re.compile(r"SIRL\{%d:E:(\d+)\}" % ident), timeout)
        output = clean_output(str(self.child.before or ""))
        if self._pending is pending:
            self._pending = None
        return CommandResult(pending.command, output, int(end.group(1)))

    def close(self) -> None:
        """Close the connection (the guest keeps running)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._child = None
        if self._log is not None:
            self._log.close()
            self._log = None

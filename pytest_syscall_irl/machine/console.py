"""The guest's console: the agent's commands, and the kernel's messages, over QEMU's unix sockets.

The guest runs an agent (guest/agent.c) that reads one command per line. Where the kernel
drives a second serial port, the agent talks on it (ttyS1) in length-prefixed frames,
byte for byte (machine/channel.py), and the kernel's console (ttyS0) carries only kernel
messages, read by a thread that alone decides that the kernel crashed (machine/kernel_log.py).
Where it does not, everything shares ttyS0 as before: the agent frames output with markers
it writes to fd 3, never to fd 1, built in the guest from an id the host sends (so an echo
could never match one); kernel messages are taken out of the output by pattern and a line
that looks like a panic, Oops or BUG raises GuestPanic, even when a program printed it.
The READY line the agent prints on ttyS0 at boot says which channel it uses.
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pexpect
from pexpect import fdpexpect

from ..core.errors import ConsoleClosed, ConsoleError, ConsoleTimeout, GuestPanic, tail
from .channel import BEGIN, END, OUTPUT, CommandChannel
from .kernel_log import KernelLog

log = logging.getLogger(__name__)

# SIRL{READY:<delivery>:<release>:<channel>}; an agent of before the channel says no channel.
READY = re.compile(r"SIRL\{READY:(\w+):([^:}\s]+)(?::(\w+))?\}")
SHARED_LINE = "ttyS0"  # the kernel's console, when the agent has no port of its own
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
# On the shared line, pexpect searches only this many bytes before the newest data: without a
# window it searches its whole buffer again at every read, and reading N bytes of output costs
# O(N^2) (1 MB: 174 s). Markers, with the kernel records that may sit inside one, fit well within.
SEARCH_WINDOW = 8192
# How much of a command's output the transcript keeps (command channel).
TRANSCRIPT_OUTPUT = 4096
# How often a wait on the command channel looks at the kernel log for a crash.
CRASH_POLL = 0.05


@dataclass(frozen=True)
class CommandResult:
    """What a guest command printed and its exit status. On the command channel *data* is
    its output byte for byte and *output* its UTF-8 reading; on the shared line, kernel
    messages are taken out and line ends normalised (*data* is then *output* encoded)."""

    command: str
    output: str
    status: int
    data: bytes = field(default=b"", repr=False, compare=False)

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
        self.chunks: list[bytes] = []  # its output so far (command channel)

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
    """The console of a booted guest: `run()` commands, `wait_ready()` for boot.

    *channel_path* names the FIFOs of the agent's own port (ttyS1; PATH.in, PATH.out), if the
    machine has one;
    the agent uses it when the kernel drives it (`channel` tells, after `wait_ready` or
    `use_channel`).
    """

    def __init__(self, socket_path: Path, transcript: Path | None = None, timeout: float = 30.0,
                 channel_path: Path | None = None) -> None:
        self.socket_path = socket_path
        self.channel_path = channel_path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: PendingCommand | None = None
        self._sock: socket.socket | None = None
        self._log: IO[str] | None = open(transcript, "a", encoding="utf-8") if transcript else None
        self._child: fdpexpect.fdspawn | None = None
        self._channel: CommandChannel | None = None
        self._kernel_log: KernelLog | None = None
        self.delivery: str | None = None
        self.release: str | None = None
        self.channel = SHARED_LINE  # the port the agent talks on

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the console socket, and open the channel (QEMU makes both ready at launch)."""
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
        if self.channel_path is not None:
            self._channel = CommandChannel.open(self.channel_path, max(deadline - time.monotonic(), 1.0))

    @property
    def child(self) -> fdpexpect.fdspawn:
        if self._child is None:
            raise ConsoleError("guest console is not connected")
        return self._child

    @property
    def framed(self) -> bool:
        """Commands travel on the agent's own port (else on the shared line)."""
        return self._kernel_log is not None

    @property
    def kernel_warnings(self) -> list[str]:
        """The kernel WARNING lines seen on the console (command channel only: on the shared
        line they are not told apart from output)."""
        return list(self._kernel_log.warnings) if self._kernel_log is not None else []

    @property
    def kernel_crash(self) -> str | None:
        """The panic, Oops, BUG or GP fault line the kernel log saw and nobody has reported yet
        (command channel only), or None."""
        return self._kernel_log.crash if self._kernel_log is not None else None

    def kernel_log_tail(self, lines: int = 60) -> str:
        """The last kernel messages read (command channel), or the shared line's last text."""
        if self._kernel_log is not None:
            return self._kernel_log.tail(lines)
        return tail(self._seen().replace("\r", ""), lines) if self._child is not None else ""

    def use_channel(self, channel: str) -> None:
        """Talk to an agent on *channel* ("ttyS1": its own port; "ttyS0": the shared line).
        From the READY line at boot, or from the snapshot a guest was restored from."""
        if channel == SHARED_LINE or self.framed:
            return
        if self._channel is None or self._sock is None:
            raise ConsoleError(f"the guest's agent talks on {channel}, but the machine has no socket for it")
        # From here the kernel's console is read by a thread, and only for kernel messages.
        seen = self._seen() + str(self.child.buffer or "")
        self._kernel_log = KernelLog(self._sock, seen)  # QEMU logs the console whole (console.log)
        self.channel = channel

    def expect(self, pattern: re.Pattern[str], timeout: float | None = None) -> re.Match[str]:
        """Wait for *pattern* on the shared line; a panic, EOF or timeout raises with the console tail."""
        timeout = self.timeout if timeout is None else timeout
        try:
            index = self.child.expect([pattern, PANIC], timeout=timeout, searchwindowsize=SEARCH_WINDOW)
        except pexpect.TIMEOUT as exc:
            raise ConsoleTimeout(f"guest console: no {pattern.pattern!r} within {timeout:.0f} s",
                                 log_tail=tail(self._seen())) from exc
        except pexpect.EOF as exc:
            raise ConsoleClosed("guest console closed (QEMU exited?)", log_tail=tail(self._seen())) from exc
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
        """Wait for the agent's ready line; returns the payload delivery it found, and from
        then on talks on the channel it names.

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
                                   "running (under KVM: see --syscall-irl-accel=tcg) or the kernel has no serial "
                                   "console (CONFIG_SERIAL_8250_CONSOLE)") from exc
            except pexpect.EOF as exc:
                raise ConsoleClosed("guest console closed before the guest printed anything (QEMU exited?)") from exc
            timeout -= time.monotonic() - started
        match = self.expect(READY, timeout)
        self.delivery, self.release = match.group(1), match.group(2)
        self.use_channel(match.group(3) or SHARED_LINE)
        return self.delivery

    def start(self, command: str) -> PendingCommand:
        """Send *command* without waiting for it (e.g. while a debugger holds the guest)."""
        if "\n" in command or "\r" in command:
            raise ValueError("a guest command is one line: join commands with ';'")
        self.drain()
        pending = PendingCommand(self, next(self._ids), command)
        line = f"{pending.ident} {command}\n"
        if self._channel is not None and self.framed:
            self._channel.send(line.encode())
        else:
            self.child.send(line)
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
        result = self._finish_framed(pending, timeout) if self.framed else self._finish_line(pending, timeout)
        if self._pending is pending:
            self._pending = None
        return result

    def _finish_line(self, pending: PendingCommand, timeout: float | None) -> CommandResult:
        ident = pending.ident
        if not pending.begun:
            # Kernel messages may come between the marker and its line end.
            self.expect(re.compile(r"SIRL\{%d:B\}(?:\r*%s)*\r*\n" % (ident, KERNEL_RECORD)), timeout)
            pending.begun = True
        end = self.expect(re.compile(r"SIRL\{%d:E:(\d+)\}" % ident), timeout)
        output = clean_output(str(self.child.before or ""))
        return CommandResult(pending.command, output, int(end.group(1)), output.encode())

    def _finish_framed(self, pending: PendingCommand, timeout: float | None) -> CommandResult:
        assert self._channel is not None and self._kernel_log is not None
        channel, kernel_log = self._channel, self._kernel_log
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for frame in channel.read(min(CRASH_POLL, deadline - time.monotonic())):
                if frame.ident != pending.ident:
                    log.debug("frame %r of command %d while waiting for %d", frame.kind, frame.ident, pending.ident)
                elif frame.kind == OUTPUT:
                    pending.chunks.append(frame.payload)
                elif frame.kind == BEGIN:
                    pending.begun = True
                elif frame.kind == END:
                    self._raise_on_crash()
                    data = b"".join(pending.chunks)
                    pending.chunks = []
                    result = CommandResult(pending.command, data.decode("utf-8", errors="replace"), frame.status, data)
                    self._record(result)
                    return result
            self._raise_on_crash()
            if channel.closed:
                kernel_log.wait_ended(PANIC_GRACE)
                self._raise_on_crash()
                raise ConsoleClosed("the guest's command channel closed (QEMU exited?)",
                                   log_tail=self._wait_tail(pending))
            if time.monotonic() >= deadline:
                raise ConsoleTimeout(f"guest command {pending.command!r} did not end within {timeout:.0f} s",
                                     log_tail=self._wait_tail(pending))

    def _record(self, result: CommandResult) -> None:
        # The transcript shows what the commands printed, as the shared line's did (the
        # kernel's console log now holds only kernel messages); long output is cut.
        if self._log is None:
            return
        output = result.output if len(result.output) <= TRANSCRIPT_OUTPUT else (
            result.output[:TRANSCRIPT_OUTPUT] + f"\n[... {len(result.data)} bytes in all]\n")
        self._log.write(f"$ {result.command}\n{output}{'' if output.endswith(chr(10)) or not output else chr(10)}"
                        f"[exit {result.status}]\n")
        self._log.flush()

    def _raise_on_crash(self) -> None:
        assert self._kernel_log is not None
        text = self._kernel_log.take_crash(PANIC_GRACE)
        if text is not None:
            raise GuestPanic("guest kernel crashed", log_tail=text)

    def _wait_tail(self, pending: PendingCommand) -> str:
        output = b"".join(pending.chunks).decode("utf-8", errors="replace")
        return (f"--- the command's output so far ---\n{tail(output, 20)}\n"
                f"--- kernel console ---\n{self.kernel_log_tail(30)}")

    def close(self) -> None:
        """Close the connections (the guest keeps running)."""
        if self._kernel_log is not None:
            self._kernel_log.close()  # closes the console socket
            self._kernel_log = None
            self._sock = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._child = None
        if self._log is not None:
            self._log.close()
            self._log = None

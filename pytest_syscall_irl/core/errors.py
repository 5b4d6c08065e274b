"""One error hierarchy for everything the domain modules raise, and the failure classes
every face reports with.

Every error that comes from a child process carries what is needed to act on it
without re-running: the command line, the exit code and the tail of the relevant log.

Failure classes (`FailureClass`): a red result must say whose fault it is.
- violation: the kernel broke an invariant (a test's assertion failed);
- crash: the kernel crashed (a panic, Oops, BUG on its console: `GuestPanic`) or never
  reached the guest's agent (`BootFailure`);
- harness: GDB, QEMU, the console, our own code or one of its deadlines broke: says
  nothing about the kernel;
- usage: the run was asked for something it cannot do (`ConfigError`): no commit can fix it.
Each error class carries its class (`failure_class`); `classify` reads it off any exception.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence

TAIL_LINES = 40


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last *lines* lines of *text*, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


class FailureClass(enum.Enum):
    """Whose fault a failed test is (see the module docstring)."""

    VIOLATION = "violation"
    CRASH = "crash"
    HARNESS = "harness"
    USAGE = "usage"

    @property
    def kernel_at_fault(self) -> bool:
        """True for the classes that blame the kernel under test (violation, crash)."""
        return self in (FailureClass.VIOLATION, FailureClass.CRASH)


class SyscallIrlError(Exception):
    """Base class of every error raised by pytest-syscall-irl.

    Its `failure_class` is harness unless the subclass (or the instance) says otherwise:
    an error of ours that nobody classified must not blame the kernel."""

    failure_class: FailureClass = FailureClass.HARNESS

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] | None = None,
        exit_code: int | None = None,
        log_tail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.command = list(command) if command is not None else None
        self.exit_code = exit_code
        self.log_tail = log_tail

    def __str__(self) -> str:
        parts = [self.message]
        if self.command is not None:
            parts.append("command: " + " ".join(self.command))
        if self.exit_code is not None:
            parts.append(f"exit code: {self.exit_code}")
        if self.log_tail:
            parts.append("log tail:\n" + self.log_tail)
        return "\n".join(parts)


class ConfigError(SyscallIrlError):
    """Bad user input (a path, an option value); the plugin turns it into a usage error."""

    failure_class = FailureClass.USAGE


class KernelError(SyscallIrlError):
    """A kernel artifact is unusable, or a kernel build failed."""


class ImageError(SyscallIrlError):
    """The guest image (initramfs, payloads, ISO) could not be built."""


class QemuError(SyscallIrlError):
    """QEMU failed to start, exited early, or misbehaved."""


class StateLoadError(QemuError):
    """QEMU could not load a saved machine state (a damaged or foreign snapshot)."""


class GdbError(SyscallIrlError):
    """GDB failed, timed out, or answered an MI command with ^error."""


class ConsoleError(SyscallIrlError):
    """The guest console timed out or lost its connection."""


class GuestPanic(ConsoleError):
    """The guest kernel printed a panic, an Oops or a BUG (a console error by where it is
    seen, a crash by whose fault it is)."""

    failure_class = FailureClass.CRASH


class BootFailure(SyscallIrlError):
    """The kernel never reached the guest's agent: it panicked while booting, or QEMU exited
    on its own before the agent was ready (with `panic=-1 -no-reboot`, a panic or a triple
    fault). Raised by `Lab.boot`; its cause is the console's error."""

    failure_class = FailureClass.CRASH


class KernelWarning(SyscallIrlError):
    """The kernel printed a WARNING (a WARN_ON that fired) on its log while a test used the
    guest: the kernel found a bug in itself, whatever the test asserted. A crash by class."""

    failure_class = FailureClass.CRASH


class ConsoleClosed(ConsoleError):
    """The guest's console or command channel reached its end: QEMU exited (on its own, when
    a booting kernel panics or triple-faults under `panic=-1 -no-reboot`)."""


class ConsoleTimeout(ConsoleError):
    """The guest console did not print what was awaited in time."""


def causes(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and the exceptions it was raised from or while handling, nearest first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # `raise ... from None` hides the context: so does this walk.
        current = current.__cause__ if current.__cause__ is not None or current.__suppress_context__ \
            else current.__context__


def classify(exc: BaseException) -> FailureClass:
    """The failure class of *exc*, raised by a test: an AssertionError is a violation, one
    of our errors says its own class, anything else is the harness's (our own code broke).
    A crash anywhere in the chain wins: a GDB error raised because the kernel panicked
    under it is the kernel's crash, not GDB's."""
    if any(getattr(cause, "failure_class", None) is FailureClass.CRASH for cause in causes(exc)):
        return FailureClass.CRASH
    if isinstance(exc, SyscallIrlError):
        return exc.failure_class
    if isinstance(exc, AssertionError):
        return FailureClass.VIOLATION
    return FailureClass.HARNESS


class SyscallIrlWarning(UserWarning):
    """Something was wrong and has been repaired (a damaged cache rebuilt): worth knowing."""

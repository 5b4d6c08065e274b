"""One error hierarchy for everything the domain modules raise.

Every error that comes from a child process carries what is needed to act on it
without re-running: the command line, the exit code and the tail of the relevant log.
"""

from __future__ import annotations

from collections.abc import Sequence

TAIL_LINES = 40


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last *lines* lines of *text*, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


class SyscallIrlError(Exception):
    """Base class of every error raised by pytest-syscall-irl."""

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
    """The guest kernel printed a panic, an Oops or a BUG."""


class ConsoleTimeout(ConsoleError):
    """The guest console did not print what was awaited in time."""


class SyscallIrlWarning(UserWarning):
    """Something was wrong and has been repaired (a damaged cache rebuilt): worth knowing."""

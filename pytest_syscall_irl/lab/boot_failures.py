"""A kernel that does not boot is booted once: the first boot failure of each guest variant
is remembered for the life of the process, and every later boot of that variant fails at
once with the same cause. Without it, a kernel that panics at boot was booted cold again
for every test (75 tests at -n 2: 7 minutes to report the same panic 75 times).

Only a failure that is the kernel's (a panic on the console while it booted, QEMU exiting
on its own before the agent was ready) is remembered, as a `BootFailure` (failure class:
crash). A timeout or a broken QEMU or console is the harness's: it may not happen again,
so the next test tries again. No pytest here: `Lab.boot` holds the memory.

    failures = BootFailures()
    failures.check(variant)                 # raises the remembered BootFailure, if any
    try:
        guest = boot()
    except SyscallIrlError as exc:
        failure = failures.judge(variant, exc)   # a BootFailure if the kernel died, else exc
        if failure is exc:
            raise
        raise failure from exc
"""

from __future__ import annotations

import logging
import re

from ..core.errors import BootFailure, ConsoleClosed, GuestPanic, SyscallIrlError, causes
from .variant import GuestVariant

log = logging.getLogger(__name__)

# The line of a kernel log that says why it died, for the one-line message (the log tail
# follows it in full).
CRASH_LINE = re.compile(r"(Kernel panic - not syncing.*|\bOops\b.*|\bBUG: .*|general protection fault.*)")


def kernel_died(exc: BaseException) -> bool:
    """True if *exc*, raised while a guest was being booted or restored, says the kernel
    died: it printed a panic (GuestPanic), or the console closed because QEMU exited by
    itself (the lab boots with `panic=-1` and `-no-reboot`: a panic or a triple fault ends
    QEMU). A console that timed out, or never connected, says nothing about the kernel."""
    for cause in causes(exc):
        if isinstance(cause, (GuestPanic, BootFailure)):
            return True
        if isinstance(cause, ConsoleClosed):  # the console's end: QEMU exited on its own
            return True
    return False


def _variant_text(variant: GuestVariant) -> str:
    return str(variant) or "the plain variant"


def _why(exc: SyscallIrlError) -> str:
    """The kernel's own last words, if its log tail has them; else the error's message."""
    found = CRASH_LINE.search(exc.log_tail or "")
    return found.group(1).strip() if found else exc.message


class BootFailures:
    """The first boot failure of each guest variant of one kernel (one `Lab`)."""

    def __init__(self) -> None:
        self._first: dict[GuestVariant, BootFailure] = {}

    def check(self, variant: GuestVariant) -> None:
        """Raise a BootFailure at once if *variant* failed to boot earlier in this process."""
        first = self._first.get(variant)
        if first is None:
            return
        raise BootFailure(f"not booted again, it did not boot earlier in this session: {first.message}",
                          log_tail=first.log_tail) from first

    def judge(self, variant: GuestVariant, exc: SyscallIrlError) -> SyscallIrlError:
        """The error a failed boot of *variant* raises: a BootFailure, remembered, if the kernel
        died; else *exc* itself (the harness's, not remembered)."""
        if isinstance(exc, BootFailure) or not kernel_died(exc):
            return exc
        failure = BootFailure(f"the kernel did not reach the guest's agent ({_variant_text(variant)}): {_why(exc)}",
                              command=exc.command, exit_code=exc.exit_code, log_tail=exc.log_tail)
        self._first.setdefault(variant, failure)
        log.warning("%s: later guests of this variant fail at once", failure.message)
        return failure

    def __contains__(self, variant: GuestVariant) -> bool:
        return variant in self._first

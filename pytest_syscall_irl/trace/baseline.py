"""The tracer of the baseline kernel (--syscall-irl-baseline): a `SyscallTracer` whose errors
blame the baseline, never the kernel under test (`lab.baseline.blaming_the_baseline`). No
pytest here: the plugin's `baseline_syscall_trace` fixture is one.
"""

from __future__ import annotations

from typing import Any

from ..lab.baseline import blaming_the_baseline
from ..machine.console import CommandResult
from .model import SyscallTrace
from .tracer import SyscallTracer


class BaselineTracer(SyscallTracer):
    """A SyscallTracer on the baseline's guest and GDB. A trace or count that fails there (the
    baseline panics, its command fails, its GDB breaks) raises the same error, classed harness
    and saying it was the baseline's: what the baseline does says nothing of the kernel under
    test. The test's own assertions comparing the two are untouched (violations)."""

    def trace(self, *args: Any, **kwargs: Any) -> SyscallTrace:
        with blaming_the_baseline():
            return super().trace(*args, **kwargs)

    def count(self, *args: Any, **kwargs: Any) -> tuple[int, CommandResult]:
        with blaming_the_baseline():
            return super().count(*args, **kwargs)

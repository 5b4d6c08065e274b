"""pytest-syscall-irl: assert invariants of the x86_64 syscall path of a real kernel, from inside.

The public surface: what a suite of invariants imports, from these names only (the way
`pytest` exposes what `_pytest` implements). The subpackages are the layers behind them
(see "How the code is organised" in README.md) and may move; these names stay.

    from pytest_syscall_irl import KERNEL_STAGES, SyscallTrace, x86

    def test_entry_is_lstar(syscall_trace, kernel):
        trace: SyscallTrace = syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
        assert trace["entry"]["rip"] == kernel.vmlinux.symbol("entry_SYSCALL_64")

Names are imported on first use: pytest loads this package in every run of its
environment, and a run without kernel tests need not import QEMU, GDB/MI or pexpect code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # the one place of the version (pyproject reads it): a plain literal

# Public name -> the module that implements it ("module:" names the module itself).
_PUBLIC: dict[str, str] = {
    # The architecture's facts and roads (x86_64 today).
    "x86": "pytest_syscall_irl.arch.x86_64.facts:",
    "roads": "pytest_syscall_irl.arch.x86_64.roads:",
    "tasks": "pytest_syscall_irl.arch.x86_64.tasks:",
    "X86_64": "pytest_syscall_irl.arch.x86_64",
    "Architecture": "pytest_syscall_irl.arch.base",
    "Road": "pytest_syscall_irl.arch.roads",
    "Abi": "pytest_syscall_irl.arch.roads",
    "Exit": "pytest_syscall_irl.arch.roads",
    # What a trace holds.
    "Stage": "pytest_syscall_irl.trace.model",
    "SyscallTrace": "pytest_syscall_irl.trace.model",
    "SyscallSelector": "pytest_syscall_irl.trace.model",
    "TraceError": "pytest_syscall_irl.trace.model",
    "NO_HANDLER": "pytest_syscall_irl.trace.model",
    # The stages of the architecture's traces, and the registers each records (x86_64 today).
    "STAGES": "pytest_syscall_irl.arch.x86_64",
    "USER_STAGES": "pytest_syscall_irl.arch.x86_64",
    "ENTRY_STAGES": "pytest_syscall_irl.arch.x86_64",
    "DISPATCH_STAGES": "pytest_syscall_irl.arch.x86_64",
    "HANDLER_STAGES": "pytest_syscall_irl.arch.x86_64",
    "EXIT_STAGES": "pytest_syscall_irl.arch.x86_64",
    "KERNEL_STAGES": "pytest_syscall_irl.arch.x86_64",
    "TRACE_REGISTERS": "pytest_syscall_irl.arch.x86_64",
    # The fixtures' types.
    "SyscallTracer": "pytest_syscall_irl.trace.tracer",
    "Kernel": "pytest_syscall_irl.kernel.artifacts",
    "Vmlinux": "pytest_syscall_irl.kernel.artifacts",
    "Guest": "pytest_syscall_irl.lab.guest",
    "CommandResult": "pytest_syscall_irl.machine.console",
    "GdbSession": "pytest_syscall_irl.machine.gdbmi",
    # Errors.
    "SyscallIrlError": "pytest_syscall_irl.core.errors",
    "ConfigError": "pytest_syscall_irl.core.errors",
    "KernelError": "pytest_syscall_irl.core.errors",
    "QemuError": "pytest_syscall_irl.core.errors",
    "GdbError": "pytest_syscall_irl.core.errors",
    "ConsoleError": "pytest_syscall_irl.core.errors",
    "GuestPanic": "pytest_syscall_irl.core.errors",
    "BootFailure": "pytest_syscall_irl.core.errors",
    "KernelWarning": "pytest_syscall_irl.core.errors",
    "FailureClass": "pytest_syscall_irl.core.errors",
    "CommandFailed": "pytest_syscall_irl.trace.tracer",
}

__all__ = [
    "Abi",
    "Architecture",
    "BootFailure",
    "CommandFailed",
    "CommandResult",
    "ConfigError",
    "ConsoleError",
    "DISPATCH_STAGES",
    "ENTRY_STAGES",
    "EXIT_STAGES",
    "Exit",
    "FailureClass",
    "GdbError",
    "GdbSession",
    "Guest",
    "GuestPanic",
    "HANDLER_STAGES",
    "KERNEL_STAGES",
    "Kernel",
    "KernelError",
    "KernelWarning",
    "NO_HANDLER",
    "QemuError",
    "Road",
    "STAGES",
    "Stage",
    "SyscallIrlError",
    "SyscallSelector",
    "SyscallTrace",
    "SyscallTracer",
    "TRACE_REGISTERS",
    "TraceError",
    "USER_STAGES",
    "Vmlinux",
    "X86_64",
    "roads",
    "tasks",
    "x86",
]


def __getattr__(name: str) -> Any:
    try:
        where = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'pytest_syscall_irl' has no attribute {name!r}") from None
    module_name, _, attribute = where.partition(":")
    module = importlib.import_module(module_name)
    value = module if where.endswith(":") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:
    from .arch.base import Architecture
    from .arch.roads import Abi, Exit, Road
    from .arch.x86_64 import (DISPATCH_STAGES, ENTRY_STAGES, EXIT_STAGES, HANDLER_STAGES, KERNEL_STAGES, STAGES,
                              TRACE_REGISTERS, USER_STAGES, X86_64)
    from .arch.x86_64 import facts as x86
    from .arch.x86_64 import roads, tasks
    from .core.errors import (BootFailure, ConfigError, ConsoleError, FailureClass, GdbError, GuestPanic,
                              KernelError, KernelWarning, QemuError, SyscallIrlError)
    from .kernel.artifacts import Kernel, Vmlinux
    from .lab.guest import Guest
    from .machine.console import CommandResult
    from .machine.gdbmi import GdbSession
    from .trace.model import NO_HANDLER, Stage, SyscallSelector, SyscallTrace, TraceError
    from .trace.tracer import CommandFailed, SyscallTracer

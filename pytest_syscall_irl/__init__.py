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

__version__ = "0.1.0"

# Public name -> the module that implements it ("module:" names the module itself).
_PUBLIC: dict[str, str] = {
    # The architecture's facts and roads (x86_64 today).
    "x86": "pytest_syscall_irl.arch.x86_64.facts:",
    "roads": "pytest_syscall_irl.arch.x86_64.roads:",
    "tasks": "pytest_syscall_irl.arch.x86_64.tasks:",
    "Road": "pytest_syscall_irl.arch.roads",
    "Abi": "pytest_syscall_irl.arch.roads",
    "Exit": "pytest_syscall_irl.arch.roads",
    # What a trace holds.
    "Stage": "pytest_syscall_irl.trace.model",
    "SyscallTrace": "pytest_syscall_irl.trace.model",
    "SyscallSelector": "pytest_syscall_irl.trace.model",
    "TraceError": "pytest_syscall_irl.trace.model",
    "NO_HANDLER": "pytest_syscall_irl.trace.model",
    "STAGES": "pytest_syscall_irl.trace.model",
    "USER_STAGES": "pytest_syscall_irl.trace.model",
    "ENTRY_STAGES": "pytest_syscall_irl.trace.model",
    "DISPATCH_STAGES": "pytest_syscall_irl.trace.model",
    "HANDLER_STAGES": "pytest_syscall_irl.trace.model",
    "EXIT_STAGES": "pytest_syscall_irl.trace.model",
    "KERNEL_STAGES": "pytest_syscall_irl.trace.model",
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
}

__all__ = [
    "Abi",
    "CommandResult",
    "ConfigError",
    "ConsoleError",
    "DISPATCH_STAGES",
    "ENTRY_STAGES",
    "EXIT_STAGES",
    "Exit",
    "GdbError",
    "GdbSession",
    "Guest",
    "GuestPanic",
    "HANDLER_STAGES",
    "KERNEL_STAGES",
    "Kernel",
    "KernelError",
    "NO_HANDLER",
    "QemuError",
    "Road",
    "STAGES",
    "Stage",
    "SyscallIrlError",
    "SyscallSelector",
    "SyscallTrace",
    "SyscallTracer",
    "TraceError",
    "USER_STAGES",
    "Vmlinux",
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
    from .arch.roads import Abi, Exit, Road
    from .arch.x86_64 import facts as x86
    from .arch.x86_64 import roads, tasks
    from .core.errors import (ConfigError, ConsoleError, GdbError, GuestPanic, KernelError, QemuError,
                              SyscallIrlError)
    from .kernel.artifacts import Kernel, Vmlinux
    from .lab.guest import Guest
    from .machine.console import CommandResult
    from .machine.gdbmi import GdbSession
    from .trace.model import (DISPATCH_STAGES, ENTRY_STAGES, EXIT_STAGES, HANDLER_STAGES, KERNEL_STAGES,
                              NO_HANDLER, STAGES, USER_STAGES, Stage, SyscallSelector, SyscallTrace, TraceError)
    from .trace.tracer import SyscallTracer

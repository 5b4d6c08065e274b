"""x86_64: the architecture's description (`X86_64`, handed to the tracer by the faces) and
the stage vocabulary of its traces, which the package top exports.

    from pytest_syscall_irl.arch.x86_64 import X86_64
    SyscallTracer(gdb, kernel, guest, X86_64)

The modules beside this one hold the facts (facts.py), the roads (roads.py), the running
task (tasks.py), the i386 numbers (abi_i386.py) and GDB's register views (registers.py).
They import their siblings by name (`from .facts import ...`, never `from . import`),
so that this module importing them draws no circle. No pytest here.
"""

from __future__ import annotations

from .architecture import X86_64, X86_64Architecture

__all__ = ["DISPATCH_STAGES", "ENTRY_STAGES", "EXIT_STAGES", "HANDLER_STAGES", "KERNEL_STAGES", "STAGES",
           "TRACE_REGISTERS", "USER_STAGES", "X86_64", "X86_64Architecture"]

USER_STAGES = X86_64.stages.user
ENTRY_STAGES = X86_64.stages.entry
# The C entries that take pt_regs, by road; a trace names its stage after the one it met.
DISPATCH_STAGES = X86_64.stages.dispatch
HANDLER_STAGES = X86_64.stages.handler
EXIT_STAGES = X86_64.stages.exit
KERNEL_STAGES = X86_64.stages.kernel
STAGES = X86_64.stages.all
# Registers recorded at every stage (one MI round trip).
TRACE_REGISTERS = X86_64.trace_registers

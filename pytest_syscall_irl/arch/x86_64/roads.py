"""The roads of a syscall into and out of an x86_64 kernel, one description each.

A road is a way in: the user instruction, where the CPU finds the kernel's entry, the
C function that takes the saved `struct pt_regs`, and the ABI it speaks (number and
argument registers, the handler names). An exit is a way out: SYSRET (64-bit `sysretq`
or compat `sysretl`, found by disassembling the entry code) or IRET (the common
`swapgs_restore_regs_and_return_to_usermode` ... `iretq`). The tracer (trace/walk.py) walks
every road with one walker; a new road (FRED's `asm_fred_entrypoint_user` with its
ERETU exit, say) is one more description here.

    int $0x80   (64- or 32-bit) -> IDT vector 0x80: entry_INT80_compat, or
                asm_int80_emulation where the int80 hardening is in (6.7, 6.1.y)
                -> do_int80_emulation / do_int80_syscall_32 -> ia32 handler -> IRET
    syscall     (64-bit) -> MSR_LSTAR: entry_SYSCALL_64 -> do_syscall_64 -> SYSRETQ or IRET
    syscall     (32-bit) -> MSR_CSTAR: entry_SYSCALL_compat -> do_fast_syscall_32 -> SYSRETL or IRET
    sysenter    (32-bit) -> MSR_IA32_SYSENTER_EIP: entry_SYSENTER_compat -> do_SYSENTER_32
                -> do_fast_syscall_32 -> SYSRETL or IRET

Which instruction a 32-bit process may use depends on the CPU's vendor (AMD-style
CPUs: `syscall`; Intel-style: `sysenter`). No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..roads import Abi, Exit, Road, RoadError, SyscallNames, road_named
from ..roads import road_of as _road_of
# `from .facts import`, not `from . import facts`: this package's __init__ imports this module.
from .abi_i386 import I386_SYSCALL_NUMBERS
from .facts import PT_REGS_ARGS, SYSCALL_ARG_REGISTERS

__all__ = ["ENTRY_STAGES", "EXITS", "IA32", "INT80", "IRET", "IRETQ_SYMBOL", "IRET_PATH_SYMBOL", "ROADS",
           "SYSCALL32", "SYSCALL64", "SYSENTER32", "SYSRETL", "SYSRETQ", "SYSRET_CODE", "X86_64", "Abi", "Exit",
           "Road", "RoadError", "SyscallNames", "road", "road_of"]

# The 64-bit ABI (not the architecture: that is the package's X86_64).
X86_64 = Abi("x86_64", 64, "rax", SYSCALL_ARG_REGISTERS, PT_REGS_ARGS, ("__x64_sys_",), "sys_call_table")
# ebx, ecx, edx, esi, edi, ebp (arch/x86/entry/entry_64_compat.S); compat handlers are
# __ia32_compat_sys_NAME where the 32-bit layout differs, else __ia32_sys_NAME. Kernels
# since the BHI changes build no ia32_sys_call_table: the i386 numbers are the fallback.
IA32 = Abi("ia32", 32, "rax", ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp"), ("bx", "cx", "dx", "si", "di", "bp"),
           ("__ia32_sys_", "__ia32_compat_sys_"), "ia32_sys_call_table", fallback_numbers=I386_SYSCALL_NUMBERS)

# SYSRET: the exit swapgs, then the instruction, both inside the entry code.
SYSRETQ = Exit("sysretq", ("exit_swapgs", "sysretq"), in_code="entry_SYSCALL_64")
SYSRETL = Exit("sysretl", ("exit_swapgs", "sysretl"), in_code="entry_SYSCALL_compat")
# IRET: the common exit from pt_regs, then `iretq` with the frame it pops.
IRET_PATH_SYMBOL = "swapgs_restore_regs_and_return_to_usermode"
IRETQ_SYMBOL = "native_irq_return_iret"
IRET = Exit("iret", ("iret_path", "iretq"), path=IRET_PATH_SYMBOL, instruction=IRETQ_SYMBOL)
SYSRET_CODE = {way.name: way.in_code for way in (SYSRETQ, SYSRETL)}
# Every exit, in the order a trace lists its stages.
EXITS = (SYSRETQ, SYSRETL, IRET)
# Every entry here has its swapgs (or none, a stage not taken); a trace steps past it.
ENTRY_STAGES = ("entry", "after_swapgs")

SYSCALL64 = Road("syscall64", "syscall", b"\x0f\x05", 64, X86_64, "MSR_LSTAR", ("entry_SYSCALL_64",),
                 ("do_syscall_64",), (SYSRETQ, IRET), ENTRY_STAGES)
INT80 = Road("int80", "int $0x80", b"\xcd\x80", 0, IA32, "IDT vector 0x80",
             ("asm_int80_emulation", "entry_INT80_compat"), ("do_int80_emulation", "do_int80_syscall_32"), (IRET,),
             ENTRY_STAGES)
SYSCALL32 = Road("syscall32", "syscall", b"\x0f\x05", 32, IA32, "MSR_CSTAR", ("entry_SYSCALL_compat",),
                 ("do_fast_syscall_32",), (SYSRETL, IRET), ENTRY_STAGES)
SYSENTER32 = Road("sysenter32", "sysenter", b"\x0f\x34", 32, IA32, "MSR_IA32_SYSENTER_EIP",
                  ("entry_SYSENTER_compat",), ("do_SYSENTER_32",), (SYSRETL, IRET), ENTRY_STAGES)
ROADS: Mapping[str, Road] = {road.name: road for road in (SYSCALL64, INT80, SYSCALL32, SYSENTER32)}


def road_of(instruction: bytes, bits: int) -> Road:
    """The road a user instruction takes, from its bytes and the mode of its program."""
    return _road_of(ROADS, instruction, bits)


def road(name: str) -> Road:
    """A road by name: syscall64, int80, syscall32 or sysenter32."""
    return road_named(ROADS, name)

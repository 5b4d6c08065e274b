"""The roads of a syscall into and out of an x86_64 kernel, one description each.

A road is a way in: the user instruction, where the CPU finds the kernel's entry, the
C function that takes the saved `struct pt_regs`, and the ABI it speaks (number and
argument registers, the handler names). An exit is a way out: SYSRET (64-bit `sysretq`
or compat `sysretl`, found by disassembling the entry code) or IRET (the common
`swapgs_restore_regs_and_return_to_usermode` ... `iretq`). The tracer (trace.py) walks
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
from dataclasses import dataclass
from functools import cached_property

from . import x86
from .abi_i386 import I386_SYSCALL_NUMBERS
from .errors import SyscallIrlError
from .kernel import Vmlinux


class RoadError(SyscallIrlError):
    """The kernel under test has no such road, syscall or symbol."""


@dataclass(frozen=True)
class Abi:
    """How a syscall names its number and arguments, and its handlers."""

    name: str  # "x86_64" or "ia32"
    bits: int  # width of the number and argument registers
    number_register: str
    arg_registers: tuple[str, ...]  # user registers, argument 0..5
    pt_regs_args: tuple[str, ...]  # struct pt_regs fields, argument 0..5
    handler_prefixes: tuple[str, ...]  # the handler of NAME is PREFIX + NAME
    table: str  # the kernel's pointer table (kept for ftrace; not always what dispatches)


X86_64 = Abi("x86_64", 64, "rax", x86.SYSCALL_ARG_REGISTERS, x86.PT_REGS_ARGS, ("__x64_sys_",), "sys_call_table")
# ebx, ecx, edx, esi, edi, ebp (arch/x86/entry/entry_64_compat.S); compat handlers are
# __ia32_compat_sys_NAME where the 32-bit layout differs, else __ia32_sys_NAME.
IA32 = Abi("ia32", 32, "rax", ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp"), ("bx", "cx", "dx", "si", "di", "bp"),
           ("__ia32_sys_", "__ia32_compat_sys_"), "ia32_sys_call_table")


@dataclass(frozen=True)
class Exit:
    """A way back to user mode and the stages a trace records on it."""

    name: str  # "sysretq", "sysretl", "iret"
    stages: tuple[str, ...]


# SYSRET: the exit swapgs, then the instruction, both inside the entry code (in_symbol).
SYSRETQ = Exit("sysretq", ("exit_swapgs", "sysretq"))
SYSRETL = Exit("sysretl", ("exit_swapgs", "sysretl"))
# IRET: the common exit from pt_regs, then `iretq` with the frame it pops.
IRET = Exit("iret", ("iret_path", "iretq"))
IRET_PATH_SYMBOL = "swapgs_restore_regs_and_return_to_usermode"
IRETQ_SYMBOL = "native_irq_return_iret"
SYSRET_CODE = {"sysretq": "entry_SYSCALL_64", "sysretl": "entry_SYSCALL_compat"}


@dataclass(frozen=True)
class Road:
    """One way into the kernel for a syscall, and the exits it may leave by."""

    name: str
    mnemonic: str  # the user instruction
    opcode: bytes
    user_bits: int  # the mode of the calling code: 64 or 32 (compatibility mode)
    abi: Abi
    found_by: str  # where the CPU finds the entry
    entry_symbols: tuple[str, ...]  # candidates, in the order of preference
    dispatch_symbols: tuple[str, ...]  # the C function taking pt_regs, candidates
    exits: tuple[Exit, ...]

    def entry_symbol(self, vmlinux: Vmlinux) -> str:
        """The entry this kernel has for the road (only one candidate exists in a kernel)."""
        return _first(vmlinux, self.entry_symbols, f"the {self.name} entry ({self.found_by})")

    def dispatch_symbol(self, vmlinux: Vmlinux) -> str:
        """The C function this kernel's entry calls with the pt_regs."""
        return _first(vmlinux, self.dispatch_symbols, f"the {self.name} C entry")


def _first(vmlinux: Vmlinux, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if vmlinux.has_symbol(name):
            return name
    raise RoadError(f"{vmlinux.path} has no {what}: none of {', '.join(names)} (is IA32_EMULATION off?)")


SYSCALL64 = Road("syscall64", "syscall", b"\x0f\x05", 64, X86_64, "MSR_LSTAR", ("entry_SYSCALL_64",),
                 ("do_syscall_64",), (SYSRETQ, IRET))
INT80 = Road("int80", "int $0x80", b"\xcd\x80", 0, IA32, "IDT vector 0x80",
             ("asm_int80_emulation", "entry_INT80_compat"), ("do_int80_emulation", "do_int80_syscall_32"), (IRET,))
SYSCALL32 = Road("syscall32", "syscall", b"\x0f\x05", 32, IA32, "MSR_CSTAR", ("entry_SYSCALL_compat",),
                 ("do_fast_syscall_32",), (SYSRETL, IRET))
SYSENTER32 = Road("sysenter32", "sysenter", b"\x0f\x34", 32, IA32, "MSR_IA32_SYSENTER_EIP",
                  ("entry_SYSENTER_compat",), ("do_SYSENTER_32",), (SYSRETL, IRET))
ROADS: Mapping[str, Road] = {road.name: road for road in (SYSCALL64, INT80, SYSCALL32, SYSENTER32)}


def road_of(instruction: bytes, bits: int) -> Road:
    """The road a user instruction takes, from its bytes and the mode of its program."""
    for road in ROADS.values():
        if instruction.startswith(road.opcode) and road.user_bits in (0, bits):
            return road
    raise RoadError(f"{instruction[:2].hex(' ')} in a {bits}-bit program is no syscall instruction "
                    f"(syscall 0f 05, int $0x80 cd 80, sysenter 0f 34)")


def road(name: str) -> Road:
    """A road by name: syscall64, int80, syscall32 or sysenter32."""
    try:
        return ROADS[name]
    except KeyError:
        raise RoadError(f"no road {name!r}: one of {', '.join(ROADS)}") from None


# --- syscall names -------------------------------------------------------------------------


class SyscallNames:
    """Syscall numbers by name and handler names by number, for one ABI of one kernel.

    The x86_64 numbers come from the kernel's sys_call_table (read from the vmlinux
    image: slot N points at __x64_sys_NAME). The ia32 ones from ia32_sys_call_table
    where the kernel has it; kernels with the BHI changes (6.9, 6.1.85) build none on
    x86_64, and then the i386 ABI's numbers (abi_i386.py) are used, each only where the
    kernel has the handler.
    """

    def __init__(self, vmlinux: Vmlinux, abi: Abi) -> None:
        self.vmlinux = vmlinux
        self.abi = abi

    @cached_property
    def table(self) -> dict[int, str]:
        """Number -> handler symbol, from the kernel's table; empty if it has none."""
        vmlinux = self.vmlinux
        if not vmlinux.has_symbol(self.abi.table):
            return {}
        size = vmlinux.symbol_size(self.abi.table) // 8
        data = vmlinux.read(vmlinux.symbol(self.abi.table), 8 * size)
        found = {}
        for nr in range(size):
            names = [n for n in vmlinux.names_at(int.from_bytes(data[8 * nr:8 * nr + 8], "little"))
                     if n.startswith(self.abi.handler_prefixes)]
            if names:
                found[nr] = min(names, key=len)
        return found

    @cached_property
    def numbers(self) -> dict[str, int]:
        """Name -> number."""
        if self.table:
            numbers: dict[str, int] = {}
            for nr, handler in sorted(self.table.items()):
                numbers.setdefault(self._strip(handler), nr)
            return numbers
        if self.abi is not IA32:
            raise RoadError(f"{self.vmlinux.path} has no {self.abi.table}: cannot tell its {self.abi.name} "
                            f"syscall numbers; pass numbers instead of names")
        return {name: nr for name, nr in I386_SYSCALL_NUMBERS.items() if self._handler_of(name)}

    def _strip(self, handler: str) -> str:
        for prefix in sorted(self.abi.handler_prefixes, key=len, reverse=True):
            if handler.startswith(prefix):
                return handler[len(prefix):]
        return handler

    def _handler_of(self, name: str) -> str:
        # The compat handler wins: where one exists, it is what the ia32 table holds.
        for prefix in sorted(self.abi.handler_prefixes, key=len, reverse=True):
            if self.vmlinux.has_symbol(prefix + name):
                return prefix + name
        return ""

    def number(self, name_or_nr: int | str) -> int:
        """The number of a syscall name (or the number given)."""
        if isinstance(name_or_nr, int):
            return name_or_nr
        try:
            return self.numbers[name_or_nr]
        except KeyError:
            raise RoadError(f"kernel {self.vmlinux.release} has no {self.abi.name} syscall {name_or_nr!r}") from None

    def handler(self, nr: int) -> str:
        """The handler the kernel's table has for *nr*, else the one its name implies;
        "" where the kernel has none (out of range, or not built in)."""
        if self.table or self.abi is not IA32:
            return self.table.get(nr, "")
        names = [name for name, number in self.numbers.items() if number == nr]
        return self._handler_of(names[0]) if names else ""

"""x86_64 architecture and Linux ABI facts the invariants are checked against.

Values that depend on the kernel version are functions of it; each fact names where
it comes from, so a reader can check it without trusting us.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

# Segment selectors (arch/x86/include/asm/segment.h, GDT_ENTRY_* * 8 + RPL).
KERNEL_CS = 0x10
KERNEL_DS = 0x18
USER32_CS = 0x23
USER_DS = 0x2B
USER_CS = 0x33

# MSRs (arch/x86/include/asm/msr-index.h).
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176

ENOSYS = 38

# RFLAGS bits (Intel SDM vol. 1, 3.4.3).
RFLAGS_BITS: Mapping[str, int] = {
    "CF": 1 << 0, "PF": 1 << 2, "AF": 1 << 4, "ZF": 1 << 6, "SF": 1 << 7, "TF": 1 << 8,
    "IF": 1 << 9, "DF": 1 << 10, "OF": 1 << 11, "IOPL": 3 << 12, "NT": 1 << 14, "RF": 1 << 16,
    "VM": 1 << 17, "AC": 1 << 18, "VIF": 1 << 19, "VIP": 1 << 20, "ID": 1 << 21,
}
RFLAGS_FIXED = 1 << 1  # bit 1 always reads 1

# SYSRET loads RFLAGS from R11 masked with 0x3C7FD7 and sets bit 1 (Intel SDM, SYSRET).
SYSRET_RFLAGS_MASK = 0x3C7FD7


def flags(*names: str) -> int:
    """The RFLAGS value with the named bits set: flags("DF", "AC") == 0x40400."""
    value = 0
    for name in names:
        value |= RFLAGS_BITS[name]
    return value


def flag_names(value: int) -> list[str]:
    """The names of the RFLAGS bits set in *value* (IOPL if any of its bits is set)."""
    return [name for name, bit in RFLAGS_BITS.items() if value & bit]


def sysret_rflags(r11: int) -> int:
    """RFLAGS after SYSRET with *r11* (Intel SDM: (R11 & 3C7FD7H) | 2)."""
    return (r11 & SYSRET_RFLAGS_MASK) | RFLAGS_FIXED


def expected_fmask(version: tuple[int, int, int]) -> int:
    """MSR_SYSCALL_MASK the kernel writes in syscall_init() (arch/x86/kernel/cpu/common.c).

    Since 5.14 (commit "x86/entry: Clear X86_EFLAGS_AC|TF|... on entry") every arithmetic
    flag is cleared too; before, only TF|DF|IF|IOPL|AC|NT.
    """
    if version >= (5, 14, 0):
        return flags("CF", "PF", "AF", "ZF", "SF", "TF", "IF", "DF", "OF", "IOPL", "NT", "RF", "AC", "ID")
    return flags("TF", "DF", "IF", "IOPL", "AC", "NT")


# Page table isolation (arch/x86/include/asm/processor-flags.h, arch/x86/entry/calling.h):
# the kernel and user PGDs of a process are one 8 KiB allocation, kernel half first, so
# SWITCH_TO_USER_CR3 sets PTI_USER_PGTABLE_BIT (PAGE_SHIFT) and, with PCID, the user
# ASID bit X86_CR3_PTI_PCID_USER_BIT; SWITCH_TO_KERNEL_CR3 clears both.
PTI_USER_PGTABLE_BIT = 1 << 12
PTI_USER_PCID_BIT = 1 << 11
CR4_PCIDE = 1 << 17  # Intel SDM vol. 3, 2.5
# CR4.FRED: set by a kernel that enabled flexible return and event delivery (Intel FRED
# specification, 2.1); then SYSCALL enters through the FRED entry point, not MSR_LSTAR.
CR4_FRED = 1 << 32


def pti_kernel_cr3(user_cr3: int, cr4: int) -> int:
    """The CR3 SWITCH_TO_KERNEL_CR3 makes of *user_cr3* (PTI on), given CR4."""
    user_bits = PTI_USER_PGTABLE_BIT | (PTI_USER_PCID_BIT if cr4 & CR4_PCIDE else 0)
    return user_cr3 & ~user_bits


def star_selectors(star: int) -> tuple[int, int]:
    """(kernel CS, user base selector) from MSR_STAR: SYSCALL loads CS from bits 47:32,
    SYSRET to 64-bit mode loads CS from bits 63:48 + 16 and SS from bits 63:48 + 8."""
    return (star >> 32) & 0xFFFF, (star >> 48) & 0xFFFF


def rpl(selector: int) -> int:
    """Requested privilege level of a segment selector: 0 kernel, 3 user."""
    return selector & 3


def is_canonical(address: int) -> bool:
    """48-bit canonical address (bits 63:47 all equal)."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


# struct pt_regs on x86_64 (arch/x86/include/asm/ptrace.h): field -> byte offset.
PT_REGS_FIELDS = ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx",
                  "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss")
PT_REGS_OFFSETS: Mapping[str, int] = {name: 8 * i for i, name in enumerate(PT_REGS_FIELDS)}
PT_REGS_SIZE = 8 * len(PT_REGS_FIELDS)

# Syscall argument registers, in order (x86_64 ABI: rcx is clobbered by SYSCALL, so r10).
SYSCALL_ARG_REGISTERS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
PT_REGS_ARGS = ("di", "si", "dx", "r10", "r8", "r9")

# The frame IRETQ pops, from RSP up (Intel SDM vol. 3, 6.14.1): RIP, CS, RFLAGS, RSP, SS.
IRET_FRAME_FIELDS = ("ip", "cs", "flags", "sp", "ss")
IA32_SYSCALL_VECTOR = 0x80
IDT_GATE_SIZE = 16
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF


def decode_iret_frame(data: bytes) -> dict[str, int]:
    """The five 8-byte words of an IRET frame as {ip, cs, flags, sp, ss}."""
    if len(data) < 40:
        raise ValueError(f"an IRET frame is 40 bytes, got {len(data)}")
    return {name: int.from_bytes(data[8 * i:8 * i + 8], "little") for i, name in enumerate(IRET_FRAME_FIELDS)}


@dataclass(frozen=True)
class IdtGate:
    """A 64-bit IDT gate descriptor (Intel SDM vol. 3, 6.14.1, figure 6-8)."""

    offset: int
    selector: int
    ist: int
    type: int  # 0xE interrupt gate, 0xF trap gate
    dpl: int
    present: bool


def decode_idt_gate(data: bytes) -> IdtGate:
    """Decode the 16 bytes of one IDT entry."""
    if len(data) < IDT_GATE_SIZE:
        raise ValueError(f"an IDT gate is {IDT_GATE_SIZE} bytes, got {len(data)}")
    low, selector, bits, middle, high = struct.unpack_from("<HHHHI", data)
    return IdtGate(offset=low | middle << 16 | high << 32, selector=selector, ist=bits & 7,
                   type=(bits >> 8) & 0xF, dpl=(bits >> 13) & 3, present=bool(bits >> 15))


# Syscall numbers used by the suites (arch/x86/entry/syscalls/syscall_64.tbl).
SYSCALL_NUMBERS: Mapping[str, int] = {"read": 0, "write": 1, "getpid": 39, "dup": 32, "getppid": 110}


def decode_pt_regs(data: bytes, offsets: Mapping[str, int] = PT_REGS_OFFSETS) -> dict[str, int]:
    """Decode a raw struct pt_regs (little endian, 8-byte fields) with *offsets*."""
    need = max(offsets.values()) + 8
    if len(data) < need:
        raise ValueError(f"pt_regs needs {need} bytes, got {len(data)}")
    return {name: int.from_bytes(data[off:off + 8], "little") for name, off in offsets.items()}


# The init task's stack, THREAD_SIZE bytes from its start symbol to its end symbol
# (INIT_TASK_DATA in include/asm-generic/vmlinux.lds.h): __start_init_task/__end_init_task
# in 6.1, renamed __start_init_stack/__end_init_stack later (so in 6.12).
INIT_STACK_BOUNDS = (("__start_init_stack", "__end_init_stack"), ("__start_init_task", "__end_init_task"))


def thread_size(symbols: Mapping[str, int]) -> int:
    """THREAD_SIZE (a task's kernel stack size) from the bounds of the init task's stack
    in the kernel's symbol table (name -> address); KeyError if it has neither pair."""
    for start, end in INIT_STACK_BOUNDS:
        if start in symbols and end in symbols:
            return symbols[end] - symbols[start]
    raise KeyError(f"the symbol table has none of the init stack bounds {INIT_STACK_BOUNDS}")


def top_of_stack_padding(fred: bool) -> int:
    """Bytes between pt_regs and the top of a task's kernel stack
    (TOP_OF_KERNEL_STACK_PADDING, arch/x86/include/asm/thread_info.h): 0 on x86_64, 16
    with CONFIG_X86_FRED (6.9+), where the FRED event data follows pt_regs."""
    return 16 if fred else 0


def do_syscall_64_args(version: tuple[int, int, int]) -> tuple[str, str]:
    """Registers holding (regs, nr) at do_syscall_64 entry (arch/x86/entry/common.c):
    5.8-5.13 take (nr, regs), 5.14+ take (regs, nr)."""
    if (5, 8, 0) <= version < (5, 14, 0):
        return "rsi", "rdi"
    return "rdi", "rsi"


def to_signed(value: int, bits: int = 64) -> int:
    """Two's complement reading of an unsigned register value."""
    return value - (1 << bits) if value >> (bits - 1) else value

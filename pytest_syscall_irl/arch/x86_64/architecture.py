"""x86_64 as the tracer follows it: arch.base.Architecture filled in from this folder's
facts (facts.py), roads (roads.py), running task (tasks.py) and what `syscall-irl diff`
surveys (survey.py).

Every x86 rule the walker obeys lives here: RIP/RSP/RCX, the return address on the
stack, the IDT gate of int $0x80, SYSRET taking RIP from RCX, the IRET frame, the
compat-mode user stack, the order of do_syscall_64's arguments. No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..base import Disassembled, EntryCode, MemoryReader, SavedRegisters, StageNames, SummaryField
from ..roads import Road, SymbolTable
from .facts import (IA32_SYSCALL_VECTOR, IDT_GATE_SIZE, PT_REGS_OFFSETS, USER32_CS, decode_idt_gate,
                    decode_iret_frame, do_syscall_64_args)
from .registers import X86_64_REGISTERS
from .roads import EXITS, ROADS
from .survey import X86_64_SURVEY
from .tasks import CurrentTaskViaGs

# Kernel stacks are THREAD_SIZE aligned, and THREAD_SIZE is at least 16 KiB.
STACK_ALIGN_BITS = 14
SYSRET_MNEMONICS = ("sysretq", "sysret", "sysretl")


class X86_64Architecture:
    """x86_64 (see the module docstring); the one instance is X86_64."""

    name = "x86_64"
    roads: Mapping[str, Road] = ROADS
    default_road = "syscall64"
    stages = StageNames.of(list(ROADS.values()), EXITS)
    # Registers recorded at every stage (one MI round trip).
    trace_registers = ("rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                       "r12", "r13", "r14", "r15", "eflags", "cs", "ss", "fs_base", "gs_base", "k_gs_base", "cr3",
                       "cr4")
    summary: tuple[SummaryField, ...] = (
        ("rip", "rip", "#018x"), ("cs", "cs", "#04x"), ("ss", "ss", "#04x"), ("rflags", "eflags", "#08x"),
        ("rax", "rax", "#x"), ("rcx", "rcx", "#x"), ("r11", "r11", "#x"), ("rsp", "rsp", "#x"),
        ("gs_base", "gs_base", "#x"), ("k_gs_base", "k_gs_base", "#x"), ("cr3", "cr3", "#x"))
    pc = "rip"
    register_file = X86_64_REGISTERS
    pt_regs = SavedRegisters("struct pt_regs", PT_REGS_OFFSETS)
    kernel_arg_registers = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
    entry_switch = "swapgs"
    current = CurrentTaskViaGs()
    survey = X86_64_SURVEY

    def find_entry_code(self, entry: int, instructions: Sequence[Disassembled]) -> EntryCode:
        """The first swapgs is the entry's; the exit's is the last one before the first
        SYSRET (6.1 puts `jmp; verw` between them)."""
        texts = [(insn.address, insn.text.split()[0] if insn.text.split() else "") for insn in instructions]
        swapgs = [address for address, op in texts if op == "swapgs"]
        sysret = [address for address, op in texts if op in SYSRET_MNEMONICS]
        exit_swapgs = max((a for a in swapgs if sysret and a < sysret[0]), default=None)
        return EntryCode(entry, swapgs[0] if swapgs else None, exit_swapgs, sysret[0] if sysret else None)

    def entry_address(self, road: Road, vmlinux: SymbolTable, memory: MemoryReader) -> int:
        """IDT vector 0x80 read from guest memory for int80, the entry symbol otherwise
        (GDB cannot read MSRs: the suite checks those in the guest)."""
        if road.found_by.startswith("IDT"):
            table = vmlinux.symbol("idt_table")
            gate = memory.read_memory(table + IDT_GATE_SIZE * IA32_SYSCALL_VECTOR, IDT_GATE_SIZE)
            return decode_idt_gate(gate).offset
        return vmlinux.symbol(road.entry_symbol(vmlinux))

    def dispatch_regs_register(self, symbol: str, version: tuple[int, int, int]) -> str:
        """The first argument by the x86_64 ABI; do_syscall_64 took (nr, regs) in 5.8-5.13."""
        return do_syscall_64_args(version)[0] if symbol == "do_syscall_64" else self.kernel_arg_registers[0]

    def dispatch_number_condition(self, register: str, layout: Mapping[str, int], nr: int) -> str:
        """The number in orig_ax, or in ax where the int80 entry leaves orig_ax -1 for its
        C code to fill (do_int80_emulation)."""
        orig_ax, ax = (f"*(unsigned long *)(${register} + {layout[f]})" for f in ("orig_ax", "ax"))
        return f"({orig_ax} == {nr:#x} || ({orig_ax} == -1 && {ax} == {nr:#x}))"

    def return_breakpoint(self, memory: MemoryReader, registers: Mapping[str, int]) -> tuple[int, str]:
        """`call` pushed the return address; the return lands after the call with it popped."""
        sp = registers["rsp"]
        return int.from_bytes(memory.read_memory(sp, 8), "little"), f"$rsp == {sp + 8:#x}"

    def same_stack_condition(self, address: int) -> str:
        return f"($rsp >> {STACK_ALIGN_BITS}) == ({address:#x} >> {STACK_ALIGN_BITS})"

    def user_return(self, pt_regs: Mapping[str, int]) -> tuple[int, str]:
        """Back in compatibility mode only ESP is the program's (QEMU keeps RSP's upper half zero)."""
        ip, sp = pt_regs["ip"], pt_regs["sp"]
        user_sp = f"$rsp == {sp:#x}" if pt_regs["cs"] != USER32_CS else f"($rsp & 0xffffffff) == {sp & 0xFFFFFFFF:#x}"
        return ip, f"$rip == {ip:#x} && {user_sp} && ($cs & 3) == 3"

    def in_code_exit_condition(self, pt_regs: Mapping[str, int]) -> str:
        """SYSRET takes RIP from RCX; RSP is the user's already (registers only: with PTI
        the exit runs on the user page tables, where the kernel's data cannot be read)."""
        return f"$rcx == {pt_regs['ip']:#x} && $rsp == {pt_regs['sp']:#x}"

    def path_exit_condition(self, regs_ptr: int) -> str:
        return f"$rsp == {regs_ptr:#x}"

    def path_return_condition(self, pt_regs: Mapping[str, int]) -> str:
        """The IRET frame on the stack: RIP at RSP, the user RSP 24 bytes above."""
        return f"*(unsigned long *)$rsp == {pt_regs['ip']:#x} && *(unsigned long *)($rsp + 24) == {pt_regs['sp']:#x}"

    def exit_frame(self, memory: MemoryReader, registers: Mapping[str, int]) -> dict[str, int]:
        """The five words IRETQ pops: ip, cs, flags, sp, ss."""
        return decode_iret_frame(memory.read_memory(registers["rsp"], 40))


X86_64 = X86_64Architecture()

"""x86_64 as `syscall-irl diff` surveys it (arch.survey.Survey): the five roads as the suite's
payloads take them, the syscall MSRs, the IDT gate of vector 0x80, the syscall tables, and
the registers and kernel address regions whose values are per boot. No pytest here.
"""

from __future__ import annotations

from ..survey import GuestReading, LeftOut, MemoryFact, PerCpuField, Region, Survey, SurveyRoad
from .facts import (IA32_SYSCALL_VECTOR, IDT_GATE_SIZE, MSR_CSTAR, MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
                    MSR_IA32_SYSENTER_ESP, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, PT_REGS_SIZE, decode_idt_gate,
                    thread_size)
from .roads import IA32

# The suite traces `sysenter` on an Intel vendor string (a real AMD CPU refuses it in compatibility
# mode), but an Intel one leaves CSTAR unwritten, so a 32-bit `syscall` needs QEMU's default. QEMU's
# TCG takes both on its default CPU (measured, QEMU 7.2): every road in one guest per kernel. Under
# KVM on an AMD host the sysenter trace fails alike on both kernels, which is no difference.
SYSENTER_CPU: str | None = None
SIX = {i: 0x1111_1111 * (i + 1) for i in range(6)}  # distinct 32-bit arguments, as test_compat_entries.py
ARGV = tuple(f"{SIX[i]:#x}" for i in range(6))
# The fast 32-bit entries read argument 6 from the user stack (sirl32.h): 0, 2, 3, 4 select.
FAST32_ARGS = {i: SIX[i] for i in (0, 2, 3, 4)}
NO_IA32 = ("__ia32_sys_getppid", "the kernel has no IA32 emulation")


def _compat(name: str, payload: str, mode: tuple[str, ...], args: dict[int, int], at: str = "sirl_syscall_insn",
            cpu: str | None = None) -> SurveyRoad:
    """A road the i386 getppid takes, its number and six arguments on the payload's command line."""
    return SurveyRoad(name, payload, "getppid", args, mode=mode, number_in=IA32, argv=ARGV, at=at, cpu=cpu,
                      needs=NO_IA32[0], lacking=NO_IA32[1])


ROADS = (
    SurveyRoad("syscall64", "syscall_irl", "write", {0: 1, 2: 12}),
    _compat("int80-from-64", "int80", (), SIX),
    _compat("int80-from-32", "compat32", ("int80",), SIX, at="sirl_int80_insn"),
    _compat("syscall32", "compat32", ("syscall",), FAST32_ARGS),
    _compat("sysenter32", "compat32", ("sysenter",), FAST32_ARGS, at="sirl_sysenter_insn", cpu=SYSENTER_CPU),
)


def _msrs(cpu: str | None, **numbers: int) -> tuple[GuestReading, ...]:
    """MSRs read in the guest through /dev/cpu/0/msr (the rdmsr payload, as the suite's read_msr fixture)."""
    return tuple(GuestReading(name, "rdmsr", f"{number:#x}", cpu) for name, number in numbers.items())


READINGS = (*_msrs(None, STAR=MSR_STAR, LSTAR=MSR_LSTAR, FMASK=MSR_SYSCALL_MASK, CSTAR=MSR_CSTAR),
            *_msrs(SYSENTER_CPU, SYSENTER_CS=MSR_IA32_SYSENTER_CS, SYSENTER_ESP=MSR_IA32_SYSENTER_ESP,
                   SYSENTER_EIP=MSR_IA32_SYSENTER_EIP))


def _idt_gate(data: bytes) -> tuple[int, str]:
    gate = decode_idt_gate(data)
    return gate.offset, (f"selector={gate.selector:#x} type={gate.type:#x} dpl={gate.dpl} ist={gate.ist} "
                         f"present={int(gate.present)}")


IDT_0X80 = MemoryFact("IDT[0x80]", "idt_table", IDT_GATE_SIZE * IA32_SYSCALL_VECTOR, IDT_GATE_SIZE, _idt_gate)
# SYSENTER_ESP by what it is: the top of CPU 0's entry stack is its TSS.sp0 (x86_hw_tss.sp0, after the u32 reserved1).
TSS_SP0 = PerCpuField("SYSENTER_ESP", "cpu_tss_rw", 4, "TSS.sp0 of CPU 0 (the top of its entry stack)")

# Registers with no meaning to compare them by: per boot, or whatever a C function left.
LEFT_OUT = (
    LeftOut(frozenset({"cr3"}), "the page-table root: a physical page the allocator picked at this boot"),
    # After a C function returns, the System V ABI gives meaning to rax alone: the caller-saved
    # registers hold what the callee last computed (times, scheduler state), not the path.
    LeftOut(frozenset({"rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"}),
            "caller-saved registers after a C function returned: what the callee left in them",
            frozenset({"handler_return", "dispatch_return", "iret_path"})),
    LeftOut(frozenset({"rax"}), "what the exit work (a void C function) left in rax", frozenset({"iret_path"})),
    # SS means nothing in 64-bit mode: null after an interrupt gate, __KERNEL_DS once the task
    # was switched out and back (__switch_to's fix for AMD's SYSRET SS bug), so it tells
    # whether the scheduler ran meanwhile, not which path the syscall took.
    LeftOut(frozenset({"ss"}), "the kernel's SS: __KERNEL_DS or null by whether the task was scheduled out",
            frozenset({"handler", "ksys", "handler_return", "dispatch_return", "iret_path", "iretq",
                       "exit_swapgs", "sysretq", "sysretl"})),
)
# x86_64's kernel address space with 4-level paging (Documentation/x86/x86_64/mm.rst); guests
# boot with nokaslr, so the randomized bases stay at these defaults.
REGIONS = (
    Region(0xFFFF888000000000, 0xFFFFC88000000000, "direct-map pointer",
           "heap and page-table memory: where the allocator put it at this boot"),
    Region(0xFFFFC90000000000, 0xFFFFE90000000000, "vmalloc address",
           "task stacks and vmalloc memory other than this trace's stack: per boot"),
    Region(0xFFFFEA0000000000, 0xFFFFEB0000000000, "struct page pointer", "the memory map: per boot"),
    Region(0xFFFFFFFFA0000000, 0xFFFFFFFFFF000000, "module address", "where a module was loaded at this boot"),
)

X86_64_SURVEY = Survey(
    roads=ROADS, readings=READINGS, memory_facts=(IDT_0X80,), tables=("sys_call_table", "ia32_sys_call_table"),
    per_cpu_fields=(TSS_SP0,), left_out=LEFT_OUT, regions=REGIONS,
    # pt_regs, then at most FRED's padding (top_of_stack_padding) up to the top of the stack.
    frame_size=PT_REGS_SIZE + 16, stack_size=thread_size)

"""Faults that make the kernel break one invariant each, at run time, through the debugger.

Used by test_invariants_can_fail.py: each fault is installed by an autouse fixture in a
pytester run of one suite test, and that test must fail naming expected and actual
values. A fault either changes what the CPU holds at one trace stage (and undoes it
right after the stage is recorded, so the guest runs on), or has GDB redirect a value
inside the kernel (breakpoint commands, no round trip).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_syscall_irl import roads, x86

Apply = Callable[[pytest.FixtureRequest], None]


@dataclass(frozen=True)
class Fault:
    test: str  # suite test id, relative to test_suites/x86_64
    apply: Apply
    message: str  # a regex the failure must match (names expected and actual)
    traced: bool = True  # the test takes a syscall trace, which its failure report must show


def register(stage: str, name: str, change: Callable[[int], int]) -> Apply:
    """At *stage*, the CPU shows change(value) in register *name*."""

    def apply(request: pytest.FixtureRequest) -> None:
        def fault(gdb: Any) -> Callable[[], None]:
            old = gdb.registers([name])[name]
            gdb.set_register(name, change(old))
            return lambda: gdb.set_register(name, old)

        request.getfixturevalue("syscall_trace").inject(stage, fault)

    return apply


def pt_regs(field: str, change: Callable[[int], int], stage: str = "do_syscall_64", undo: bool = True) -> Apply:
    """At *stage* (a C entry, or the handler: both take pt_regs first), struct pt_regs
    holds change(value) in *field*; a C entry stage named "dispatch" is the one of the
    road the test takes, found from the kernel (do_int80_emulation, ...). With undo=False
    the change stays: the exit gives it to user mode (a kernel that loses a register)."""

    def apply(request: pytest.FixtureRequest) -> None:
        kernel = request.getfixturevalue("kernel")
        at = roads.INT80.dispatch_symbol(kernel.vmlinux) if stage == "dispatch" else stage
        regs_reg = x86.do_syscall_64_args(kernel.version_tuple)[0] if at == "do_syscall_64" else "rdi"

        def fault(gdb: Any) -> Callable[[], None] | None:
            where = gdb.registers([regs_reg])[regs_reg] + x86.PT_REGS_OFFSETS[field]
            old = gdb.read_memory(where, 8)
            gdb.write_memory(where, (change(int.from_bytes(old, "little")) % 2**64).to_bytes(8, "little"))
            return (lambda: gdb.write_memory(where, old)) if undo else None

        request.getfixturevalue("syscall_trace").inject(at, fault)

    return apply


def exit_anyway(sysret: bool, **fields: Callable[[dict[str, int]], int]) -> Apply:
    """When the C entry returns, pt_regs gets the *fields* computed from it and the C
    entry's answer says SYSRET (rax = 1, read since 6.7) or IRET (rax = 0): a kernel that
    skips an eligibility check, or one that leaves eligible calls by IRET. Not undone:
    the exit must see it."""

    def apply(request: pytest.FixtureRequest) -> None:
        def fault(gdb: Any) -> None:
            regs = gdb.registers(["rsp"])["rsp"]  # the C entry was called with RSP = pt_regs
            values = x86.decode_pt_regs(gdb.read_memory(regs, x86.PT_REGS_SIZE))
            for field, compute in fields.items():
                gdb.write_memory(regs + x86.PT_REGS_OFFSETS[field], (compute(values) % 2**64).to_bytes(8, "little"))
            gdb.set_register("rax", int(sysret))

        request.getfixturevalue("syscall_trace").inject("dispatch_return", fault)

    return apply


def kernel_variable(expression: str, value: str) -> Apply:
    """For the test's duration the kernel variable *expression* (a GDB lvalue, read
    through DWARF) holds *value*."""

    def apply(request: pytest.FixtureRequest) -> None:
        gdb = request.getfixturevalue("gdb")
        old = gdb.evaluate(expression)
        gdb.evaluate(f"{expression} = {value}")
        request.addfinalizer(lambda: gdb.evaluate(f"{expression} = {old}"))

    return apply


def idt_gate_moved(vector: int, by: int) -> Apply:
    """IDT[*vector*] in the kernel's idt_table points *by* bytes further for the test."""

    def apply(request: pytest.FixtureRequest) -> None:
        gdb, kernel = request.getfixturevalue("gdb"), request.getfixturevalue("kernel")
        where = kernel.vmlinux.symbol("idt_table") + x86.IDT_GATE_SIZE * vector
        old = gdb.read_memory(where, 2)  # offset bits 15:0
        gdb.write_memory(where, ((int.from_bytes(old, "little") + by) & 0xFFFF).to_bytes(2, "little"))
        request.addfinalizer(lambda: gdb.write_memory(where, old))

    return apply


def in_kernel(location: str, condition: str, *commands: str) -> Apply:
    """Every time the kernel reaches *location* with *condition*, GDB runs *commands*."""

    def apply(request: pytest.FixtureRequest) -> None:
        gdb = request.getfixturevalue("gdb")
        number = gdb.break_insert(location, condition=condition).number
        gdb.break_commands(number, [*commands, "continue"])

    return apply


def msr_redirect(msr: int, other: int) -> Apply:
    """The kernel's /dev/cpu/N/msr driver reads MSR *other* when asked for *msr*."""
    return in_kernel("msr_read", f"*ppos == {msr:#x}", f"set var *ppos = {other:#x}")


def table_slot(name: str, other: str) -> Apply:
    """sys_call_table[nr of *name*] points at __x64_sys_<other> for the test's duration."""

    def apply(request: pytest.FixtureRequest) -> None:
        gdb, kernel = request.getfixturevalue("gdb"), request.getfixturevalue("kernel")
        slot = kernel.vmlinux.symbol("sys_call_table") + 8 * x86.SYSCALL_NUMBERS[name]
        old = gdb.read_memory(slot, 8)
        gdb.write_memory(slot, kernel.vmlinux.symbol(f"__x64_sys_{other}").to_bytes(8, "little"))
        request.addfinalizer(lambda: gdb.write_memory(slot, old))

    return apply


def dispatch_number(nr: int) -> Apply:
    """do_syscall_64 gets *nr* instead of the number of the payload's write(1, ..., 12)."""

    def apply(request: pytest.FixtureRequest) -> None:
        kernel = request.getfixturevalue("kernel")
        regs, number = x86.do_syscall_64_args(kernel.version_tuple)
        condition = WRITE_OF_12_TO_1.replace("$rdi", f"${regs}")
        in_kernel(f"*{kernel.vmlinux.symbol('do_syscall_64'):#x}", condition, f"set var ${number} = {nr}")(request)

    return apply


def return_address(stage: str) -> Apply:
    """At *stage*, the return address on top of the stack points into the entry code,
    which has no unwind information: the unwinder then sees another caller and stops."""

    def apply(request: pytest.FixtureRequest) -> None:
        kernel = request.getfixturevalue("kernel")

        def fault(gdb: Any) -> Callable[[], None]:
            sp = gdb.registers(["rsp"])["rsp"]
            old = gdb.read_memory(sp, 8)
            gdb.write_memory(sp, (kernel.vmlinux.symbol("entry_SYSCALL_64") + 0x10).to_bytes(8, "little"))
            return lambda: gdb.write_memory(sp, old)

        request.getfixturevalue("syscall_trace").inject(stage, fault)

    return apply


def number_redirect(orig_ax: int, nr: int) -> Apply:
    """do_syscall_64 gets *nr* for a syscall whose pt_regs->orig_ax is *orig_ax* (RAX as
    user mode set it, all 64 bits)."""

    def apply(request: pytest.FixtureRequest) -> None:
        kernel = request.getfixturevalue("kernel")
        regs, number = x86.do_syscall_64_args(kernel.version_tuple)
        condition = f"*(unsigned long *)(${regs} + {x86.PT_REGS_OFFSETS['orig_ax']}) == {orig_ax:#x}"
        in_kernel(f"*{kernel.vmlinux.symbol('do_syscall_64'):#x}", condition, f"set var ${number} = {nr}")(request)

    return apply


def cpu_register(name: str, change: Callable[[int], int]) -> Apply:
    """For the test's duration the CPU holds change(value) in register *name*."""

    def apply(request: pytest.FixtureRequest) -> None:
        gdb = request.getfixturevalue("gdb")
        old = gdb.registers([name])[name]
        gdb.set_register(name, change(old))
        request.addfinalizer(lambda: gdb.set_register(name, old))

    return apply


PT_WRITE = "__x64_sys_write"
WRITE_OF_12_TO_1 = (
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['dx']}) == 12 && "
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['di']}) == 1"
)
HISTORY_WRITE = (
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['dx']}) == 17 && "
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['di']}) > 2"
)
DF, AC, TF, RF = x86.flags("DF"), x86.flags("AC"), x86.flags("TF"), x86.flags("RF")
CLOCK_MODE = "tk_core.timekeeper.tkr_mono.clock->vdso_clock_mode"  # the clocksource's vDSO mode
VSYSCALL_MODE = "*(int *)&vsyscall_mode"  # enum { EMULATE, XONLY, NONE }
SYSRET = "sysret_eligibility.py::"
COMPAT = "compat_entries.py::"
MUST_IRET = r": the kernel must return by IRET, it left by sysretq"
MUST_IRET_NOT_SYSRETL = r": the kernel must return by IRET, it left by sysretl"


def _same_ip(regs: dict[str, int]) -> int:
    return regs["ip"]


def idt_gate_type(vector: int, gate_type: int) -> Apply:
    """IDT[*vector*] in the kernel's idt_table has type *gate_type* for the test."""

    def apply(request: pytest.FixtureRequest) -> None:
        gdb, kernel = request.getfixturevalue("gdb"), request.getfixturevalue("kernel")
        where = kernel.vmlinux.symbol("idt_table") + x86.IDT_GATE_SIZE * vector + 5  # type, DPL, P
        old = gdb.read_memory(where, 1)
        gdb.write_memory(where, bytes([(old[0] & 0xF0) | gate_type]))
        request.addfinalizer(lambda: gdb.write_memory(where, old))

    return apply


def at_symbol(symbol: str, condition: Callable[[pytest.FixtureRequest], str],
              command: Callable[[pytest.FixtureRequest], str]) -> Apply:
    """in_kernel at *symbol*'s first instruction, with a condition and a command computed
    from the test's fixtures (the kernel, its payloads)."""

    def apply(request: pytest.FixtureRequest) -> None:
        kernel = request.getfixturevalue("kernel")
        in_kernel(f"*{kernel.vmlinux.symbol(symbol):#x}", condition(request), command(request))(request)

    return apply


def _regs_field(field: str) -> str:
    """pt_regs->*field* in GDB's words, with the pt_regs pointer in $rdi (a C entry's first argument)."""
    return f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS[field]})"


def _ia32_bound(request: pytest.FixtureRequest) -> int:
    """IA32_NR_syscalls as the suite derives it: the slots of the 64-bit sys_call_table."""
    vmlinux = request.getfixturevalue("kernel").vmlinux
    return int(vmlinux.symbol_size("sys_call_table") // 8)


def _readable_user_stack(request: pytest.FixtureRequest) -> str:
    stack = request.getfixturevalue("guest").payload("sysretl_check").symbol("sirl_resume_stack")
    return f"set var {_regs_field('sp')} = {stack + 64:#x}"


def ia32_bound_lowered(request: pytest.FixtureRequest) -> None:
    """do_int80_emulation's `cmp $IA32_NR_syscalls - 1, %eax` compares with one less for the
    test (the kernel code patched in guest memory): the last number is refused. A
    breakpoint would not do: the test's count deletes every breakpoint before it runs."""
    gdb, bound = request.getfixturevalue("gdb"), _ia32_bound(request)
    code = gdb.disassemble("do_int80_emulation")
    cmp = next(i for i in code if re.fullmatch(rf"cmp\s+\${bound - 1:#x},%eax", i.text.strip()))
    assert gdb.read_memory(cmp.address, 1) == b"\x3d", f"not a `cmp imm32, %eax`: {cmp}"
    old = gdb.read_memory(cmp.address + 1, 4)
    gdb.write_memory(cmp.address + 1, (bound - 2).to_bytes(4, "little"))
    request.addfinalizer(lambda: gdb.write_memory(cmp.address + 1, old))


# The running task's thread_info (first in task_struct) on the reference 6.1: current_task is per-CPU.
CURRENT_6_1 = "((struct task_struct *)*(unsigned long *)((unsigned long)&current_task + __per_cpu_offset[0]))"
TS_COMPAT = 0x2  # arch/x86/include/asm/thread_info.h
ROADS = "compat_roads.py::"
IF = x86.flags("IF")

FAULTS: dict[str, Fault] = {
    "rpl-kernel": Fault(
        "test_rpl.py::test_cs_rpl_is_0_in_the_kernel",
        register("handler", "cs", lambda cs: cs | 3),
        r"handler: CS 0x13 has RPL 3, expected 0",
    ),
    "rpl-user": Fault(
        "test_rpl.py::test_cs_rpl_is_3_in_user_mode_before_and_after",
        register("user_return", "cs", lambda cs: cs & ~3),
        r"user_return: CS 0x30 has RPL 0, expected 3",
    ),
    "rpl-pt_regs": Fault(
        "test_rpl.py::test_pt_regs_holds_the_user_selectors",
        pt_regs("cs", lambda cs: x86.KERNEL_CS),
        r"pt_regs->cs 0x10, expected __USER_CS 0x33",
    ),
    "lstar-cpu": Fault(
        "test_lstar.py::test_syscall_lands_on_entry_syscall_64",
        register("entry", "rip", lambda rip: rip + 3),
        r"RIP after the user syscall instruction is 0x\w+, expected entry_SYSCALL_64 0x",
    ),
    "lstar-msr": Fault(
        "test_lstar.py::test_lstar_msr_is_entry_syscall_64",
        msr_redirect(x86.MSR_LSTAR, x86.MSR_CSTAR),
        r"MSR_LSTAR read in the guest is 0x\w+, expected entry_SYSCALL_64 0x",
        traced=False,
    ),
    "star": Fault(
        "test_lstar.py::test_star_selectors",
        msr_redirect(x86.MSR_STAR, x86.MSR_LSTAR),
        r"STAR\[47:32\] \(SYSCALL CS\) is 0x\w+, expected __KERNEL_CS 0x10",
        traced=False,
    ),
    "orig_ax": Fault(
        "test_pt_regs.py::test_orig_ax_is_the_syscall_number",
        pt_regs("orig_ax", lambda v: v + 1),
        r"pt_regs->orig_ax 0x6f, expected nr 0x6e",
    ),
    "args": Fault(
        "test_pt_regs.py::test_arguments_are_the_values_user_mode_loaded",
        pt_regs("r10", lambda v: v ^ 0x100),
        r"pt_regs->r10 0x4544, expected argument 3 = 0x4444",
    ),
    "ip": Fault(
        "test_pt_regs.py::test_ip_is_the_user_return_address",
        register("entry", "rcx", lambda v: v + 1),
        r"RCX at entry 0x\w+, expected user RIP after syscall 0x",
    ),
    "flags": Fault(
        "test_pt_regs.py::test_flags_are_the_user_rflags",
        pt_regs("flags", lambda v: v ^ AC),
        r"pt_regs->flags 0x\w+, expected user RFLAGS 0x",
    ),
    "sp": Fault(
        "test_pt_regs.py::test_sp_is_the_user_stack_pointer",
        pt_regs("sp", lambda v: v - 8),
        r"pt_regs->sp 0x\w+, expected user RSP 0x",
    ),
    "ax": Fault(
        "test_pt_regs.py::test_ax_is_enosys_on_entry",
        pt_regs("ax", lambda v: 0),
        r"pt_regs->ax 0, expected -ENOSYS \(-38\)",
    ),
    "fmask-value": Fault(
        "test_rflags.py::test_fmask_is_what_the_kernel_version_sets",
        msr_redirect(x86.MSR_SYSCALL_MASK, x86.MSR_STAR),
        r"MSR_SYSCALL_MASK read in the guest is 0x\w+ .*expected 0x257fd5",
        traced=False,
    ),
    "fmask-entry": Fault(
        "test_rflags.py::test_syscall_clears_the_fmask_bits",
        register("entry", "eflags", lambda v: v | DF),
        r"RFLAGS at entry_SYSCALL_64 is 0x402: \['DF'\] survived FMASK",
    ),
    "fmask-version": Fault(  # a kernel whose FMASK lacks AC: the caller's AC reaches the kernel
        "test_rflags.py::test_syscall_clears_each_flag_the_kernel_version_masks",
        register("entry", "eflags", lambda v: v | AC),
        r"RFLAGS at entry_SYSCALL_64 is 0x40002: \['AC'\] survived, expected every bit of Linux 6\.1\.192's FMASK "
        r"0x257fd5 clear",
    ),
    "r11": Fault(
        "test_rflags.py::test_r11_keeps_the_user_rflags",
        register("entry", "r11", lambda v: v & ~AC),
        r"R11 at entry is 0x\w+, expected the user RFLAGS 0x",
    ),
    "sysret-rflags": Fault(
        "test_rflags.py::test_sysret_restores_rflags_from_r11",
        register("user_return", "eflags", lambda v: v & ~DF),
        r"RFLAGS after sysretq is 0x\w+, expected \(R11 0x\w+ & 0x3C7FD7\) \| 2 = 0x",
    ),
    "sysret-rip": Fault(
        "test_rflags.py::test_sysret_returns_to_rcx_in_user_mode",
        register("sysretq", "rcx", lambda v: v + 1),
        r"RIP after sysretq 0x\w+, expected RCX 0x",
    ),
    "swapgs-entry": Fault(
        "test_swapgs.py::test_entry_swapgs_exchanges_the_gs_bases",
        register("after_swapgs", "k_gs_base", lambda v: v + 0x1000),
        r"across the entry swapgs: .*expected the two to exchange",
    ),
    "swapgs-exit": Fault(
        "test_swapgs.py::test_exit_swapgs_gives_user_mode_its_gs_base_back",
        register("sysretq", "gs_base", lambda v: v + 0x1000),
        r"across the exit swapgs: .*expected the two to exchange",
    ),
    "cr3-entry": Fault(
        "test_cr3.py::test_entry_switches_to_the_kernel_page_tables",
        register("ksys", "cr3", lambda v: v | x86.PTI_USER_PGTABLE_BIT),
        r"ksys: CR3 0x\w+, expected the kernel PGD 0x\w+ of user CR3 0x",
    ),
    "cr3-exit": Fault(
        "test_cr3.py::test_exit_returns_to_the_user_page_tables",
        register("sysretq", "cr3", lambda v: v & ~x86.PTI_USER_PGTABLE_BIT),
        r"sysretq: CR3 0x\w+, expected the user PGD 0x\w+ again before user mode",
    ),
    "cr3-iret-exit": Fault(  # a kernel whose IRET exit forgets SWITCH_TO_USER_CR3
        "test_cr3.py::test_int80_switches_the_page_tables_on_the_idt_road_and_the_iret_exit",
        register("iretq", "cr3", lambda v: v & ~x86.PTI_USER_PGTABLE_BIT),
        r"iretq: CR3 0x\w+, expected the user PGD 0x\w+ again before user mode",
    ),
    "cr3-no-pti": Fault(
        "test_cr3.py::test_without_pti_the_syscall_runs_on_the_user_cr3",
        register("handler_return", "cr3", lambda v: v ^ x86.PTI_USER_PGTABLE_BIT),
        r"without PTI, CR3 stays the user's 0x\w+ through the syscall; it was \{'handler_return': '0x",
    ),
    "regs-saved": Fault(
        "test_registers.py::test_pt_regs_holds_every_user_register",
        pt_regs("r13", lambda v: v ^ 1),
        r"pt_regs->r13 0x4444444444444445, expected user r13 0x4444444444444444",
    ),
    "regs-cleared": Fault(
        "test_registers.py::test_entry_clears_user_values_before_the_c_code",
        register("do_syscall_64", "r14", lambda v: 0x5555_5555_5555_5555),
        r"at do_syscall_64 these registers still hold user values: \{'r14': '0x5555555555555555'\}",
    ),
    "regs-restored": Fault(
        "test_registers.py::test_user_registers_survive_the_syscall",
        register("user_return", "rbx", lambda v: v + 1),
        r"back in user mode these registers changed across the syscall: \{'rbx': '0x1111111111111112 "
        r"\(was 0x1111111111111111\)'\}",
    ),
    "regs-stack": Fault(
        "test_registers.py::test_pt_regs_is_at_the_top_of_the_kernel_stack",
        register("do_syscall_64", "rsp", lambda v: v - 16),
        r"RSP at do_syscall_64 is 0x\w+, expected regs 0x\w+ - 8",
    ),
    "table": Fault(
        "test_dispatch.py::test_sys_call_table_points_at_the_handler[dup]",
        table_slot("dup", "dup2"),
        r"sys_call_table\[32\] is 0x\w+, expected __x64_sys_dup 0x",
        traced=False,
    ),
    "x64_sys_call": Fault(
        "test_dispatch.py::test_dispatch_goes_through_x64_sys_call",
        dispatch_number(x86.SYSCALL_NUMBERS["getppid"]),
        r"x64_sys_call got nr 110 for the payload's write\(1, \.\.\., 12\), expected 1",
        traced=False,
    ),
    "handler": Fault(
        "test_dispatch.py::test_the_traced_call_runs_its_handler[write-argv0-args0]",
        register("handler", "rip", lambda v: v + 4),
        r"the CPU ran 0x\w+ for write, expected __x64_sys_write 0x",
    ),
    "backtrace": Fault(
        "test_dispatch.py::test_the_handler_runs_under_do_syscall_64_and_the_entry",
        return_address("handler"),
        r"backtrace .*: expected do_syscall_64 below the handler",
    ),
    "enosys": Fault(
        "test_dispatch.py::test_out_of_range_number_returns_enosys[4095]",
        register("user_return", "rax", lambda v: 0),
        r"user RAX after syscall 4095 is 0, expected -ENOSYS \(-38\)",
    ),
    "enosys-bound": Fault(  # a bound check off by one: NR_syscalls reaches a handler
        "test_dispatch.py::test_out_of_range_number_returns_enosys[NR_syscalls]",
        register("user_return", "rax", lambda v: 0),
        r"user RAX after syscall \d+ is 0, expected -ENOSYS \(-38\)",
    ),
    "last-slot": Fault(
        "test_dispatch.py::test_the_last_number_of_the_table_runs_its_handler",
        register("user_return", "rax", lambda v: v + 1),
        r"user RAX is not the handler's",
    ),
    "return-value": Fault(
        "test_dispatch.py::test_user_sees_the_handlers_return_value",
        register("user_return", "rax", lambda v: v + 1),
        r"user RAX 0x\w+, expected the handler's return value 0x",
    ),
    "write-args": Fault(
        "test_write_args.py::test_echo_writes_syscall_irl_to_fd_1",
        in_kernel(PT_WRITE, WRITE_OF_12_TO_1, f"set var *(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['dx']}) = 11"),
        r"first write to fd 1: fd=1 count=11 buf=b'syscall_irl', expected \(1, 12, b'syscall_irl\\n'\)",
        traced=False,
    ),
    "history": Fault(
        "test_write_args.py::test_history_write_comes_first_and_fd_1_skips_it",
        in_kernel(PT_WRITE, HISTORY_WRITE, f"set var *(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['di']}) = 1"),
        r"first write: breakpoint \d+, fd 1, b'echo syscall_irl\\n'; expected bash's history write",
        traced=False,
    ),
    "sysret-eligible": Fault(
        "test_" + SYSRET + "test_an_eligible_syscall_leaves_by_sysretq",
        exit_anyway(False, cx=lambda r: r["ip"] + 1),
        r"write\(1, \.\.\., 12\) is SYSRET-eligible, yet the kernel left by iret",
    ),
    "sysret-eligible-sigreturn": Fault(
        "test_" + SYSRET + "test_an_eligible_sigreturn_leaves_by_sysretq",
        exit_anyway(False, cx=lambda r: r["ip"] + 1),
        r"an rt_sigreturn to the untouched context is SYSRET-eligible, yet the kernel left by iret",
    ),
    "sysret-rcx": Fault(
        "test_" + SYSRET + "test_rcx_other_than_rip_leaves_by_iret",
        exit_anyway(True, cx=_same_ip),
        r"RCX != RIP" + MUST_IRET,
    ),
    "sysret-rcx-high": Fault(  # a kernel whose only RCX test is 6.1's canonical one
        "test_" + SYSRET + "test_rcx_differing_from_rip_only_above_bit_47_leaves_by_iret",
        exit_anyway(True, cx=_same_ip),
        r"RCX != RIP in bits 63:48 only" + MUST_IRET,
    ),
    "sysret-top": Fault(  # a canonical check too strict: the top user page IRETs
        "test_" + SYSRET + "test_the_last_user_bytes_below_task_size_max_leave_by_sysretq",
        exit_anyway(False, cx=lambda r: r["ip"] + 1),
        r"RIP 0x7fffffffeffe \(TASK_SIZE_MAX - 2\) is canonical and below TASK_SIZE_MAX, hence SYSRET-eligible, "
        r"yet the kernel left by iret",
    ),
    "sysret-task-size-max": Fault(  # on the 6.1 reference: a kernel stricter than its canonical check
        "test_" + SYSRET + "test_rip_at_task_size_max_is_refused_since_6_7_and_canonical_before",
        exit_anyway(False, cx=lambda r: r["ip"] + 1),
        r"before 6.7 the kernel refuses only a non-canonical RIP; 0x7ffffffff000 is canonical, yet the kernel "
        r"left by iret",
    ),
    "upper-half": Fault(  # a kernel that dispatches on all of RAX
        "test_dispatch.py::test_the_upper_half_of_rax_is_ignored",
        number_redirect(0x0123_4567_0000_0000 | x86.SYSCALL_NUMBERS["dup"], 4095),
        r"syscall RAX 0x123456700000020 \(EAX 32, dup\) returned -38, expected dup\(1\)'s new fd",
        traced=False,
    ),
    "x32-bit": Fault(  # what kernels before 5.x did: mask the x32 bit off and run the 64-bit table
        "test_dispatch.py::test_the_x32_bit_without_the_x32_abi_returns_enosys",
        number_redirect(0x4000_0000 | x86.SYSCALL_NUMBERS["dup"], x86.SYSCALL_NUMBERS["dup"]),
        r"syscall 0x40000020 \(the x32 bit with dup\) returned 3, expected -ENOSYS \(-38\)",
        traced=False,
    ),
    "skipped-syscall": Fault(  # a kernel that runs sys_ni_syscall for nr == -1 too
        "test_dispatch.py::test_a_syscall_a_tracer_skips_returns_what_the_tracer_set",
        in_kernel("syscall_exit_to_user_mode",
                  f"*(long *)($rdi + {x86.PT_REGS_OFFSETS['orig_ax']}) == -1 && "
                  f"*(long *)($rdi + {x86.PT_REGS_OFFSETS['ax']}) == 0x1234",
                  f"set var *(long *)($rdi + {x86.PT_REGS_OFFSETS['ax']}) = -38"),
        r"the skipped syscall returned -38, expected the tracer's 4660",
        traced=False,
    ),
    "skipped-int80-syscall": Fault(  # a kernel whose 32-bit dispatch runs __ia32_sys_ni_syscall for nr == -1
        "test_" + ROADS + "test_an_int80_syscall_a_tracer_skips_returns_what_the_tracer_set",
        in_kernel("syscall_exit_to_user_mode",
                  f"*(long *)($rdi + {x86.PT_REGS_OFFSETS['orig_ax']}) == -1 && "
                  f"*(long *)($rdi + {x86.PT_REGS_OFFSETS['ax']}) == 0x1234",
                  f"set var *(long *)($rdi + {x86.PT_REGS_OFFSETS['ax']}) = -38"),
        r"the skipped int \$0x80 syscall returned -38, expected the tracer's 4660",
        traced=False,
    ),
    "efer-sce": Fault(
        "test_lstar.py::test_efer_enables_syscall",
        cpu_register("efer", lambda v: v & ~1),
        r"EFER is 0x\w+: SCE \(bit 0\) is clear",
        traced=False,
    ),
    "sysret-r11": Fault(
        "test_" + SYSRET + "test_r11_other_than_rflags_leaves_by_iret",
        exit_anyway(True, r11=lambda r: r["flags"]),
        r"R11 != RFLAGS" + MUST_IRET,
    ),
    "sysret-rf": Fault(
        "test_" + SYSRET + "test_rf_set_leaves_by_iret",
        exit_anyway(True, flags=lambda r: r["flags"] & ~RF, r11=lambda r: r["flags"] & ~RF),
        r"RF set \(SYSRET cannot restore it\)" + MUST_IRET,
    ),
    "sysret-tf": Fault(
        "test_" + SYSRET + "test_tf_set_leaves_by_iret_and_traps_after_one_instruction",
        exit_anyway(True, flags=lambda r: r["flags"] & ~TF, r11=lambda r: r["flags"] & ~TF),
        r"TF set \(SYSRET would trap at once\)" + MUST_IRET,
    ),
    "sysret-canonical": Fault(
        "test_" + SYSRET + "test_non_canonical_rip_leaves_by_iret_and_faults_in_user_context",
        exit_anyway(True, ip=lambda r: 0x7FFF_0000_0000, cx=lambda r: 0x7FFF_0000_0000),
        r"RIP 0x800000000000 is not canonical" + MUST_IRET,
    ),
    "sysret-ss": Fault(  # a kernel that skips the SS check: it SYSRETs and SS becomes __USER_DS
        "test_" + SYSRET + "test_an_ss_other_than_user_ds_leaves_by_iret",
        exit_anyway(True, ss=lambda r: x86.USER_DS),
        r"SS is 0x7, not __USER_DS" + MUST_IRET,
    ),
    "sysret-cs": Fault(
        "test_" + SYSRET + "test_a_32_bit_cs_leaves_by_iret_into_compatibility_mode",
        exit_anyway(True, cs=lambda r: x86.USER_CS),
        r"CS is __USER32_CS" + MUST_IRET,
    ),
    "sysret-execve": Fault(
        "test_" + SYSRET + "test_execve_returns_to_the_new_program_by_iret",
        exit_anyway(True, cx=_same_ip, r11=lambda r: r["flags"]),
        r"execve replaced RIP \(RCX is the old program's\)" + MUST_IRET,
    ),
    "idt-0x80": Fault(
        "test_" + COMPAT + "test_idt_vector_0x80_is_the_int80_entry",
        idt_gate_moved(x86.IA32_SYSCALL_VECTOR, 0x10),
        r"IDT\[0x80\] points at 0x\w+, expected \w+int80\w* 0x",
        traced=False,
    ),
    "int80-entry": Fault(
        "test_" + COMPAT + "test_int80_enters_at_the_gate_in_ring_0[from-64-bit]",
        register("entry", "rip", lambda rip: rip + 4),
        r"after int \$0x80 the CPU is at 0x\w+, expected the int80 entry 0x",
    ),
    "int80-pt_regs": Fault(
        "test_" + COMPAT + "test_int80_pt_regs_hold_the_ia32_number_and_arguments[from-32-bit]",
        pt_regs("bx", lambda v: v ^ 0x100, stage="dispatch"),
        r"pt_regs->bx 0x11111011, expected ia32 argument 0 = 0x11111111",
    ),
    "int80-eax": Fault(
        "test_" + COMPAT + "test_int80_runs_the_ia32_handler_and_returns_in_eax[from-64-bit]",
        register("user_return", "rax", lambda v: v + 1),
        r"user EAX 0x\w+, expected the handler's 0x",
    ),
    "int80-r8": Fault(  # what kernels before 4.17 did: r8-r11 zeroed on the way out
        "test_" + COMPAT + "test_int80_gives_back_every_register_but_eax[from-64-bit]",
        pt_regs("r8", lambda v: 0, stage="dispatch", undo=False),
        r"after int \$0x80 these registers changed: \{'r8': '0x0 \(was 0x8888888888888888\)'\}",
    ),
    "int80-ebp": Fault(
        "test_" + COMPAT + "test_int80_gives_back_every_register_but_eax[from-32-bit]",
        pt_regs("bp", lambda v: v ^ 0x100, stage="dispatch", undo=False),
        r"after int \$0x80 these registers changed: \{'rbp': '0x66666766 \(was 0x66666666\)'\}",
    ),
    "compat-sysretl-r9": Fault(  # a kernel that drops `xorl %r9d, %r9d` before sysretl
        "test_" + COMPAT + "test_a_32_bit_process_gets_no_kernel_value_in_r8_to_r15[syscall]",
        register("sysretl", "r9", lambda v: 0xFFFF_8880_0123_4000),
        r"at sysretl, about to return to a 32-bit syscall caller, these registers are not 0: "
        r"\{'r9': '0xffff888001234000'\}",
    ),
    "compat-sysretl-r8-pti": Fault(  # a kernel that drops `xorl %r8d, %r8d`: the CR3 switch's scratch value leaks
        "test_" + COMPAT + "test_a_32_bit_process_gets_no_kernel_value_in_r8_to_r15[syscall-pti]",
        register("sysretl", "r8", lambda v: 0x4DD000),
        r"at sysretl, about to return to a 32-bit syscall-pti caller, these registers are not 0: "
        r"\{'r8': '0x4dd000'\}",
    ),
    "compat-iret-r13": Fault(
        "test_" + COMPAT + "test_a_32_bit_process_gets_no_kernel_value_in_r8_to_r15[int80]",
        register("iretq", "r13", lambda v: 0xFFFF_FFFF_8100_0000),
        r"at iretq, about to return to a 32-bit int80 caller, these registers are not 0: "
        r"\{'r13': '0xffffffff81000000'\}",
    ),
    "cstar": Fault(
        "test_" + COMPAT + "test_cstar_is_the_compat_syscall_entry",
        msr_redirect(x86.MSR_CSTAR, x86.MSR_LSTAR),
        r"MSR_CSTAR 0x\w+, expected entry_SYSCALL_compat 0x",
        traced=False,
    ),
    "sysenter-msrs": Fault(
        "test_" + COMPAT + "test_sysenter_msrs",
        msr_redirect(x86.MSR_IA32_SYSENTER_EIP, x86.MSR_LSTAR),
        r"MSR_IA32_SYSENTER_EIP 0x\w+, expected entry_SYSENTER_compat 0x",
        traced=False,
    ),
    "compat-syscall-args": Fault(
        "test_" + COMPAT + "test_compat_fast_entry[syscall]",
        pt_regs("dx", lambda v: v ^ 0x100, stage="handler"),
        r"pt_regs->dx 0x33333233 at the handler, expected ia32 argument 2 = 0x33333333",
    ),
    "compat-sysenter-exit": Fault(
        "test_" + COMPAT + "test_compat_fast_entry[sysenter]",
        exit_anyway(False),
        r"an eligible 32-bit sysenter returns by SYSRETL, not iret",
    ),
    "sysenter-flags": Fault(  # a kernel without .Lsysenter_fix_flags: its C code runs with the caller's AC
        "test_" + COMPAT + "test_sysenter_clears_nt_ac_and_df_before_the_c_code[AC]",
        register("handler", "eflags", lambda v: v | (1 << 18)),
        r"handler: RFLAGS 0x\w+ still has AC the 32-bit caller set before sysenter",
    ),
    "vdso": Fault(
        "test_vdso.py::test_vdso_calls_never_enter_the_kernel[clock_gettime]",
        kernel_variable(CLOCK_MODE, "0"),
        r"clock_gettime: 3 calls through the vDSO and 1 raw syscall reached entry_SYSCALL_64 4 times, expected 1",
        traced=False,
    ),
    "vdso-fallback": Fault(
        "test_vdso.py::test_vdso_falls_back_to_the_syscall_without_a_vdso_clocksource",
        kernel_variable(CLOCK_MODE, "1"),
        r"with jiffies the vDSO must fall back to the syscall: .* 1 times, expected 4",
        traced=False,
    ),
    "vsyscall-emulated": Fault(
        "test_vdso.py::test_the_vsyscall_page_is_emulated_without_a_syscall[xonly]",
        kernel_variable(VSYSCALL_MODE, "2"),
        r"vsyscall=xonly: the caller exited 139",
        traced=False,
    ),
    "vsyscall-none": Fault(
        "test_vdso.py::test_without_the_vsyscall_page_the_caller_dies",
        kernel_variable(VSYSCALL_MODE, "1"),
        r"vsyscall=none: the caller exited 0, expected death by SIGSEGV \(139\)",
        traced=False,
    ),
    "idt-0x80-type": Fault(  # a trap gate: the entry would run with interrupts on
        "test_" + COMPAT + "test_idt_vector_0x80_is_an_interrupt_gate_on_the_thread_stack",
        idt_gate_type(x86.IA32_SYSCALL_VECTOR, x86.GATE_TRAP),
        r"IDT\[0x80\] has type 0xf and IST 0, expected an interrupt gate \(0xe\) on IST 0",
        traced=False,
    ),
    "sysenter-nt": Fault(  # a kernel whose .Lsysenter_fix_flags test forgot NT
        "test_" + COMPAT + "test_sysenter_clears_nt_ac_and_df_before_the_c_code[NT]",
        register("handler", "eflags", lambda v: v | (1 << 14)),
        r"handler: RFLAGS 0x\w+ still has NT the 32-bit caller set before sysenter",
    ),
    "sysenter-df": Fault(  # a kernel without the cld
        "test_" + COMPAT + "test_sysenter_clears_nt_ac_and_df_before_the_c_code[DF]",
        register("handler", "eflags", lambda v: v | DF),
        r"handler: RFLAGS 0x\w+ still has DF the 32-bit caller set before sysenter",
    ),
    "compat-clear-regs": Fault(
        "test_" + COMPAT + "test_32_bit_entries_clear_user_values_before_the_c_code[syscall]",
        register("do_fast_syscall_32", "rbx", lambda v: 0x1111_1111),
        r"at do_fast_syscall_32 these registers still hold the 32-bit caller's values: \{'rbx': '0x11111111'\}",
    ),
    "int80-clear-regs": Fault(
        "test_" + COMPAT + "test_32_bit_entries_clear_user_values_before_the_c_code[int80]",
        register("do_int80_emulation", "rsi", lambda v: 0x4444_4444),
        r"at do_int80_emulation these registers still hold the 32-bit caller's values: \{'rsi': '0x44444444'\}",
    ),
    "sysenter-if": Fault(  # a kernel without do_SYSENTER_32's `regs->flags |= X86_EFLAGS_IF`
        "test_" + COMPAT + "test_compat_pt_regs_hold_the_callers_stack_and_flags[sysenter]",
        pt_regs("flags", lambda v: v & ~IF, stage="handler"),
        r"pt_regs->flags 0x\w+, expected the caller's EFLAGS 0x\w+ \(but for the arithmetic flags\)",
    ),
    "compat-sp": Fault(
        "test_" + COMPAT + "test_compat_pt_regs_hold_the_callers_stack_and_flags[syscall]",
        pt_regs("sp", lambda v: v - 4, stage="handler"),
        r"pt_regs->sp 0x\w+, expected user ESP 0x",
    ),
    "sysretl-regs": Fault(
        "test_" + COMPAT + "test_compat_fast_exit_gives_back_the_callers_registers[syscall]",
        register("user_return", "rsi", lambda v: v + 1),
        r"back in user mode after a 32-bit syscall these registers changed: \{'rsi': '0x44444445 \(was 0x44444444\)'\}",
    ),
    "compat-gs": Fault(
        "test_" + COMPAT + "test_32_bit_entries_run_on_the_kernel_gs_base_and_give_the_users_back[syscall]",
        register("user_return", "gs_base", lambda v: v + 0x1000),
        r"back in user mode gs_base 0x1000, k_gs_base 0x\w+; expected the caller's 0x0",
    ),
    "sysretl-eligible": Fault(
        "test_" + ROADS + "test_an_eligible_32_bit_sigreturn_leaves_by_sysretl",
        exit_anyway(False),
        r"is SYSRETL-eligible, yet the kernel left by iret",
    ),
    "sysretl-ip": Fault(
        "test_" + ROADS + "test_an_eip_off_the_landing_pad_leaves_by_iret",
        exit_anyway(True),
        r"EIP is not the vDSO landing pad" + MUST_IRET_NOT_SYSRETL,
    ),
    "sysretl-cs": Fault(
        "test_" + ROADS + "test_a_64_bit_cs_leaves_by_iret_into_64_bit_mode",
        exit_anyway(True),
        r"CS is __USER_CS, not __USER32_CS" + MUST_IRET_NOT_SYSRETL,
    ),
    "sysretl-ss": Fault(
        "test_" + ROADS + "test_an_ss_other_than_user_ds_leaves_by_iret",
        exit_anyway(True),
        r"SS is a TLS segment, not __USER_DS" + MUST_IRET_NOT_SYSRETL,
    ),
    "sysretl-rf": Fault(
        "test_" + ROADS + "test_rf_set_leaves_by_iret",
        exit_anyway(True),
        r"RF set \(SYSRETL cannot restore it\)" + MUST_IRET_NOT_SYSRETL,
    ),
    "sysretl-tf": Fault(
        "test_" + ROADS + "test_tf_set_leaves_by_iret_and_traps",
        exit_anyway(True),
        r"TF set \(SYSRETL would trap at once\)" + MUST_IRET_NOT_SYSRETL,
    ),
    "compat-efault": Fault(  # a kernel that ignores the failed read of argument 6
        "test_" + ROADS + "test_an_unreadable_user_stack_fails_the_call_with_efault",
        at_symbol("do_fast_syscall_32", lambda r: f"{_regs_field('orig_ax')} == 252 && {_regs_field('bx')} == 7",
                  _readable_user_stack),
        r"the process exited 7, expected 14",
        traced=False,
    ),
    "ia32-last": Fault(  # a bound one short: the last number is refused
        "test_" + ROADS + "test_the_last_ia32_number_runs_its_handler",
        ia32_bound_lowered,
        r"i386 syscall \d+, the last below IA32_NR_syscalls = \d+, reached __ia32_sys_\w+ 0 times",
        traced=False,
    ),
    "ia32-bound": Fault(
        "test_" + ROADS + "test_the_first_ia32_number_past_the_table_returns_enosys[IA32_NR_syscalls]",
        at_symbol("syscall_exit_to_user_mode", lambda r: f"{_regs_field('orig_ax')} == {_ia32_bound(r)}",
                  lambda r: f"set var {_regs_field('ax')} = -4"),
        r"i386 syscall \d+ \(IA32_NR_syscalls\) returned '-4', expected -ENOSYS \(-38\)",
        traced=False,
    ),
    "int80-ts-compat": Fault(  # a kernel whose syscall_32_enter forgets TS_COMPAT
        "test_" + ROADS + "test_int80_from_64_bit_code_is_a_32_bit_syscall",
        at_symbol("__ia32_sys_mmap_pgoff", lambda r: "1",
                  lambda r: f"set var {CURRENT_6_1}->thread_info.status &= ~{TS_COMPAT}"),
        r"by int \$0x80 from 64-bit code returned 0x7f\w+, expected an address below 4 GiB",
        traced=False,
    ),
    "compat-cr3-exit": Fault(  # a kernel whose SYSRETL path forgets SWITCH_TO_USER_CR3_NOSTACK
        "test_" + ROADS + "test_compat_syscall_switches_the_page_tables_and_back[syscall]",
        register("sysretl", "cr3", lambda v: v & ~x86.PTI_USER_PGTABLE_BIT),
        r"sysretl: CR3 0x\w+, expected the user PGD 0x\w+ again before user mode",
    ),
    "sysenter-cr3-entry": Fault(  # a kernel whose entry_SYSENTER_compat forgets SWITCH_TO_KERNEL_CR3
        "test_" + ROADS + "test_compat_syscall_switches_the_page_tables_and_back[sysenter]",
        # At handler_return: a user CR3 at the handler would hide pt_regs from GDB's read there.
        register("handler_return", "cr3", lambda v: v | x86.PTI_USER_PGTABLE_BIT),
        r"handler_return: CR3 0x\w+, expected the kernel PGD 0x\w+ of user CR3 0x",
    ),
    "int80-orig_ax": Fault(  # a kernel that keeps RAX[63:32] in orig_ax
        "test_" + COMPAT + "test_int80_keeps_the_32_bit_number_from_a_64_bit_caller",
        pt_regs("orig_ax", lambda v: v | 0x5A5A_0000_0000, stage="handler"),
        r"pt_regs->orig_ax 0x5a5a00000040 at the handler, expected the 32-bit number 0x40",
    ),
    "compat-ax": Fault(
        "test_" + COMPAT + "test_32_bit_pt_regs_ax_is_enosys_until_the_handler_returns[syscall]",
        pt_regs("ax", lambda v: 64, stage="handler"),
        r"pt_regs->ax 64 at the handler, expected -ENOSYS \(-38\)",
    ),
    "compat-stack": Fault(
        "test_" + COMPAT + "test_32_bit_pt_regs_is_at_the_top_of_the_task_stack[syscall]",
        register("do_fast_syscall_32", "rdi", lambda v: v - 16),
        r"pt_regs at 0x\w+ \(do_fast_syscall_32\) ends at 0x\w+, not at the top of a 0x4000-byte task stack",
    ),
}

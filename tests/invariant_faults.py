"""Faults that make the kernel break one invariant each, at run time, through the debugger.

Used by test_invariants_can_fail.py: each fault is installed by an autouse fixture in a
pytester run of one suite test, and that test must fail naming expected and actual
values. A fault either changes what the CPU holds at one trace stage (and undoes it
right after the stage is recorded, so the guest runs on), or has GDB redirect a value
inside the kernel (breakpoint commands, no round trip).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_syscall_irl import x86

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


def pt_regs(field: str, change: Callable[[int], int]) -> Apply:
    """At do_syscall_64, struct pt_regs holds change(value) in *field*."""

    def apply(request: pytest.FixtureRequest) -> None:
        version = request.getfixturevalue("kernel").version_tuple

        def fault(gdb: Any) -> Callable[[], None]:
            regs_reg = x86.do_syscall_64_args(version)[0]
            where = gdb.registers([regs_reg])[regs_reg] + x86.PT_REGS_OFFSETS[field]
            old = gdb.read_memory(where, 8)
            gdb.write_memory(where, (change(int.from_bytes(old, "little")) % 2**64).to_bytes(8, "little"))
            return lambda: gdb.write_memory(where, old)

        request.getfixturevalue("syscall_trace").inject("do_syscall_64", fault)

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


PT_WRITE = "__x64_sys_write"
WRITE_OF_12_TO_1 = (
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['dx']}) == 12 && "
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['di']}) == 1"
)
HISTORY_WRITE = (
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['dx']}) == 17 && "
    f"*(unsigned long *)($rdi + {x86.PT_REGS_OFFSETS['di']}) > 2"
)
DF, AC = x86.flags("DF"), x86.flags("AC")

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
        "test_dispatch.py::test_out_of_range_number_returns_enosys",
        register("user_return", "rax", lambda v: 0),
        r"user RAX after syscall 4095 is 0, expected -ENOSYS \(-38\)",
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
}

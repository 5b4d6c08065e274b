"""CR3 on the syscall path.

With page table isolation (PTI), user mode runs on a copy of the page tables that maps
almost none of the kernel: entry_SYSCALL_64 switches CR3 to the kernel copy right after
swapgs (SWITCH_TO_KERNEL_CR3), and the exit switches back before the exit swapgs and
sysretq (SWITCH_TO_USER_CR3_STACK). The two PGDs are one 8 KiB allocation, so the two
CR3 values differ in bit 12 only (and, with PCID, in the user ASID bit 11). Without
PTI the kernel runs the syscall on the user's own CR3.

QEMU's default CPU is not affected by Meltdown, so PTI is off unless the kernel is
booted with pti=on: the PTI tests ask for such a guest with @pytest.mark.syscall_irl_boot_args.
"""

import pytest

from pytest_syscall_irl import roads, x86

WRITE = {"nr": "write", "args": {0: 1, 2: 12}}
KERNEL_STAGES = ("do_syscall_64", "handler", "ksys", "handler_return")
EXIT_STAGES = ("exit_swapgs", "sysretq", "user_return")


def _cpu_flags(guest):
    line = guest.run("grep -m1 '^flags' /proc/cpuinfo").output
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


@pytest.fixture
def pti_trace(kernel, guest, syscall_trace):
    """A write(1, ..., 12) traced in a guest booted with pti=on."""
    if not kernel.vmlinux.has_symbol("pti_init"):
        pytest.skip("kernel built without CONFIG_PAGE_TABLE_ISOLATION")
    assert "pti" in _cpu_flags(guest), "booted with pti=on, but /proc/cpuinfo has no pti flag: PTI is off"
    return syscall_trace.payload("syscall_irl", **WRITE)


@pytest.mark.syscall_irl_boot_args("pti=on")
def test_entry_switches_to_the_kernel_page_tables(pti_trace):
    user_cr3 = pti_trace["user"]["cr3"]
    assert pti_trace["entry"]["cr3"] == user_cr3, (
        f"CR3 at entry_SYSCALL_64 is {pti_trace['entry']['cr3']:#x}, expected the user's {user_cr3:#x}: "
        f"SYSCALL does not load CR3"
    )
    assert user_cr3 & x86.PTI_USER_PGTABLE_BIT, (
        f"user mode runs on CR3 {user_cr3:#x}, expected the user PGD of the PTI pair (bit 12 set)"
    )
    expected = x86.pti_kernel_cr3(user_cr3, pti_trace["entry"]["cr4"])
    for stage in pti_trace.taken(KERNEL_STAGES):
        assert stage["cr3"] == expected, (
            f"{stage.name}: CR3 {stage['cr3']:#x}, expected the kernel PGD {expected:#x} of user CR3 {user_cr3:#x}"
        )


@pytest.mark.syscall_irl_boot_args("pti=on")
def test_exit_returns_to_the_user_page_tables(pti_trace):
    user_cr3 = pti_trace["user"]["cr3"]
    stages = pti_trace.taken(EXIT_STAGES)
    assert "user_return" in [stage.name for stage in stages], "the trace did not see the return to user mode"
    for stage in stages:
        assert stage["cr3"] == user_cr3, (
            f"{stage.name}: CR3 {stage['cr3']:#x}, expected the user PGD {user_cr3:#x} again before user mode"
        )


@pytest.mark.syscall_irl_boot_args("pti=on")
def test_int80_switches_the_page_tables_on_the_idt_road_and_the_iret_exit(kernel, guest, syscall_trace):
    """`int $0x80` enters through the IDT (the idtentry code switches CR3, not entry_SYSCALL_64's)
    and leaves by IRET (swapgs_restore_regs_and_return_to_usermode switches back before iretq)."""
    if not kernel.vmlinux.has_symbol("pti_init"):
        pytest.skip("kernel built without CONFIG_PAGE_TABLE_ISOLATION")
    if not kernel.vmlinux.has_symbol("__ia32_sys_getppid"):
        pytest.skip("kernel built without CONFIG_IA32_EMULATION: int $0x80 is no syscall")
    assert "pti" in _cpu_flags(guest), "booted with pti=on, but /proc/cpuinfo has no pti flag: PTI is off"
    nr = roads.SyscallNames(kernel.vmlinux, roads.IA32).number("getppid")
    trace = syscall_trace.payload("int80", str(nr), nr="getppid")
    user_cr3 = trace["user"]["cr3"]
    assert user_cr3 & x86.PTI_USER_PGTABLE_BIT, f"user mode runs on CR3 {user_cr3:#x}, not the user PGD (bit 12)"
    expected = x86.pti_kernel_cr3(user_cr3, trace["entry"]["cr4"])
    for stage in trace.taken((trace.dispatch.name, "handler", "handler_return", "iret_path")):
        assert stage["cr3"] == expected, (
            f"{stage.name}: CR3 {stage['cr3']:#x}, expected the kernel PGD {expected:#x} of user CR3 {user_cr3:#x}"
        )
    assert trace.exit == "iret", f"int $0x80 returns by IRET, not {trace.exit or '?'}\n{trace}"
    for name in ("iretq", "user_return"):
        assert trace[name]["cr3"] == user_cr3, (
            f"{name}: CR3 {trace[name]['cr3']:#x}, expected the user PGD {user_cr3:#x} again before user mode"
        )


def test_without_pti_the_syscall_runs_on_the_user_cr3(guest, syscall_trace):
    if "pti" in _cpu_flags(guest):
        pytest.skip("PTI is on in the default guest: the pti=on tests cover the CR3 switch")
    trace = syscall_trace.payload("syscall_irl", **WRITE)
    user_cr3 = trace["user"]["cr3"]
    moved = {stage.name: f"{stage['cr3']:#x}" for stage in trace.taken() if stage["cr3"] != user_cr3}
    assert not moved, f"without PTI, CR3 stays the user's {user_cr3:#x} through the syscall; it was {moved}"

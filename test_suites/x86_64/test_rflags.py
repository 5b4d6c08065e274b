"""RFLAGS masking: SYSCALL clears the FMASK bits (R11 keeps the user's), SYSRET restores
RFLAGS from R11 as (R11 & 0x3C7FD7) | 2.

The payload sets every flag ring 3 may set (CF PF AF ZF SF DF OF NT AC ID) right before
its syscall, so a bit the kernel fails to clear shows."""

import pytest

from pytest_syscall_irl import x86

SET_BY_USER = x86.flags("CF", "PF", "AF", "ZF", "SF", "DF", "OF", "NT", "AC", "ID")


@pytest.fixture
def trace(syscall_trace):
    trace = syscall_trace.payload("flagsys", nr="getppid")
    user = trace["user"]["eflags"]
    assert user & SET_BY_USER == SET_BY_USER, (
        f"precondition: user RFLAGS {user:#x} lacks {x86.flag_names(SET_BY_USER & ~user)} the payload set"
    )
    return trace


@pytest.fixture
def fmask(read_msr):
    return read_msr(x86.MSR_SYSCALL_MASK)


def test_fmask_is_what_the_kernel_version_sets(fmask, kernel):
    expected = x86.expected_fmask(kernel.version_tuple)
    assert fmask == expected, (
        f"MSR_SYSCALL_MASK read in the guest is {fmask:#x} ({x86.flag_names(fmask)}), expected {expected:#x} "
        f"({x86.flag_names(expected)}) for Linux {kernel.release}"
    )


def test_syscall_clears_the_fmask_bits(trace, fmask):
    entry = trace["entry"]["eflags"]
    assert entry & fmask == 0, (
        f"RFLAGS at entry_SYSCALL_64 is {entry:#x}: {x86.flag_names(entry & fmask)} survived FMASK {fmask:#x}, "
        f"expected RFLAGS & FMASK == 0"
    )


def test_syscall_clears_each_flag_the_kernel_version_masks(trace, kernel):
    """Against the FMASK the kernel version must write, not the MSR as read: a bit missing
    from MSR_SYSCALL_MASK shows in the CPU (each user-settable flag and IF), also where
    /dev/cpu/0/msr is not there to read. Not the arithmetic flags under QEMU's TCG: its
    SYSCALL clears all six whatever FMASK says (they live in CC_SRC, which helper_syscall
    reloads from env->eflags, which never holds them)."""
    expected, entry = x86.expected_fmask(kernel.version_tuple), trace["entry"]["eflags"]
    assert entry & expected == 0, (
        f"RFLAGS at entry_SYSCALL_64 is {entry:#x}: {x86.flag_names(entry & expected)} survived, expected every bit "
        f"of Linux {kernel.release}'s FMASK {expected:#x} clear"
    )


def test_r11_keeps_the_user_rflags(trace):
    user, r11 = trace["user"]["eflags"], trace["entry"]["r11"]
    assert r11 == user, f"R11 at entry is {r11:#x}, expected the user RFLAGS {user:#x}"


def test_sysret_restores_rflags_from_r11(trace):
    sysret, back = trace["sysretq"], trace["user_return"]
    if not sysret.taken:
        pytest.skip(f"the kernel did not leave by SYSRET: {sysret.note}")
    expected = x86.sysret_rflags(sysret["r11"])
    assert back["eflags"] == expected, (
        f"RFLAGS after sysretq is {back['eflags']:#x}, expected (R11 {sysret['r11']:#x} & 0x3C7FD7) | 2 = {expected:#x}"
    )
    assert back["eflags"] & SET_BY_USER == SET_BY_USER, f"user flags lost across the syscall: {back['eflags']:#x}"


def test_sysret_returns_to_rcx_in_user_mode(trace):
    sysret, back = trace["sysretq"], trace["user_return"]
    if not sysret.taken:
        pytest.skip(f"the kernel did not leave by SYSRET: {sysret.note}")
    assert back["rip"] == sysret["rcx"], f"RIP after sysretq {back['rip']:#x}, expected RCX {sysret['rcx']:#x}"
    assert back["cs"] == x86.USER_CS, f"CS after sysretq {back['cs']:#x}, expected __USER_CS {x86.USER_CS:#x}"
    assert back["ss"] == x86.USER_DS, f"SS after sysretq {back['ss']:#x}, expected __USER_DS {x86.USER_DS:#x}"

"""Calls that never enter the kernel: the vDSO, and the emulated vsyscall page.

The vDSO reads the time (and the CPU number) in user mode, so clock_gettime,
gettimeofday, time and getcpu made through it never reach entry_SYSCALL_64, while the
same syscall made with `syscall` does. With a clocksource the vDSO cannot read
(jiffies), its time functions fall back to the syscall. The legacy vsyscall page at
0xffffffffff600000 is no code at all since 5.2 (vsyscall=xonly): a call there faults,
and the page fault handler emulates it (emulate_vsyscall), or kills the caller with
vsyscall=none.

The debugger counts, at entry_SYSCALL_64, the syscalls of one number that the payload's
process makes (syscall_trace.count_syscalls), and the calls of emulate_vsyscall. The
process is told by its page-table root (the payload's code mapped at its address names it
at its first hit), which needs no DWARF.
"""

import pytest

CALLS = 3
VDSO_CLOCKSOURCES = {"tsc", "kvm-clock", "hyperv_clocksource_tsc_page"}
SIGSEGV_STATUS = 128 + 11
GETTIMEOFDAY = "gettimeofday"


def _clocksource(guest):
    return guest.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource").output.strip()


def _syscalls(syscall_trace, name, command, payload, expect_status=0):
    """(how many syscalls *name* the process running *payload* made while *command* ran, its
    result); a command that ends with another status than *expect_status* fails the count."""
    return syscall_trace.count_syscalls(command, nr=name, payload=payload, expect_status=expect_status)


@pytest.mark.parametrize("func", ["clock_gettime", GETTIMEOFDAY, "time", "getcpu"])
def test_vdso_calls_never_enter_the_kernel(func, guest, syscall_trace):
    source = _clocksource(guest)
    if func != "getcpu" and source not in VDSO_CLOCKSOURCES:
        pytest.skip(f"the guest's clocksource {source!r} has no vDSO clock mode: its time calls enter the kernel")
    vdso = guest.payload("vdso").guest_path
    seen, result = _syscalls(syscall_trace, func, f"{vdso} {func} {CALLS}", "vdso")
    assert result.status == 0, result.output
    # The one raw syscall at the end proves the count sees this process's syscalls.
    assert seen == 1, (
        f"{func}: {CALLS} calls through the vDSO and 1 raw syscall reached entry_SYSCALL_64 {seen} times, expected 1"
    )


@pytest.mark.syscall_irl_boot_args("clocksource=jiffies")
def test_vdso_falls_back_to_the_syscall_without_a_vdso_clocksource(guest, syscall_trace):
    source = _clocksource(guest)
    assert source == "jiffies", f"booted clocksource=jiffies, the guest runs on {source!r}"
    vdso = guest.payload("vdso").guest_path
    seen, result = _syscalls(syscall_trace, "clock_gettime", f"{vdso} clock_gettime {CALLS}", "vdso")
    assert result.status == 0, result.output
    assert seen == CALLS + 1, (
        f"with jiffies the vDSO must fall back to the syscall: {CALLS} vDSO calls and 1 raw syscall reached "
        f"entry_SYSCALL_64 {seen} times, expected {CALLS + 1}"
    )


def _vsyscall(kernel, guest, syscall_trace):
    """(emulate_vsyscall hits, gettimeofday syscalls, the result) of one legacy vsyscall,
    each run of the vsyscall payload counting one of them."""
    if not kernel.vmlinux.has_symbol("emulate_vsyscall"):
        pytest.skip("kernel built without CONFIG_X86_VSYSCALL_EMULATION: no vsyscall page to call")
    program = guest.payload("vsyscall").guest_path
    # The caller returns (emulated) or dies of SIGSEGV (vsyscall=none): which one is each
    # test's verdict; any other status means it did not run.
    ran = (0, SIGSEGV_STATUS)
    syscalls, result = _syscalls(syscall_trace, GETTIMEOFDAY, program, "vsyscall", expect_status=ran)
    emulated, again = syscall_trace.count(program, "emulate_vsyscall", expect_status=ran, payload="vsyscall")
    assert again.status == result.status, f"two runs of {program} ended {result.status} and {again.status}"
    return emulated, syscalls, result


@pytest.mark.parametrize("mode", [
    pytest.param("xonly", marks=pytest.mark.syscall_irl_boot_args("vsyscall=xonly")),
    pytest.param("emulate", marks=pytest.mark.syscall_irl_boot_args("vsyscall=emulate")),
])
def test_the_vsyscall_page_is_emulated_without_a_syscall(mode, kernel, guest, syscall_trace):
    emulated, syscalls, result = _vsyscall(kernel, guest, syscall_trace)
    assert result.status == 0, f"vsyscall={mode}: the caller exited {result.status}: {result.output!r}"
    ret, seconds = (int(v) for v in result.output.split())
    assert ret == 0 and seconds > 0, f"vsyscall={mode}: gettimeofday gave {ret}, {seconds} s"
    assert emulated == 1, f"vsyscall={mode}: emulate_vsyscall ran {emulated} times for one call, expected 1"
    assert syscalls == 0, f"vsyscall={mode}: the emulated call reached entry_SYSCALL_64 ({syscalls} gettimeofday)"


@pytest.mark.syscall_irl_boot_args("vsyscall=none")
def test_without_the_vsyscall_page_the_caller_dies(kernel, guest, syscall_trace):
    _, syscalls, result = _vsyscall(kernel, guest, syscall_trace)
    assert result.status == SIGSEGV_STATUS, (
        f"vsyscall=none: the caller exited {result.status}, expected death by SIGSEGV ({SIGSEGV_STATUS})"
    )
    assert syscalls == 0, f"vsyscall=none: a gettimeofday syscall was made ({syscalls})"

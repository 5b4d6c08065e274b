"""When the kernel must not return with SYSRET, each condition proven both ways.

SYSRET returns to RCX with RFLAGS from R11, cannot restore RF, restores TF only to trap
at once in user mode, and faults in ring 0 on Intel CPUs when RCX is not canonical. So
the kernel returns by SYSRET only when pt_regs has RCX == RIP, R11 == RFLAGS, a
canonical RIP, neither RF nor TF, CS == __USER_CS and SS == __USER_DS (the checks after
do_syscall_64 in entry_64.S; in C, in do_syscall_64's return value, since 6.7), and by
IRET otherwise. The sysret_check payload rt_sigreturns to a context that breaks exactly
one condition; tfsys makes a syscall with TF set; an execve returns to a new program.
Each must leave by IRET with the frame pt_regs held, and the process must then see what
the architecture promises, so the check cannot pass by luck.
"""

import pytest

from pytest_syscall_irl import x86

WRITE = {"nr": "write", "args": {0: 1, 2: 12}}
TF, RF = x86.flags("TF"), x86.flags("RF")
NON_CANONICAL = 0x800000000000
HIGH_BITS = 0xFFFF_0000_0000_0000  # bits 63:48: RCX sign-extended from bit 47 drops them
# TASK_SIZE_MAX with 4-level paging ((1 << 47) - PAGE_SIZE; QEMU's default CPU has no LA57):
# 6.12 refuses ip >= TASK_SIZE_MAX, 6.1 only a non-canonical ip.
TASK_SIZE_MAX = 0x7FFF_FFFF_F000
TOP_IP = TASK_SIZE_MAX - 2  # sysret_check maps `jmp .-16` there, after code that exits 7
TOP_STATUS = 7
LDT_SS = 0x7  # LDT entry 0, RPL 3: the data segment sysret_check installs for mode "ss"
SIGSEGV_STATUS = 128 + 11
# do_syscall_64 returns whether the kernel may SYSRET since 6.7 ("x86/entry: Convert
# SYSRET eligibility checks to C"); before, it returns void and the checks are asm.
BOOL_SINCE = (6, 7, 0)


@pytest.fixture
def sigreturn(syscall_trace):
    """Trace the rt_sigreturn of `sysret_check MODE`; it must exit 0 unless *expect_status*
    says otherwise (None: the test judges the status itself)."""
    return lambda mode, expect_status=0: syscall_trace.payload("sysret_check", mode, nr="rt_sigreturn",
                                                               expect_status=expect_status)


def _left_by_iret(trace, why):
    assert trace.exit == "iret", (
        f"{why}: the kernel must return by IRET, it left by {trace.exit or 'no exit the trace saw'}\n{trace}"
    )
    frame, pt_regs = trace["iretq"].frame, trace["iret_path"].pt_regs
    expected = {name: pt_regs[name] for name in x86.IRET_FRAME_FIELDS}
    assert frame == expected, f"IRET frame {frame}, expected pt_regs' {expected}"
    return frame


def _dispatch_agrees(trace, kernel):
    """Since 6.7 do_syscall_64 returns true for SYSRET, false for IRET."""
    if kernel.version_tuple < BOOL_SINCE or trace.road.name != "syscall64":
        return
    returned = trace["dispatch_return"]["rax"] & 0xFF
    assert bool(returned) == (trace.exit == "sysretq"), (
        f"do_syscall_64 returned {returned} (SYSRET allowed: {bool(returned)}), but the kernel left by {trace.exit}"
    )


def test_an_eligible_syscall_leaves_by_sysretq(syscall_trace, kernel):
    trace = syscall_trace.payload("syscall_irl", **WRITE)
    assert trace.exit == "sysretq", (
        f"write(1, ..., 12) is SYSRET-eligible, yet the kernel left by {trace.exit}\n{trace}"
    )
    _dispatch_agrees(trace, kernel)


def test_an_eligible_sigreturn_leaves_by_sysretq(sigreturn, kernel):
    trace = sigreturn("none")
    assert trace.output.startswith("none "), f"sysret_check printed {trace.output!r}"
    assert trace.exit == "sysretq", (
        f"an rt_sigreturn to the untouched context is SYSRET-eligible, yet the kernel left by {trace.exit}\n{trace}"
    )
    _dispatch_agrees(trace, kernel)


def test_rcx_other_than_rip_leaves_by_iret(sigreturn, kernel):
    trace = sigreturn("rcx")
    frame = _left_by_iret(trace, "RCX != RIP")
    back = trace["user_return"]
    assert back["rcx"] == frame["ip"] + 1, f"user RCX {back['rcx']:#x}, sigreturn set {frame['ip'] + 1:#x}"
    assert trace.output == f"rcx rcx={frame['ip'] + 1:#x} r11={frame['flags']:#x} ss={x86.USER_DS:#x}\n", (
        trace.output
    )
    _dispatch_agrees(trace, kernel)


def test_rcx_differing_from_rip_only_above_bit_47_leaves_by_iret(sigreturn, kernel):
    """RCX = RIP | 0xffff000000000000: sign-extended from bit 47 it is RIP again, so 6.1's
    canonical check (RCX sign-extended == RIP) passes it, and only the RCX == RIP check
    keeps the kernel from a SYSRET to a non-canonical RCX (a #GP in ring 0 on Intel)."""
    trace = sigreturn("rcxhigh")
    frame = _left_by_iret(trace, "RCX != RIP in bits 63:48 only")
    rcx = frame["ip"] | HIGH_BITS
    assert trace["user_return"]["rcx"] == rcx, f"user RCX {trace['user_return']['rcx']:#x}, sigreturn set {rcx:#x}"
    assert trace.output.startswith(f"rcxhigh rcx={rcx:#x} "), trace.output
    _dispatch_agrees(trace, kernel)


def test_r11_other_than_rflags_leaves_by_iret(sigreturn, kernel):
    trace = sigreturn("r11")
    frame = _left_by_iret(trace, "R11 != RFLAGS")
    r11 = trace["iret_path"].pt_regs["r11"]
    assert r11 != frame["flags"] and trace["user_return"]["r11"] == r11, (
        f"user R11 {trace['user_return']['r11']:#x}, sigreturn set {r11:#x} (RFLAGS {frame['flags']:#x})"
    )
    _dispatch_agrees(trace, kernel)


def test_rf_set_leaves_by_iret(sigreturn, kernel):
    trace = sigreturn("rf")
    frame = _left_by_iret(trace, "RF set (SYSRET cannot restore it)")
    assert frame["flags"] & RF, f"the IRET frame's RFLAGS {frame['flags']:#x} lost RF"
    _dispatch_agrees(trace, kernel)


def test_tf_set_leaves_by_iret_and_traps_after_one_instruction(syscall_trace, kernel):
    trace = syscall_trace.payload("tfsys", nr="getppid")
    assert trace["user"]["eflags"] & TF, f"tfsys made its syscall without TF: {trace['user'].line()}"
    frame = _left_by_iret(trace, "TF set (SYSRET would trap at once)")
    assert frame["flags"] & TF, f"the IRET frame's RFLAGS {frame['flags']:#x} lost TF"
    traps = trace.output.split()[0]
    assert traps == "1", f"tfsys saw {traps} single-step traps after the syscall, expected 1 ({trace.output!r})"
    _dispatch_agrees(trace, kernel)


def test_non_canonical_rip_leaves_by_iret_and_faults_in_user_context(sigreturn, kernel):
    trace = sigreturn("noncanonical", expect_status=None)  # its death is asserted below, after the exit
    frame = _left_by_iret(trace, f"RIP {NON_CANONICAL:#x} is not canonical")
    assert frame["ip"] == NON_CANONICAL and not x86.is_canonical(frame["ip"])
    assert trace.status == SIGSEGV_STATUS, (
        f"sysret_check exited with status {trace.status}, expected death by SIGSEGV ({SIGSEGV_STATUS})"
    )
    _dispatch_agrees(trace, kernel)


def test_the_last_user_bytes_below_task_size_max_leave_by_sysretq(sigreturn, kernel):
    """RIP = RCX = TASK_SIZE_MAX - 2 (a `jmp` in the top user page): canonical and below
    TASK_SIZE_MAX, so SYSRET-eligible; a canonical check that sign-extends from a lower bit,
    or a user-space bound off by a page, sends it to IRET."""
    trace = sigreturn("top", expect_status=TOP_STATUS)
    assert trace.exit == "sysretq", (
        f"RIP {TOP_IP:#x} (TASK_SIZE_MAX - 2) is canonical and below TASK_SIZE_MAX, hence SYSRET-eligible, "
        f"yet the kernel left by {trace.exit or 'no exit the trace saw'}\n{trace}"
    )
    assert trace["sysretq"]["rcx"] == TOP_IP, f"RCX at sysretq {trace['sysretq']['rcx']:#x}, expected {TOP_IP:#x}"
    _dispatch_agrees(trace, kernel)


def test_rip_at_task_size_max_is_refused_since_6_7_and_canonical_before(sigreturn, kernel):
    """RIP = RCX = TASK_SIZE_MAX (0x7ffffffff000): canonical, but no user page is there.
    Since 6.7 (the SYSRET checks in C) the kernel refuses ip >= TASK_SIZE_MAX; before, it
    refuses only a non-canonical RIP, so this one SYSRETs. The process dies of SIGSEGV
    either way, fetching there in user mode."""
    trace = sigreturn("tasksize", expect_status=SIGSEGV_STATUS)
    if kernel.version_tuple >= BOOL_SINCE:
        frame = _left_by_iret(trace, f"RIP {TASK_SIZE_MAX:#x} is not below TASK_SIZE_MAX (checked since 6.7)")
        assert frame["ip"] == TASK_SIZE_MAX, f"IRET frame RIP {frame['ip']:#x}, expected {TASK_SIZE_MAX:#x}"
    else:
        assert trace.exit == "sysretq", (
            f"before 6.7 the kernel refuses only a non-canonical RIP; {TASK_SIZE_MAX:#x} is canonical, yet the "
            f"kernel left by {trace.exit or 'no exit the trace saw'}\n{trace}"
        )
    _dispatch_agrees(trace, kernel)


def test_an_ss_other_than_user_ds_leaves_by_iret(sigreturn, kernel, guest):
    """SS = an LDT data segment (0x7), restored as it is with UC_STRICT_RESTORE_SS: SYSRET
    would load __USER_DS from MSR_STAR instead (the DOSEMU case in entry_64.S's comments)."""
    untraced = guest.run(f"{guest.payload('sysret_check').guest_path} ss")
    if untraced.status == 3 and f"modify_ldt returned {-x86.ENOSYS}" in untraced.output:
        pytest.skip("kernel without modify_ldt (CONFIG_MODIFY_LDT_SYSCALL): no LDT segment to return to")
    trace = sigreturn("ss")
    frame = _left_by_iret(trace, f"SS is {LDT_SS:#x}, not __USER_DS")
    assert frame["ss"] == LDT_SS, f"IRET frame SS {frame['ss']:#x}, expected the LDT selector {LDT_SS:#x}"
    assert trace["user_return"]["ss"] == LDT_SS, trace["user_return"].line()
    assert trace.output.endswith(f" ss={LDT_SS:#x}\n") and trace.status == 0, (
        f"sysret_check exited {trace.status} printing {trace.output!r}: it should run on with SS {LDT_SS:#x}"
    )
    _dispatch_agrees(trace, kernel)


def test_a_32_bit_cs_leaves_by_iret_into_compatibility_mode(sigreturn, kernel):
    trace = sigreturn("cs32", expect_status=None)  # its status (4, not 5) is asserted below, after the exit
    frame = _left_by_iret(trace, "CS is __USER32_CS")
    assert frame["cs"] == x86.USER32_CS, f"IRET frame CS {frame['cs']:#x}, expected __USER32_CS"
    assert trace["user_return"]["cs"] == x86.USER32_CS, trace["user_return"].line()
    # The code there computes 5 as 64-bit code and 4 as 32-bit code, and exits with it.
    assert trace.status == 4, f"the code after the return exited {trace.status}: 4 in 32-bit mode, 5 in 64-bit mode"
    _dispatch_agrees(trace, kernel)


def test_execve_returns_to_the_new_program_by_iret(syscall_trace, guest, kernel):
    program = guest.payload("syscall_irl")
    # The shell's execve of the payload, by its path (no DWARF needed): not the agent's of /bin/sh.
    trace = syscall_trace.command(f"exec {program.guest_path}", nr="execve", args={0: program.guest_path})
    frame = _left_by_iret(trace, "execve replaced RIP (RCX is the old program's)")
    assert frame["ip"] == program.entry, (
        f"execve returned to {frame['ip']:#x}, expected the ELF entry {program.entry:#x}"
    )
    assert trace.output == "syscall_irl\n", trace.output
    _dispatch_agrees(trace, kernel)

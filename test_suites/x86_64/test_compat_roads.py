"""The checks on the 32-bit roads, each exercised alone: when the fast 32-bit exit may use
SYSRETL, what the fast entries do when the user stack cannot be read, the ia32 dispatch
bound from both sides, TS_COMPAT, and the page tables across entry_SYSCALL_compat.

do_fast_syscall_32 (arch/x86/entry/common.c, 6.1 and 6.12) lets entry_SYSCALL_compat and
entry_SYSENTER_compat leave by SYSRETL only when pt_regs has EIP at the vDSO's
int80_landing_pad, CS == __USER32_CS, SS == __USER_DS and neither RF nor TF (nor VM,
since 6.7's rewrite in C, which a 64-bit kernel never has in pt_regs): SYSRETL returns to
ECX and loads CS and SS from MSR_STAR. The sysretl_check payload makes a 32-bit
rt_sigreturn by `syscall` to a context that breaks exactly one of them; its eligible twin
("none") shows that the payload's context is otherwise one SYSRETL may take.
"""

import pytest

from pytest_syscall_irl import roads, x86

LOW = 0xFFFF_FFFF
RF, TF = x86.flags("RF"), x86.flags("TF")
MAGIC_CX = 0x5EED_5EED  # the ECX every sysretl_check context holds
EFAULT = 14
SIGTRAP_STATUS = 128 + 5
SHARED_SINCE = 424  # pidfd_send_signal (5.1): from here on every architecture's tables share numbers
I386_MMAP2 = roads.IA32.fallback_numbers["mmap2"]  # the i386 ABI's number (arch/x86/entry/syscalls/syscall_32.tbl)


@pytest.fixture
def ia32(kernel):
    if not kernel.vmlinux.has_symbol("__ia32_sys_getppid"):
        pytest.skip("kernel built without CONFIG_IA32_EMULATION: no 32-bit syscalls to check")


@pytest.fixture
def sigreturn(ia32, syscall_trace):
    """Trace the 32-bit rt_sigreturn of `sysretl_check MODE` (made by `syscall`, MSR_CSTAR)."""
    # The status is asserted by each test after the exit: a kernel that takes the wrong exit
    # makes the payload exit otherwise, and the exit is what the test is about.
    return lambda mode: syscall_trace.payload("sysretl_check", mode, nr="rt_sigreturn", at="sirl_sigreturn_insn",
                                              expect_status=None)


def _left_by_iret(trace, why):
    assert trace.exit == "iret", (
        f"{why}: the kernel must return by IRET, it left by {trace.exit or 'no exit the trace saw'}\n{trace}"
    )
    frame, pt_regs = trace["iretq"].frame, trace["iret_path"].pt_regs
    expected = {name: pt_regs[name] for name in x86.IRET_FRAME_FIELDS}
    assert frame == expected, f"IRET frame {frame}, expected pt_regs' {expected}"
    assert not trace["dispatch_return"]["rax"] & 0xFF, f"do_fast_syscall_32 said SYSRETL, yet the kernel IRETs\n{trace}"
    return frame


# --- when SYSRETL, when IRET ---------------------------------------------------------


def test_an_eligible_32_bit_sigreturn_leaves_by_sysretl(sigreturn):
    trace = sigreturn("none")
    assert trace.exit == "sysretl", (
        f"an rt_sigreturn to the vDSO landing pad, __USER32_CS, __USER_DS, no RF or TF is SYSRETL-eligible, "
        f"yet the kernel left by {trace.exit}\n{trace}"
    )
    assert trace.status == 0 and trace.output == f"none ecx={MAGIC_CX:08x} ss={x86.USER_DS}\n", (
        f"sysretl_check exited {trace.status} printing {trace.output!r}"
    )


def test_an_eip_off_the_landing_pad_leaves_by_iret(sigreturn):
    """SYSRETL would return to ECX: an EIP other than the landing pad (where the vDSO pops
    the caller's ECX) needs IRET, which gives the context its own ECX back."""
    trace = sigreturn("ip")
    frame = _left_by_iret(trace, "EIP is not the vDSO landing pad")
    back = trace["user_return"]
    assert back["rip"] == frame["ip"] and back["rcx"] & LOW == MAGIC_CX, (
        f"back in user mode at {back['rip']:#x} with ECX {back['rcx'] & LOW:#x}, expected the context's "
        f"EIP {frame['ip']:#x} and ECX {MAGIC_CX:#x}"
    )
    assert trace.status == 0 and trace.output.startswith(f"ip ecx={MAGIC_CX:08x} "), (
        f"sysretl_check exited {trace.status} printing {trace.output!r}"
    )


def test_a_64_bit_cs_leaves_by_iret_into_64_bit_mode(sigreturn):
    """SYSRETL always loads __USER32_CS; a context with __USER_CS must get it by IRET."""
    trace = sigreturn("cs")
    frame = _left_by_iret(trace, "CS is __USER_CS, not __USER32_CS")
    assert frame["cs"] == x86.USER_CS, f"IRET frame CS {frame['cs']:#x}, expected __USER_CS"
    assert trace["user_return"]["cs"] == x86.USER_CS, trace["user_return"].line()
    assert trace.status == 5, f"the code after the return exited {trace.status}: 5 as 64-bit code, 0 as 32-bit"


def test_an_ss_other_than_user_ds_leaves_by_iret(sigreturn):
    """SS = a flat data segment in a TLS slot: SYSRETL would load __USER_DS from MSR_STAR."""
    trace = sigreturn("ss")
    frame = _left_by_iret(trace, "SS is a TLS segment, not __USER_DS")
    assert frame["ss"] != x86.USER_DS and x86.rpl(frame["ss"]) == 3, f"IRET frame SS {frame['ss']:#x}"
    assert trace["user_return"]["ss"] == frame["ss"], trace["user_return"].line()
    assert trace.status == 0 and trace.output.endswith(f" ss={frame['ss']}\n"), (
        f"sysretl_check exited {trace.status} printing {trace.output!r}: it should run on with SS {frame['ss']:#x}"
    )


def test_rf_set_leaves_by_iret(sigreturn):
    trace = sigreturn("rf")
    frame = _left_by_iret(trace, "RF set (SYSRETL cannot restore it)")
    assert frame["flags"] & RF, f"the IRET frame's EFLAGS {frame['flags']:#x} lost RF"
    assert trace.status == 0, f"sysretl_check exited {trace.status} printing {trace.output!r}"


def test_tf_set_leaves_by_iret_and_traps(sigreturn):
    trace = sigreturn("tf")
    frame = _left_by_iret(trace, "TF set (SYSRETL would trap at once)")
    assert frame["flags"] & TF, f"the IRET frame's EFLAGS {frame['flags']:#x} lost TF"
    assert trace.status == SIGTRAP_STATUS, f"sysretl_check exited {trace.status}, expected death by SIGTRAP"


def test_an_unreadable_user_stack_fails_the_call_with_efault(ia32, guest):
    """The fast entries read argument 6 from the user stack (the vDSO convention); when
    that read faults, do_fast_syscall_32 must not run the call (exit_group(7) here) but
    return -EFAULT. The payload's SIGSEGV handler exits with -EAX; 7 means the call ran."""
    result = guest.run(f"{guest.payload('sysretl_check').guest_path} efault")
    assert result.status == EFAULT, (
        f"exit_group(7) by a 32-bit syscall with ESP = 16: the process exited {result.status}, expected "
        f"{EFAULT} (-EFAULT in EAX, the call not made); output {result.output!r}"
    )


# --- the ia32 dispatch bound, from both sides -----------------------------------------


def ia32_nr_syscalls(vmlinux):
    """IA32_NR_syscalls, derived without the bound under test. Kernels since the BHI
    changes (6.9, 6.1.85) build no ia32_sys_call_table to size it by. But from 424 on
    (5.1) every architecture's syscall tables take new calls at the same number, and in
    6.1 (450 set_mempolicy_home_node) and 6.12 (462 mseal) both x86 tables end at the same
    shared call: so the 64-bit sys_call_table (still built, for ftrace) gives the bound,
    as long as its last slot is >= 424 and the kernel has the ia32 handler of that call."""
    if not vmlinux.has_symbol("sys_call_table"):
        pytest.skip("kernel without sys_call_table: nothing to size IA32_NR_syscalls by")
    size = vmlinux.symbol_size("sys_call_table") // 8
    last = roads.SyscallNames(vmlinux, roads.X86_64).table.get(size - 1, "")
    name = last.removeprefix("__x64_sys_")
    assert size - 1 >= SHARED_SINCE and last.startswith("__x64_sys_"), (
        f"sys_call_table ends at {size - 1} ({last or 'no handler'}), not a call shared since 5.1 (>= {SHARED_SINCE})"
    )
    handlers = [f"{p}{name}" for p in ("__ia32_sys_", "__ia32_compat_sys_") if vmlinux.has_symbol(f"{p}{name}")]
    assert handlers, f"the last 64-bit syscall {name} ({size - 1}) has no ia32 handler: the tables do not end alike"
    return size, handlers[0]


def test_the_last_ia32_number_runs_its_handler(ia32, kernel, guest, syscall_trace):
    size, handler = ia32_nr_syscalls(kernel.vmlinux)
    # Arguments all 0: set_mempolicy_home_node and mseal do nothing for an empty range.
    command = f"{guest.payload('compat32').guest_path} int80 {size - 1} 0 0 0 0"
    hits, _ = syscall_trace.count(command, handler)
    assert hits == 1, (
        f"i386 syscall {size - 1}, the last below IA32_NR_syscalls = {size}, reached {handler} {hits} times"
    )


@pytest.mark.parametrize("which", ["IA32_NR_syscalls", "-2"])
def test_the_first_ia32_number_past_the_table_returns_enosys(which, ia32, kernel, guest):
    """An off-by-one bound lets IA32_NR_syscalls through, where array_index_nospec() makes
    it 0 (restart_syscall: -EINTR), so the one number that tells is the bound itself; -2
    tells a signed comparison (-1 is no syscall at all: the kernel leaves pt_regs->ax)."""
    size, _ = ia32_nr_syscalls(kernel.vmlinux)
    nr = size if which == "IA32_NR_syscalls" else int(which)
    result = guest.run(f"{guest.payload('compat32').guest_path} int80 {nr}")
    assert result.status == 0 and result.output == f"{-x86.ENOSYS}\n", (
        f"i386 syscall {nr} ({which}) returned {result.output.strip()!r}, expected -ENOSYS ({-x86.ENOSYS})"
    )


def test_int80_from_64_bit_code_is_a_32_bit_syscall(ia32, guest):
    """do_int80_emulation marks the call TS_COMPAT (syscall_32_enter), so in_32bit_syscall()
    holds: mmap2 from a 64-bit process by int $0x80 gets an address below 4 GiB (the compat
    mmap base), not one from the 64-bit layout."""
    result = guest.run(f"{guest.payload('int80').guest_path} {I386_MMAP2} 0 4096 3 0x22 -1 0")
    address = int(result.output)
    assert result.status == 0 and 0 < address < 2**32, (
        f"mmap2(NULL, 4096, RW, PRIVATE|ANONYMOUS) by int $0x80 from 64-bit code returned {address:#x}, "
        f"expected an address below 4 GiB"
    )


# --- page tables across entry_SYSCALL_compat and its SYSRETL -------------------------


# SYSENTER needs an Intel vendor string (an AMD-style CPU refuses it in compatibility mode),
# and the PTI guest with it is one variant more: the CR3 switch of entry_SYSENTER_compat is
# its own SWITCH_TO_KERNEL_CR3, not the one entry_SYSCALL_compat runs.
INTEL = "qemu64,vendor=GenuineIntel"


@pytest.mark.syscall_irl_boot_args("pti=on")
@pytest.mark.parametrize("way", ["syscall", pytest.param("sysenter", marks=pytest.mark.syscall_irl_cpu(INTEL))])
def test_compat_syscall_switches_the_page_tables_and_back(way, ia32, kernel, guest, syscall_trace):
    if not kernel.vmlinux.has_symbol("pti_init"):
        pytest.skip("kernel built without CONFIG_PAGE_TABLE_ISOLATION")
    nr = roads.SyscallNames(kernel.vmlinux, roads.IA32).number("getppid")
    trace = syscall_trace.payload("compat32", way, str(nr), nr="getppid", at=f"sirl_{way}_insn")
    user_cr3 = trace["user"]["cr3"]
    assert user_cr3 & x86.PTI_USER_PGTABLE_BIT, f"user mode runs on CR3 {user_cr3:#x}, not the user PGD (bit 12)"
    expected = x86.pti_kernel_cr3(user_cr3, trace["entry"]["cr4"])
    for stage in trace.taken((trace.dispatch.name, "handler", "handler_return")):
        assert stage["cr3"] == expected, (
            f"{stage.name}: CR3 {stage['cr3']:#x}, expected the kernel PGD {expected:#x} of user CR3 {user_cr3:#x}"
        )
    assert trace.exit == "sysretl", f"the compat {way} left by {trace.exit or '?'}, not SYSRETL\n{trace}"
    for name in ("sysretl", "user_return"):
        assert trace[name]["cr3"] == user_cr3, (
            f"{name}: CR3 {trace[name]['cr3']:#x}, expected the user PGD {user_cr3:#x} again before user mode"
        )


# --- a syscall a tracer skips, on the int $0x80 road -------------------------------------

SKIPPED = 0x1234  # what skipsys's tracer leaves in RAX when it skips the syscall


def test_an_int80_syscall_a_tracer_skips_returns_what_the_tracer_set(ia32, guest):
    """A ptrace tracer sets orig_rax = -1 and rax at the syscall-entry stop of an `int $0x80`
    getppid: do_int80_syscall_32 must run nothing for nr == -1 (`else if (nr != -1)`), not
    even __ia32_sys_ni_syscall, whose -ENOSYS would overwrite the tracer's value."""
    result = guest.run(f"{guest.payload('skipsys').guest_path} int80")
    assert result.status == 0, f"skipsys int80 exited {result.status} (3: ptrace failed, 4: no syscall stop): " \
                               f"{result.output}"
    returned = int(result.output)
    assert returned == SKIPPED, (
        f"the skipped int $0x80 syscall returned {returned}, expected the tracer's {SKIPPED} "
        f"(orig_rax = -1 runs no handler)"
    )

"""Dispatch: sys_call_table[nr] is __x64_sys_<name>; on kernels with the BHI changes
do_syscall_64 reaches the handler through x64_sys_call(regs, nr); the handler runs under
do_syscall_64 and entry_SYSCALL_64; out-of-range numbers get -ENOSYS; user mode sees the
handler's return value in RAX.

Since the BHI mitigations (6.9, backported to 6.1.85) the CPU no longer follows
sys_call_table: do_syscall_x64() calls x64_sys_call(), a switch on nr that calls (or
jumps to) the handler (arch/x86/entry/syscall_64.c). The table is still built, for
ftrace and syscall tracing, so its slots must still name the handlers."""

import pytest

from pytest_syscall_irl import x86

DUP = x86.SYSCALL_NUMBERS["dup"]
WRITE = x86.SYSCALL_NUMBERS["write"]
# Since 5.14 ("x86/entry/64: Sign-extend system calls on entry to int") the number is the
# int in EAX: RAX's upper half is ignored. Positive, so rawsys's strtol takes it whole.
INT_NR_SINCE = (5, 14, 0)
UPPER_HALF = 0x0123_4567_0000_0000
X32_SYSCALL_BIT = 0x4000_0000  # __X32_SYSCALL_BIT: the x32 ABI's numbers


@pytest.mark.parametrize("name", ["write", "dup"])
def test_sys_call_table_points_at_the_handler(name, kernel, gdb):
    nr = x86.SYSCALL_NUMBERS[name]
    slot = kernel.vmlinux.symbol("sys_call_table") + 8 * nr
    live = int.from_bytes(gdb.read_memory(slot, 8), "little")  # the running kernel's table
    handler = kernel.vmlinux.symbol(f"__x64_sys_{name}")
    assert live == handler, f"sys_call_table[{nr}] is {live:#x}, expected __x64_sys_{name} {handler:#x}"


def _return_address(gdb):
    return int.from_bytes(gdb.read_memory(gdb.registers(["rsp"])["rsp"], 8), "little")


def test_dispatch_goes_through_x64_sys_call(kernel, guest, gdb):
    vmlinux = kernel.vmlinux
    if not vmlinux.has_symbol("x64_sys_call"):
        pytest.skip(f"kernel {kernel.release} has no x64_sys_call: it dispatches through sys_call_table "
                    f"(before the BHI changes, 6.9 / 6.1.85)")
    # x64_sys_call(const struct pt_regs *regs, unsigned int nr), for the payload's write(1, ..., 12).
    offsets = x86.PT_REGS_OFFSETS
    ours = f"*(unsigned long *)($rdi + {offsets['di']}) == 1 && *(unsigned long *)($rdi + {offsets['dx']}) == 12"
    gdb.break_insert(f"*{vmlinux.symbol('x64_sys_call'):#x}", condition=ours)
    pending = guest.console.start(guest.payload("syscall_irl").guest_path)
    gdb.continue_until_stop(timeout=30)
    nr = gdb.registers(["rsi"])["rsi"] & 0xFFFFFFFF
    assert nr == WRITE, f"x64_sys_call got nr {nr} for the payload's write(1, ..., 12), expected {WRITE}"
    regs, caller = gdb.registers(["rdi"])["rdi"], _return_address(gdb)
    gdb.delete_breakpoints()
    handler = vmlinux.symbol("__x64_sys_write")
    gdb.break_insert(f"*{handler:#x}", condition=f"$rdi == {regs:#x}")
    gdb.continue_until_stop(timeout=30)
    reached, handler_caller = gdb.registers(["rip"])["rip"], _return_address(gdb)
    gdb.delete_breakpoints()
    gdb.resume()
    pending.wait(30).check()
    do_syscall_64 = vmlinux.symbol("do_syscall_64")
    assert do_syscall_64 <= caller < do_syscall_64 + vmlinux.symbol_size("do_syscall_64"), (
        f"x64_sys_call was called from {caller:#x} ({vmlinux.names_at(caller) or 'no symbol'}), "
        f"expected from do_syscall_64 {do_syscall_64:#x}"
    )
    switch = vmlinux.symbol("x64_sys_call")
    # The switch calls the handler, or (a tail call) jumps to it with do_syscall_64's return address.
    via = (switch <= handler_caller < switch + vmlinux.symbol_size("x64_sys_call")) or handler_caller == caller
    assert reached == handler and via, (
        f"with the same pt_regs the CPU reached {reached:#x} returning to {handler_caller:#x}; expected "
        f"__x64_sys_write {handler:#x} called from x64_sys_call or jumped to from it (return to {caller:#x})"
    )


@pytest.mark.parametrize(
    "name, argv, args", [("write", ("syscall_irl",), {0: 1, 2: 12}), ("dup", ("rawsys", f"{DUP}", "1"), {0: 1})]
)
def test_the_traced_call_runs_its_handler(name, argv, args, syscall_trace, kernel):
    trace = (
        syscall_trace.payload(argv[0], *argv[1:], nr=name, args=args)
        if name == "dup"
        else syscall_trace.payload("syscall_irl", nr=name, args=args)
    )
    rip, handler = trace["handler"]["rip"], kernel.vmlinux.symbol(f"__x64_sys_{name}")
    assert rip == handler, f"the CPU ran {rip:#x} for {name}, expected __x64_sys_{name} {handler:#x}"


def test_the_handler_runs_under_do_syscall_64_and_the_entry(syscall_trace, kernel):
    frames = list(syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})["handler"].backtrace)
    # Inlined helpers (do_syscall_x64 in 6.1) may stand between: the order is what counts.
    assert "do_syscall_64" in frames[1:], f"backtrace {frames}: expected do_syscall_64 below the handler"
    below = frames[frames.index("do_syscall_64") + 1 :]
    if not kernel.dwarf:
        # The kernel is built without .eh_frame: its call frame information is DWARF's
        # .debug_frame, and without it GDB guesses do_syscall_64's frame from its prologue.
        pytest.skip(f"vmlinux has no DWARF (.debug_frame): GDB cannot unwind past do_syscall_64 (got {below})")
    assert any(f.startswith("entry_SYSCALL_64") for f in below), (
        f"backtrace {frames}: expected entry_SYSCALL_64 below do_syscall_64"
    )


def _nr_syscalls(kernel):
    """NR_syscalls: the slots of sys_call_table, from its size in the symbol table (not from
    the bound the entry code checks)."""
    if not kernel.vmlinux.has_symbol("sys_call_table"):
        pytest.skip(f"kernel {kernel.release} has no sys_call_table symbol to size NR_syscalls by")
    return kernel.vmlinux.symbol_size("sys_call_table") // 8


# Numbers no handler may take: far out, the first one past the table (an off-by-one bound
# check would index sys_call_table[NR_syscalls] or fall into x64_sys_call's last case),
# and -1 (all ones; the kernel leaves pt_regs->ax at -ENOSYS for it). The x32 bit is not set.
OUT_OF_RANGE = {"4095": lambda kernel: 4095, "NR_syscalls": _nr_syscalls, "all-ones": lambda kernel: -1}


@pytest.mark.parametrize("which", list(OUT_OF_RANGE))
def test_out_of_range_number_returns_enosys(which, syscall_trace, kernel):
    nr = OUT_OF_RANGE[which](kernel)
    trace = syscall_trace.payload("rawsys", f"{nr}", nr=nr)
    assert not trace["handler"].taken, f"a handler ran for nr {nr}: {trace['handler'].line()}"
    rax = x86.to_signed(trace["user_return"]["rax"])
    assert rax == -x86.ENOSYS, f"user RAX after syscall {nr} is {rax}, expected -ENOSYS ({-x86.ENOSYS})"
    assert trace.output == f"{-x86.ENOSYS}\n", f"the payload printed {trace.output!r}"


def test_the_last_number_of_the_table_runs_its_handler(syscall_trace, kernel):
    nr = _nr_syscalls(kernel) - 1
    # Its handler as the kernel image's table names it; with all arguments 0 it does nothing
    # (set_mempolicy_home_node in 6.1, mseal in 6.12: an empty range).
    trace = syscall_trace.payload("rawsys", f"{nr}", nr=nr, args={0: 0, 1: 0})
    handler = kernel.vmlinux.symbol(trace.handler)
    assert trace["handler"].taken and trace["handler"]["rip"] == handler, (
        f"syscall {nr}, the last slot of sys_call_table, should run {trace.handler} {handler:#x}\n{trace}"
    )
    assert trace["user_return"]["rax"] == trace["handler_return"]["rax"], f"user RAX is not the handler's\n{trace}"


def test_user_sees_the_handlers_return_value(syscall_trace):
    trace = syscall_trace.payload("rawsys", f"{DUP}", "1", nr="dup", args={0: 1})
    returned, seen = trace["handler_return"]["rax"], trace["user_return"]["rax"]
    assert seen == returned, f"user RAX {seen:#x}, expected the handler's return value {returned:#x}"
    assert x86.to_signed(returned) >= 3, f"dup(1) returned {x86.to_signed(returned)}, expected a new fd >= 3"
    assert trace.output == f"{returned}\n", f"the payload printed {trace.output!r}, expected {returned}"


def _dup_through(guest, nr):
    """What rawsys NR 1 returned: dup(1)'s new fd where NR reaches dup, else an error."""
    result = guest.run(f"{guest.payload('rawsys').guest_path} {nr:#x} 1")
    assert result.status == 0, f"rawsys {nr:#x} 1 exited {result.status}: {result.output}"
    return int(result.output)


def test_the_upper_half_of_rax_is_ignored(guest, kernel):
    """A kernel that compares all of RAX with NR_syscalls (or dispatches on it) refuses
    UPPER_HALF | dup; since 5.14 the number is EAX as an int, so dup runs."""
    if kernel.version_tuple < INT_NR_SINCE:
        pytest.skip(f"kernel {kernel.release} predates the int syscall number (5.14): RAX's upper half counts")
    nr = UPPER_HALF | DUP
    returned = _dup_through(guest, nr)
    assert returned >= 3, (
        f"syscall RAX {nr:#x} (EAX {DUP}, dup) returned {returned}, expected dup(1)'s new fd (>= 3): "
        f"the kernel must ignore RAX's upper half"
    )


def _x32_enabled(kernel, gdb):
    vmlinux = kernel.vmlinux
    if not vmlinux.has_symbol("x32_sys_call") and not vmlinux.has_symbol("x32_sys_call_table"):
        return False  # built without CONFIG_X86_X32_ABI
    # Debian's kernels build the x32 ABI behind a static key, off unless booted with
    # syscall.x32=y: its struct static_key starts with the int `enabled`.
    if vmlinux.has_symbol("x32_enabled_skey"):
        return int.from_bytes(gdb.read_memory(vmlinux.symbol("x32_enabled_skey"), 4), "little", signed=True) > 0
    return True


def test_the_x32_bit_without_the_x32_abi_returns_enosys(guest, kernel, gdb):
    """__X32_SYSCALL_BIT | dup from 64-bit code: without the x32 ABI no table takes it
    (before 5.x the kernel masked the bit off and ran the 64-bit dup)."""
    if _x32_enabled(kernel, gdb):
        pytest.skip(f"kernel {kernel.release} has the x32 ABI enabled: the x32 bit selects its table")
    nr = X32_SYSCALL_BIT | DUP
    returned = _dup_through(guest, nr)
    assert returned == -x86.ENOSYS, (
        f"syscall {nr:#x} (the x32 bit with dup) returned {returned}, expected -ENOSYS ({-x86.ENOSYS}): "
        f"the kernel has no x32 ABI to run it"
    )


SKIPPED = 0x1234  # what skipsys's tracer leaves in RAX when it skips the syscall


def test_a_syscall_a_tracer_skips_returns_what_the_tracer_set(guest):
    """A ptrace tracer sets orig_rax = -1 and rax at the syscall-entry stop (how debuggers
    and seccomp tracers skip a syscall): do_syscall_64 must run nothing for nr == -1, not
    even sys_ni_syscall, whose -ENOSYS would overwrite the tracer's value."""
    result = guest.run(guest.payload("skipsys").guest_path)
    assert result.status == 0, f"skipsys exited {result.status} (3: ptrace failed, 4: no syscall stop): {result.output}"
    returned = int(result.output)
    assert returned == SKIPPED, (
        f"the skipped syscall returned {returned}, expected the tracer's {SKIPPED} (orig_rax = -1 runs no handler)"
    )

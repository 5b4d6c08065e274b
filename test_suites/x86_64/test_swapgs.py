"""swapgs: GS base and kernel GS base exchange on entry, and back on exit, so the kernel
runs with its per-CPU base and user mode gets its own GS base back."""

WRITE_ARGS = {0: 1, 2: 12}  # write(1, "syscall_irl\n", 12)


def test_entry_swapgs_exchanges_the_gs_bases(syscall_trace, gdb, kernel):
    trace = syscall_trace.payload("syscall_irl", nr="write", args=WRITE_ARGS)
    before, after = trace["entry"], trace["after_swapgs"]
    assert (after["gs_base"], after["k_gs_base"]) == (before["k_gs_base"], before["gs_base"]), (
        f"across the entry swapgs: gs_base {before['gs_base']:#x} -> {after['gs_base']:#x}, k_gs_base "
        f"{before['k_gs_base']:#x} -> {after['k_gs_base']:#x}; expected the two to exchange"
    )
    # The kernel's GS base is CPU 0's per-CPU area: __per_cpu_offset[0], read from guest memory.
    per_cpu = int.from_bytes(gdb.read_memory(kernel.vmlinux.symbol("__per_cpu_offset"), 8), "little")
    assert after["gs_base"] == per_cpu, (
        f"kernel gs_base {after['gs_base']:#x}, expected __per_cpu_offset[0] {per_cpu:#x}"
    )


def test_exit_swapgs_gives_user_mode_its_gs_base_back(syscall_trace):
    trace = syscall_trace.payload("syscall_irl", nr="write", args=WRITE_ARGS)
    exit_before, exit_after, user = trace["exit_swapgs"], trace["sysretq"], trace["user"]
    assert exit_before.taken and exit_after.taken, "the kernel did not leave by the SYSRET path"
    assert (exit_after["gs_base"], exit_after["k_gs_base"]) == (exit_before["k_gs_base"], exit_before["gs_base"]), (
        f"across the exit swapgs: gs_base {exit_before['gs_base']:#x} -> {exit_after['gs_base']:#x}, k_gs_base "
        f"{exit_before['k_gs_base']:#x} -> {exit_after['k_gs_base']:#x}; expected the two to exchange"
    )
    assert trace["user_return"]["gs_base"] == user["gs_base"], (
        f"user gs_base after the syscall {trace['user_return']['gs_base']:#x}, expected {user['gs_base']:#x}"
    )

"""MSR_LSTAR: SYSCALL jumps to entry_SYSCALL_64, as the CPU shows and as the guest reads
the MSR; MSR_STAR holds the kernel CS and the user selector base."""

from pytest_syscall_irl import x86

WRITE_ARGS = {0: 1, 2: 12}  # write(1, "syscall_irl\n", 12)


def test_syscall_lands_on_entry_syscall_64(syscall_trace, syscall_entry):
    trace = syscall_trace.payload("syscall_irl", nr="write", args=WRITE_ARGS)
    rip = trace["entry"]["rip"]
    assert rip == syscall_entry, (
        f"RIP after the user syscall instruction is {rip:#x}, expected entry_SYSCALL_64 {syscall_entry:#x} "
        f"(vmlinux symbol table)"
    )


def test_lstar_msr_is_entry_syscall_64(read_msr, syscall_entry):
    lstar = read_msr(x86.MSR_LSTAR)
    assert lstar == syscall_entry, (
        f"MSR_LSTAR read in the guest is {lstar:#x}, expected entry_SYSCALL_64 {syscall_entry:#x}"
    )


def test_star_selectors(read_msr, syscall_entry):
    kernel_cs, user_base = x86.star_selectors(read_msr(x86.MSR_STAR))
    assert kernel_cs == x86.KERNEL_CS, (
        f"STAR[47:32] (SYSCALL CS) is {kernel_cs:#x}, expected __KERNEL_CS {x86.KERNEL_CS:#x}"
    )
    assert user_base == x86.USER32_CS, (
        f"STAR[63:48] (SYSRET base) is {user_base:#x}, expected __USER32_CS {x86.USER32_CS:#x}"
    )
    # SYSRET to 64-bit mode loads CS = base + 16 and SS = base + 8 (with RPL 3).
    assert (user_base + 16) | 3 == x86.USER_CS and (user_base + 8) | 3 == x86.USER_DS


EFER_SCE = 1 << 0  # SYSCALL enable: without it SYSCALL is #UD


def test_efer_enables_syscall(gdb):
    efer = gdb.registers(["efer"])["efer"]
    assert efer & EFER_SCE, f"EFER is {efer:#x}: SCE (bit 0) is clear, SYSCALL would raise #UD"

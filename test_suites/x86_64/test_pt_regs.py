"""struct pt_regs as do_syscall_64 receives it, against what user mode had loaded.

The payload makes one raw syscall with six distinct argument values, so a swapped or
dropped argument register cannot pass."""

import pytest

from pytest_syscall_irl import x86

SIX = {0: 0x1111, 1: 0x2222, 2: 0x3333, 3: 0x4444, 4: 0x5555, 5: 0x6666}
GETPPID = x86.SYSCALL_NUMBERS["getppid"]


@pytest.fixture
def trace(syscall_trace):
    argv = [f"{GETPPID}", *(f"{SIX[i]:#x}" for i in range(6))]
    return syscall_trace.payload("rawsys", *argv, nr=GETPPID, args=SIX)


def test_orig_ax_is_the_syscall_number(trace, kernel):
    pt_regs, stage = trace["do_syscall_64"].pt_regs, trace["do_syscall_64"]
    assert pt_regs["orig_ax"] == GETPPID, f"pt_regs->orig_ax {pt_regs['orig_ax']:#x}, expected nr {GETPPID:#x}"
    nr_register = x86.do_syscall_64_args(kernel.version_tuple)[1]
    nr = stage[nr_register] & 0xFFFFFFFF  # int nr
    assert nr == GETPPID, f"do_syscall_64's nr argument (${nr_register}) is {nr:#x}, expected {GETPPID:#x}"


def test_arguments_are_the_values_user_mode_loaded(trace):
    pt_regs, user = trace["do_syscall_64"].pt_regs, trace["user"]
    for index, (field, register) in enumerate(zip(x86.PT_REGS_ARGS, x86.SYSCALL_ARG_REGISTERS)):
        assert user[register] == SIX[index], f"user {register} {user[register]:#x}, payload loaded {SIX[index]:#x}"
        assert pt_regs[field] == SIX[index], (
            f"pt_regs->{field} {pt_regs[field]:#x}, expected argument {index} = {SIX[index]:#x}"
        )


def test_ip_is_the_user_return_address(trace):
    pt_regs, entry, user = trace["do_syscall_64"].pt_regs, trace["entry"], trace["user"]
    after_syscall = user["rip"] + 2  # `syscall` is 0f 05
    assert entry["rcx"] == after_syscall, (
        f"RCX at entry {entry['rcx']:#x}, expected user RIP after syscall {after_syscall:#x}"
    )
    assert pt_regs["ip"] == after_syscall, f"pt_regs->ip {pt_regs['ip']:#x}, expected {after_syscall:#x}"


def test_flags_are_the_user_rflags(trace):
    pt_regs, entry, user = trace["do_syscall_64"].pt_regs, trace["entry"], trace["user"]
    assert entry["r11"] == user["eflags"], f"R11 at entry {entry['r11']:#x}, expected user RFLAGS {user['eflags']:#x}"
    assert pt_regs["flags"] == user["eflags"], (
        f"pt_regs->flags {pt_regs['flags']:#x}, expected user RFLAGS {user['eflags']:#x}"
    )


def test_sp_is_the_user_stack_pointer(trace):
    pt_regs, user = trace["do_syscall_64"].pt_regs, trace["user"]
    assert pt_regs["sp"] == user["rsp"], f"pt_regs->sp {pt_regs['sp']:#x}, expected user RSP {user['rsp']:#x}"


def test_ax_is_enosys_on_entry(trace):
    ax = x86.to_signed(trace["do_syscall_64"].pt_regs["ax"])
    assert ax == -x86.ENOSYS, f"pt_regs->ax {ax}, expected -ENOSYS ({-x86.ENOSYS}) until a handler runs"

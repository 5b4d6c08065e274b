"""Every general register across the syscall: saved in struct pt_regs on the kernel stack
on entry, cleared before the kernel's C code runs (no user value to steer speculation),
and given back to user mode on exit (no kernel value leaks out).

The regsys payload loads twelve distinct 64-bit values into the callee-saved registers
and the six argument registers before its `syscall`, so a register saved to the wrong
slot, left holding a user value, or lost on the way back cannot pass."""

import pytest

from pytest_syscall_irl import x86

GETPPID = x86.SYSCALL_NUMBERS["getppid"]
# Register -> pt_regs field, in the order regsys takes and prints them.
FIELDS = {"rbx": "bx", "rbp": "bp", "r12": "r12", "r13": "r13", "r14": "r14", "r15": "r15",
          "rdi": "di", "rsi": "si", "rdx": "dx", "r10": "r10", "r8": "r8", "r9": "r9"}
LOADED = {register: 0x1111_1111_1111_1111 * (index + 1) for index, register in enumerate(FIELDS)}
# CLEAR_REGS after PUSH_REGS on syscall entry: "x86/entry/64: Clear extra registers
# beyond syscall arguments, to reduce speculation attack surface" (4.16).
CLEARED_SINCE = (4, 16, 0)


@pytest.fixture
def trace(syscall_trace):
    argv = [str(GETPPID), *(f"{LOADED[register]:#x}" for register in FIELDS)]
    args = {index: LOADED[register] for index, register in enumerate(x86.SYSCALL_ARG_REGISTERS)}
    return syscall_trace.payload("regsys", *argv, nr=GETPPID, args=args)


def test_pt_regs_holds_every_user_register(trace):
    user, pt_regs = trace["user"], trace["do_syscall_64"].pt_regs
    for register, field in FIELDS.items():
        assert user[register] == LOADED[register], (
            f"user {register} {user[register]:#x} at the syscall, regsys loaded {LOADED[register]:#x}"
        )
        assert pt_regs[field] == LOADED[register], (
            f"pt_regs->{field} {pt_regs[field]:#x}, expected user {register} {LOADED[register]:#x}"
        )


def test_entry_clears_user_values_before_the_c_code(trace, kernel):
    if kernel.version_tuple < CLEARED_SINCE:
        pytest.skip(f"kernel {kernel.release} predates the register clearing on syscall entry (4.16)")
    stage, user = trace["do_syscall_64"], trace["user"]
    user_values = {**{register: LOADED[register] for register in FIELDS},
                   "rcx": user["rip"] + 2, "r11": user["eflags"]}  # what SYSCALL itself put there
    # do_syscall_64(regs, nr) takes its arguments in two of the registers; the rest must
    # hold nothing user mode chose.
    arguments = set(x86.do_syscall_64_args(kernel.version_tuple))
    leaked = {register: f"{stage[register]:#x}" for register in ("rbx", "rbp", "rcx", "rdx", "rsi", "rdi", "r8",
                                                                  "r9", "r10", "r11", "r12", "r13", "r14", "r15")
              if register not in arguments and stage[register] in user_values.values()}
    assert not leaked, f"at do_syscall_64 these registers still hold user values: {leaked}"


def test_user_registers_survive_the_syscall(trace):
    back = trace["user_return"]
    lost = {register: f"{back[register]:#x} (was {LOADED[register]:#x})" for register in FIELDS
            if back[register] != LOADED[register]}
    assert not lost, f"back in user mode these registers changed across the syscall: {lost}"
    # And as the program itself saw them after the syscall.
    printed = [int(line, 16) for line in trace.output.split()[1:]]
    assert printed == list(LOADED.values()), f"regsys printed {[hex(v) for v in printed]} after the syscall"


def test_pt_regs_is_at_the_top_of_the_kernel_stack(trace, kernel):
    vmlinux = kernel.vmlinux
    # THREAD_SIZE: the span of the init task's stack in the symbol table.
    thread_size = x86.thread_size(vmlinux.symbols)
    stage = trace["do_syscall_64"]
    regs = stage[x86.do_syscall_64_args(kernel.version_tuple)[0]]
    assert stage["rsp"] == regs - 8, (
        f"RSP at do_syscall_64 is {stage['rsp']:#x}, expected regs {regs:#x} - 8 (pt_regs right above the "
        f"return address of the entry's call)"
    )
    padding = x86.top_of_stack_padding(vmlinux.has_symbol("asm_fred_entrypoint_user"))
    top = regs + x86.PT_REGS_SIZE + padding
    assert top % thread_size == 0, (
        f"pt_regs at {regs:#x} ends at {top:#x}, not at the top of a {thread_size:#x}-byte kernel stack"
    )

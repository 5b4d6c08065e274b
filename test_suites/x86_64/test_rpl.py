"""CS RPL: 0 at every kernel stage of the syscall path, 3 in user mode before and after;
pt_regs keeps the user selectors."""

from pytest_syscall_irl import x86
from pytest_syscall_irl import KERNEL_STAGES, USER_STAGES

WRITE_ARGS = {0: 1, 2: 12}  # write(1, "syscall_irl\n", 12)


def test_cs_rpl_is_0_in_the_kernel(syscall_trace):
    trace = syscall_trace.payload("syscall_irl", nr="write", args=WRITE_ARGS)
    for stage in trace.taken(KERNEL_STAGES):
        cs = stage["cs"]
        assert x86.rpl(cs) == 0, f"{stage.name}: CS {cs:#x} has RPL {x86.rpl(cs)}, expected 0 (kernel mode)"


def test_cs_rpl_is_3_in_user_mode_before_and_after(syscall_trace):
    trace = syscall_trace.payload("syscall_irl", nr="write", args=WRITE_ARGS)
    for stage in trace.taken(USER_STAGES):
        cs = stage["cs"]
        assert x86.rpl(cs) == 3, f"{stage.name}: CS {cs:#x} has RPL {x86.rpl(cs)}, expected 3 (user mode)"
    assert trace["user"].taken and trace["user_return"].taken


def test_pt_regs_holds_the_user_selectors(syscall_trace):
    pt_regs = syscall_trace.payload("syscall_irl", nr="write", args=WRITE_ARGS)["do_syscall_64"].pt_regs
    assert pt_regs["cs"] == x86.USER_CS, f"pt_regs->cs {pt_regs['cs']:#x}, expected __USER_CS {x86.USER_CS:#x}"
    assert pt_regs["ss"] == x86.USER_DS, f"pt_regs->ss {pt_regs['ss']:#x}, expected __USER_DS {x86.USER_DS:#x}"

"""A user's own invariants on the roads into the kernel, written against the README's
API with guest programs of their own (payloads/ beside this file, given to pytest with
--syscall-irl-payloads). The project runs them as the integration tests of the trace instrument
(tests/test_user_suite.py)."""

from __future__ import annotations

import time

import pytest

from pytest_syscall_irl import x86
from pytest_syscall_irl import Kernel, SyscallTrace, SyscallTracer, TraceError

TF = x86.flags("TF")
# QEMU's default TCG CPU (qemu64) is AMD-style: a 32-bit `syscall` is accepted, `sysenter`
# is not (#UD in compatibility mode); with an Intel vendor string it is the other way round.
INTEL = "qemu64,vendor=GenuineIntel"


def _pid(trace: SyscallTrace) -> int:
    assert trace.output is not None and trace.status == 0, f"{trace.command}: {trace.status} {trace.output!r}"
    return int(trace.output.split()[-1])


def test_int80_from_a_64_bit_program(syscall_trace: SyscallTracer, kernel: Kernel) -> None:
    trace = syscall_trace.payload("my_int80", nr="getpid")
    assert (trace.road.name, trace.selector.nr) == ("int80", 20), trace
    assert trace.entry == trace.road.entry_symbol(kernel.vmlinux), trace
    assert trace.exit == "iret" and trace["iretq"].frame is not None, trace
    assert trace["iretq"].frame["cs"] == x86.USER_CS, trace
    assert trace.dispatch.pt_regs is not None and trace.dispatch.pt_regs["cs"] == x86.USER_CS, trace
    assert trace["user_return"]["rax"] & 0xFFFFFFFF == _pid(trace), trace


@pytest.mark.parametrize("way, road", [("int80", "int80"), ("syscall", "syscall32")])
def test_a_32_bit_program_on_an_amd_style_cpu(way: str, road: str, syscall_trace: SyscallTracer) -> None:
    label = "sirl_int80_insn" if way == "int80" else "sirl_syscall_insn"
    trace = syscall_trace.payload("my_compat", way, nr="getpid", at=label)
    assert (trace.road.name, trace.selector.nr) == (road, 20), trace
    assert trace["user"]["cs"] == x86.USER32_CS, trace
    assert trace.dispatch.pt_regs is not None and trace.dispatch.pt_regs["cs"] == x86.USER32_CS, trace
    assert trace.exit == ("iret" if way == "int80" else "sysretl"), trace
    assert trace["user_return"]["rax"] & 0xFFFFFFFF == _pid(trace), trace


@pytest.mark.syscall_irl_cpu(INTEL)
def test_a_32_bit_sysenter_on_an_intel_style_cpu(syscall_trace: SyscallTracer, kernel: Kernel) -> None:
    trace = syscall_trace.payload("my_compat", "sysenter", nr="getpid", at="sirl_sysenter_insn")
    assert trace.road.name == "sysenter32" and trace.entry == "entry_SYSENTER_compat", trace
    assert trace.exit in ("sysretl", "iret"), trace
    assert trace["user_return"]["rax"] & 0xFFFFFFFF == _pid(trace), trace


def test_read_by_cat_selected_by_its_name(syscall_trace: SyscallTracer) -> None:
    trace = syscall_trace.command("echo syscall_irl | cat", nr="read", args={0: 0}, comm="cat")
    assert trace.task is not None and trace.task.comm == "cat", trace
    assert trace.output == "syscall_irl\n", trace


def test_a_syscall_made_with_tf_set_leaves_by_iret(syscall_trace: SyscallTracer) -> None:
    trace = syscall_trace.payload("tf_syscall", nr="getppid")
    assert trace["user"]["eflags"] & TF, trace
    assert not trace["entry"]["eflags"] & TF, trace
    assert trace.exit == "iret", trace
    frame = trace["iretq"].frame
    assert frame is not None and frame["flags"] & TF and frame["ip"] == trace["user"]["rip"] + 2, trace
    assert trace.output == "trapped\n", f"the program printed {trace.output!r}, expected the single-step trap"


def test_a_selector_that_never_matches_fails_soon_after_the_command(syscall_trace: SyscallTracer) -> None:
    start = time.monotonic()
    with pytest.raises(TraceError, match=r"`true` ended with status 0 before making the selected syscall"):
        syscall_trace.command("true", nr="getppid", comm="no-such-program")
    assert time.monotonic() - start < 10, "the trace waited on after the command had ended"

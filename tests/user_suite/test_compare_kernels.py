"""A user's gate on a change: one test traces the same syscall on the kernel under test and on
a baseline kernel (--syscall-irl-baseline, the kernel before the change) and compares them.
Run with the reference kernel as both, every comparison must hold."""

from __future__ import annotations

from pytest_syscall_irl import Kernel, SyscallTrace, SyscallTracer


def _path(trace: SyscallTrace) -> list[str]:
    return [stage.name for stage in trace.taken()]


def test_a_write_leaves_the_way_it_left_the_baseline(kernel: Kernel, syscall_trace: SyscallTracer,
                                                     baseline_syscall_trace: SyscallTracer) -> None:
    trace = syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    base_trace = baseline_syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    changed = f"{kernel.release} vs the baseline {baseline_syscall_trace.kernel.release}"
    assert trace.exit == base_trace.exit, f"{changed}: exit {trace.exit}, was {base_trace.exit}\n{trace}\n{base_trace}"
    assert _path(trace) == _path(base_trace), f"{changed}: stages\n{trace}\n--- baseline ---\n{base_trace}"


def test_int80_from_a_64_bit_program_takes_the_baselines_stages(syscall_trace: SyscallTracer,
                                                                baseline_syscall_trace: SyscallTracer) -> None:
    trace = syscall_trace.payload("my_int80", nr="getpid")
    base_trace = baseline_syscall_trace.payload("my_int80", nr="getpid")
    assert (trace.entry, trace.exit) == (base_trace.entry, base_trace.exit), f"{trace}\n--- baseline ---\n{base_trace}"
    assert _path(trace) == _path(base_trace), f"{trace}\n--- baseline ---\n{base_trace}"

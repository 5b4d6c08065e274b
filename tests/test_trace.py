"""The tracer's stepping, against a stand-in for the GDB session."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_syscall_irl.trace import MAX_STEP_ATTEMPTS, SyscallSelector, SyscallTrace, TraceError, _Run


class Stepper:
    """stepi() reports the given addresses in turn."""

    def __init__(self, *addresses: int) -> None:
        self.addresses = list(addresses)
        self.steps = 0

    def stepi(self, timeout: float) -> Any:
        self.steps += 1
        return SimpleNamespace(address=self.addresses.pop(0))

    def registers(self, names: Any) -> dict[str, int]:
        return dict.fromkeys(names, 0)


def _run(gdb: Stepper) -> _Run:
    trace = SyscallTrace("cmd", SyscallSelector(1), "__x64_sys_write")
    return _Run(SimpleNamespace(gdb=gdb, faults={}), trace, time.monotonic() + 60)  # type: ignore[arg-type]


def test_a_step_that_went_nowhere_is_taken_again() -> None:
    gdb = Stepper(0x401000, 0xFFFFFFFF81200080)
    _run(gdb).step_off(0x401000)
    assert gdb.steps == 2


def test_a_step_that_moved_is_taken_once() -> None:
    gdb = Stepper(0xFFFFFFFF81200080)
    _run(gdb).step_off(0x401000)
    assert gdb.steps == 1


def test_an_instruction_that_never_executes_is_an_error() -> None:
    gdb = Stepper(*[0x401000] * MAX_STEP_ATTEMPTS)
    with pytest.raises(TraceError, match=r"instruction at 0x401000 did not execute in 3 steps"):
        _run(gdb).step_off(0x401000)


def test_the_swapgs_step_is_taken_again_when_it_went_nowhere() -> None:
    entry, swapgs, after = 0xFFFFFFFF81200080, 0xFFFFFFFF81200083, 0xFFFFFFFF81200086
    gdb = Stepper(swapgs, swapgs, after)
    run = _run(gdb)
    run.step_past(entry, swapgs, "after_swapgs")
    assert gdb.steps == 3 and run.trace["after_swapgs"].taken


def test_swapgs_never_reached_is_a_stage_not_taken() -> None:
    gdb = Stepper(*[0x1000 + i for i in range(32)])
    run = _run(gdb)
    run.step_past(0x1000, 0xDEAD, "after_swapgs")
    assert not run.trace["after_swapgs"].taken

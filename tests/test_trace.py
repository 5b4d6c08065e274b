"""The tracer's stepping, against a stand-in for the GDB session."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_syscall_irl.gdbmi import Instruction
from pytest_syscall_irl.qemu import MachineConfig
from pytest_syscall_irl.trace import (MAX_STEP_ATTEMPTS, EntryCode, SyscallSelector, SyscallTrace, SyscallTracer,
                                      TraceError, _Run)


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


class Disassembler:
    """disassemble() returns a minimal entry_SYSCALL_64 and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def disassemble(self, where: str) -> list[Instruction]:
        self.calls += 1
        return [Instruction(0x100, "swapgs", where, 0), Instruction(0x1f0, "swapgs", where, 240),
                Instruction(0x200, "sysretq", where, 256)]


def _tracer(gdb: Disassembler, vmlinux: Path, config: MachineConfig) -> SyscallTracer:
    kernel = SimpleNamespace(vmlinux=SimpleNamespace(path=vmlinux, symbol=lambda name: 0x100))
    guest = SimpleNamespace(machine=SimpleNamespace(config=config), console=None)
    return SyscallTracer(gdb, kernel, guest)  # type: ignore[arg-type]


def test_entry_code_is_disassembled_once_per_kernel_and_machine(tmp_path: Path) -> None:
    gdb = Disassembler()
    config = MachineConfig(kernel=tmp_path / "bzImage", initrd=tmp_path / "initrd", append="console=ttyS0")
    restored = replace(config, incoming=tmp_path / "state")
    assert _tracer(gdb, tmp_path / "vmlinux", config).entry_code == EntryCode(0x100, 0x100, 0x1F0, 0x200)
    _tracer(gdb, tmp_path / "vmlinux", restored).entry_code  # restored from a guest of that config
    assert gdb.calls == 1
    # Other boot arguments patch the entry code otherwise (pti=on), and so may another vmlinux.
    _tracer(gdb, tmp_path / "vmlinux", replace(config, append="console=ttyS0 pti=on")).entry_code
    _tracer(gdb, tmp_path / "other-vmlinux", config).entry_code
    assert gdb.calls == 3

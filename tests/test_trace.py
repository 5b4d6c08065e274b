"""The tracer's walk, against typed stand-ins for the debugger and the guest (the
protocols of trace/protocols.py): stepping, the entry code cache, failing fast when the
command ends first, cleanup that never replaces the real error, a walk built from what
it needs, without a tracer, and counts and traces that check their command's status."""

from __future__ import annotations

import itertools
import re
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl.machine.console import CommandResult
from pytest_syscall_irl.core.errors import FailureClass, GdbError, SyscallIrlError, classify
from pytest_syscall_irl.machine.gdbmi import GdbTimeoutError
from pytest_syscall_irl.machine.mi_records import Breakpoint, Frame, Instruction, StopEvent
from pytest_syscall_irl.lab.image import Payload
from pytest_syscall_irl.machine.qemu import MachineConfig
from pytest_syscall_irl.arch.base import EntryCode
from pytest_syscall_irl.arch.x86_64 import X86_64
from pytest_syscall_irl.arch.x86_64.roads import INT80, ROADS, SYSCALL64
from pytest_syscall_irl.trace.facts import FactsCache, KernelFacts
from pytest_syscall_irl.plugin.options import BY_NAME
from pytest_syscall_irl.trace.model import (Stage, StageNotRecorded, SyscallSelector, SyscallTrace, TraceError,
                                            stage_names)
from pytest_syscall_irl.trace.tracer import CommandFailed, ExpectedStatus, SyscallTracer
from pytest_syscall_irl.trace.walk import MAX_STEP_ATTEMPTS, Walk


def _stop(address: int, breakpoint: int | None = None) -> StopEvent:
    return StopEvent("breakpoint-hit", breakpoint, address, None, 1, None, {})


@dataclass
class FakeDebugger:
    """A debugger whose target never stops unless told: stepi() reports *steps* in turn."""

    steps: list[int] = field(default_factory=list)
    instructions: list[Instruction] = field(default_factory=list)
    fail_delete: bool = False
    state: str = "stopped"
    stepped: int = 0
    disassembled: int = 0
    inserted: list[str] = field(default_factory=list)

    def registers(self, names: Sequence[str] | None = None, timeout: float = 0) -> dict[str, int]:
        return dict.fromkeys(names or ("rip",), 0)

    def read_memory(self, address: int, size: int, timeout: float = 0) -> bytes:
        return bytes(size)

    def evaluate(self, expression: str, timeout: float = 0) -> str:
        return "0"

    def break_insert(self, location: str, condition: str | None = None, hardware: bool = False,
                     temporary: bool = False, timeout: float = 0) -> Breakpoint:
        self.inserted.append(location)
        return Breakpoint(len(self.inserted), "breakpoint", None, None, condition, temporary, (), {})

    def delete_breakpoint(self, number: int, timeout: float = 0) -> None:
        pass

    def delete_breakpoints(self, timeout: float = 0) -> None:
        if self.fail_delete and self.state == "running":
            raise GdbError("GDB rejected '-break-delete': Cannot execute this command while the target is running")

    def resume(self, timeout: float = 0) -> None:
        self.state = "running"

    def wait_for_stop(self, timeout: float = 0) -> StopEvent:
        time.sleep(min(timeout, 0.01))
        raise GdbTimeoutError(f"target did not stop within {timeout:g} s")

    def stepi(self, timeout: float = 0) -> StopEvent:
        self.stepped += 1
        return _stop(self.steps.pop(0))

    def interrupt(self, timeout: float = 0) -> StopEvent:
        self.state = "stopped"
        return _stop(0)

    def disassemble(self, start: str | int, end: int | None = None, timeout: float = 0) -> list[Instruction]:
        self.disassembled += 1
        return self.instructions

    def backtrace(self, timeout: float = 0) -> list[Frame]:
        return []

    def member_offsets(self, aggregate: str, timeout: float = 0) -> dict[str, int]:
        return {}


@dataclass
class FakeCommand:
    """A guest command that ends after *polls* polls, with *result*."""

    command: str
    result: CommandResult
    polls: int = 0

    def wait(self, timeout: float | None = None) -> CommandResult:
        return self.result

    def poll(self) -> CommandResult | None:
        self.polls -= 1
        return self.result if self.polls < 0 else None


@dataclass
class FakeConsole:
    status: int = 0
    output: str = "done\n"
    polls: int = 2

    def start(self, command: str) -> FakeCommand:
        return FakeCommand(command, CommandResult(command, self.output, self.status), self.polls)


@dataclass
class FakeGuest:
    config: MachineConfig
    console: FakeConsole = field(default_factory=FakeConsole)

    def payload(self, name: str) -> Payload:
        raise AssertionError("no payloads here")

    @contextmanager
    def running(self) -> Iterator[None]:
        yield


class FakeVmlinux:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.release = "6.1.0"

    def symbol(self, name: str) -> int:
        return 0x100

    def has_symbol(self, name: str) -> bool:
        return name in ("sys_call_table", "current_task", "entry_SYSCALL_64")

    def symbol_size(self, name: str) -> int:
        return 8

    def read(self, address: int, size: int) -> bytes:
        return bytes(size)

    def names_at(self, address: int) -> list[str]:
        return []


@dataclass
class FakeKernel:
    vmlinux: Any
    dwarf: bool = False
    version_tuple: tuple[int, int, int] = (6, 1, 0)


def _config(tmp_path: Path, append: str = "console=ttyS0") -> MachineConfig:
    return MachineConfig(kernel=tmp_path / "bzImage", initrd=tmp_path / "initrd", append=append)


def _tracer(gdb: FakeDebugger, tmp_path: Path, config: MachineConfig | None = None,
            console: FakeConsole | None = None, vmlinux: str = "vmlinux") -> SyscallTracer:
    guest = FakeGuest(config or _config(tmp_path), console or FakeConsole())
    return SyscallTracer(gdb, FakeKernel(FakeVmlinux(tmp_path / vmlinux)), guest, X86_64)  # type: ignore[arg-type]


def _walk(gdb: FakeDebugger, tmp_path: Path) -> Walk:
    """A walk made of its parts alone: no tracer is involved."""
    kernel = FakeKernel(FakeVmlinux(tmp_path / "vmlinux"))
    facts = KernelFacts(gdb, kernel, FakeGuest(_config(tmp_path)), X86_64, FactsCache())  # type: ignore[arg-type]
    trace = SyscallTrace("cmd", SyscallSelector(1), SYSCALL64, "__x64_sys_write")
    return Walk(gdb, facts, X86_64, {}, trace, time.monotonic() + 60)


def test_a_step_that_went_nowhere_is_taken_again(tmp_path: Path) -> None:
    gdb = FakeDebugger(steps=[0x401000, 0xFFFFFFFF81200080])
    _walk(gdb, tmp_path).step_off(0x401000)
    assert gdb.stepped == 2


def test_a_step_that_moved_is_taken_once(tmp_path: Path) -> None:
    gdb = FakeDebugger(steps=[0xFFFFFFFF81200080])
    assert _walk(gdb, tmp_path).step_off(0x401000).address == 0xFFFFFFFF81200080
    assert gdb.stepped == 1


def test_an_instruction_that_never_executes_is_an_error(tmp_path: Path) -> None:
    gdb = FakeDebugger(steps=[0x401000] * MAX_STEP_ATTEMPTS)
    with pytest.raises(TraceError, match=r"instruction at 0x401000 did not execute in 3 steps"):
        _walk(gdb, tmp_path).step_off(0x401000)


def test_the_swapgs_step_is_taken_again_when_it_went_nowhere(tmp_path: Path) -> None:
    entry, swapgs, after = 0xFFFFFFFF81200080, 0xFFFFFFFF81200083, 0xFFFFFFFF81200086
    gdb = FakeDebugger(steps=[swapgs, swapgs, after])
    walk = _walk(gdb, tmp_path)
    walk.step_past(entry, swapgs, "after_swapgs")
    assert gdb.stepped == 3 and walk.trace["after_swapgs"].taken


def test_swapgs_never_reached_is_a_stage_not_taken(tmp_path: Path) -> None:
    gdb = FakeDebugger(steps=[0x1000 + i for i in range(32)])
    walk = _walk(gdb, tmp_path)
    walk.step_past(0x1000, 0xDEAD, "after_swapgs")
    assert not walk.trace["after_swapgs"].taken


ENTRY = [Instruction(0x100, "swapgs", "entry_SYSCALL_64", 0), Instruction(0x1F0, "swapgs", "entry_SYSCALL_64", 240),
         Instruction(0x200, "sysretq", "entry_SYSCALL_64", 256)]


def test_entry_code_is_disassembled_once_per_kernel_and_machine(tmp_path: Path) -> None:
    gdb = FakeDebugger(instructions=ENTRY)
    config = _config(tmp_path)
    entry = "entry_SYSCALL_64"
    assert _tracer(gdb, tmp_path, config).facts.entry_code(entry) == EntryCode(0x100, 0x100, 0x1F0, 0x200)
    # Restored from that config: the same code.
    _tracer(gdb, tmp_path, replace(config, incoming=tmp_path / "state")).facts.entry_code(entry)
    assert gdb.disassembled == 1
    # Other boot arguments patch the entry code otherwise (pti=on), and so may another vmlinux.
    _tracer(gdb, tmp_path, _config(tmp_path, "console=ttyS0 pti=on")).facts.entry_code(entry)
    _tracer(gdb, tmp_path, config, vmlinux="other-vmlinux").facts.entry_code(entry)
    assert gdb.disassembled == 3


def test_a_fault_runs_before_its_stage_is_recorded_and_is_undone_after(tmp_path: Path) -> None:
    events: list[str] = []

    class Recording(FakeDebugger):
        def registers(self, names: Sequence[str] | None = None, timeout: float = 0) -> dict[str, int]:
            events.append("recorded")
            return super().registers(names, timeout)

    def fault(gdb: Any) -> Any:
        events.append("fault")
        return lambda: events.append("undone")

    walk = _walk(Recording(), tmp_path)
    walk.faults = {"entry": [fault]}
    walk.record("entry")
    walk.record("user")
    assert events == ["fault", "recorded", "undone", "recorded"]


def test_a_stage_line_shows_the_architectures_summary(tmp_path: Path) -> None:
    stage = _walk(FakeDebugger(), tmp_path).record("entry", note="here")
    assert stage.line() == ("entry               rip=0x0000000000000000 cs=0x00 ss=0x00 rflags=0x000000 rax=0x0 "
                            "rcx=0x0 r11=0x0 rsp=0x0 gs_base=0x0 k_gs_base=0x0 cr3=0x0  [here]")


def test_a_command_that_ends_first_fails_the_trace_at_once_saying_why(tmp_path: Path) -> None:
    console = FakeConsole(status=3, output="no such file\n", polls=2)
    tracer = _tracer(FakeDebugger(), tmp_path, console=console)
    start = time.monotonic()
    with pytest.raises(TraceError) as raised:
        tracer.command("cat /nonexistent", nr=0, args={0: 7}, timeout=60)
    assert time.monotonic() - start < 5  # not the 60 s timeout
    message = str(raised.value)
    assert "`cat /nonexistent` ended with status 3 before making the selected syscall" in message
    assert "nr=0 arg0=0x7" in message and "no such file" in message


def test_cleanup_never_replaces_the_error_being_raised(tmp_path: Path) -> None:
    gdb = FakeDebugger(fail_delete=True)
    tracer = _tracer(gdb, tmp_path, console=FakeConsole(polls=10**9))
    with pytest.raises(TraceError, match="did not finish in time"):
        tracer.command("sleep 100", nr=1, timeout=0.3)
    assert gdb.state == "stopped"  # interrupted before its breakpoints were deleted


def test_syscall_errors_are_syscall_irl_errors() -> None:
    assert issubclass(TraceError, SyscallIrlError)


def test_a_count_that_times_out_keeps_its_error_through_cleanup(tmp_path: Path) -> None:
    gdb = FakeDebugger(fail_delete=True)
    tracer = _tracer(gdb, tmp_path, console=FakeConsole(polls=10**9))
    with pytest.raises(TraceError, match="did not end within"):
        tracer.count("sleep 100", 0xFFFFFFFF81000000, timeout=0.3)
    assert gdb.state == "stopped"


# --- a command's status: counted or traced, it must end as its caller expects ----------

def test_a_count_of_a_command_that_could_not_run_fails_with_its_status_and_output(tmp_path: Path) -> None:
    console = FakeConsole(status=127, output="sh: /payloads/nope: not found\n")
    with pytest.raises(CommandFailed) as raised:
        _tracer(FakeDebugger(), tmp_path, console=console).count("/payloads/nope", 0xFFFFFFFF81000000)
    message = str(raised.value)
    assert "`/payloads/nope` exited with status 127 (not found), expected 0" in message
    assert "sh: /payloads/nope: not found" in message
    assert classify(raised.value) is FailureClass.HARNESS  # not the kernel's: nothing ran


def test_count_syscalls_checks_the_status_too(tmp_path: Path) -> None:
    tracer = _tracer(FakeDebugger(instructions=ENTRY), tmp_path, console=FakeConsole(status=127))
    with pytest.raises(CommandFailed, match="status 127"):
        tracer.count_syscalls("/payloads/nope", nr=228)


@pytest.mark.parametrize("status, expected", [(139, 139), (139, (0, 139)), (0, (0, 139)), (3, None)])
def test_a_status_the_caller_expects_is_counted(tmp_path: Path, status: int, expected: ExpectedStatus) -> None:
    tracer = _tracer(FakeDebugger(), tmp_path, console=FakeConsole(status=status))
    hits, result = tracer.count("/payloads/vsyscall", 0xFFFFFFFF81000000, expect_status=expected)
    assert (hits, result.status) == (0, status)


def test_a_status_the_caller_did_not_expect_is_a_violation(tmp_path: Path) -> None:
    tracer = _tracer(FakeDebugger(), tmp_path, console=FakeConsole(status=139, output=""))
    with pytest.raises(CommandFailed, match=r"status 139 \(killed by signal 11\), expected 0 or 4") as raised:
        tracer.count("/payloads/sysret_check cs32", 0xFFFFFFFF81000000, expect_status=(0, 4))
    assert classify(raised.value) is FailureClass.VIOLATION  # it ran, under the kernel under test


def _walk_that_takes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Walk, "arm_first", lambda self, user_address: None)
    monkeypatch.setattr(Walk, "walk", lambda self, from_user: None)


def test_a_trace_whose_command_fails_afterwards_fails_and_is_kept(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _walk_that_takes_nothing(monkeypatch)
    tracer = _tracer(FakeDebugger(), tmp_path, console=FakeConsole(status=1, output="write returned 3\n"))
    with pytest.raises(CommandFailed, match="status 1, expected 0") as raised:
        tracer.command("/payloads/syscall_irl", nr=1)
    assert "write returned 3" in str(raised.value)
    assert [trace.status for trace in tracer.traces] == [1]  # the report still shows the trace


def test_a_trace_may_accept_any_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _walk_that_takes_nothing(monkeypatch)
    tracer = _tracer(FakeDebugger(), tmp_path, console=FakeConsole(status=4))
    assert tracer.command("/payloads/sysret_check cs32", nr=15, expect_status=None).status == 4
    assert tracer.command("/payloads/sysret_check cs32", nr=15, expect_status=4).status == 4


# ---- what a person writing invariants reads: the missing stage's message and the docs ----

ROOT = Path(__file__).resolve().parent.parent
TRACE_API = ROOT / "docs" / "trace-api.md"


def _int80_trace() -> SyscallTrace:
    trace = SyscallTrace("/payloads/int80 20", SyscallSelector(20), INT80, "__ia32_sys_getpid")
    for name in ("user", "entry", "do_int80_emulation"):
        trace.stages[name] = Stage(name, True)
    trace.stages["after_swapgs"] = Stage("after_swapgs", False, note="the swap is in error_entry")
    return trace


def test_a_stage_off_the_road_says_so_and_lists_the_roads_stages() -> None:
    with pytest.raises(KeyError) as raised:
        _int80_trace()["sysretq"]
    assert isinstance(raised.value, StageNotRecorded) and isinstance(raised.value, TraceError)
    assert str(raised.value) == (
        "stage 'sysretq' is not on the int80 road (its stages: user, entry, after_swapgs, do_int80_emulation or "
        "do_int80_syscall_32, handler, ksys, handler_return, dispatch_return, iret_path, iretq, user_return); "
        "a stage of the road not taken is in the trace and says why in its note "
        "(trace['after_swapgs'].note == 'the swap is in error_entry')")


def test_a_stage_on_the_road_not_recorded_says_where_the_walk_ended() -> None:
    with pytest.raises(StageNotRecorded, match=r"^stage 'iretq' of the int80 road was not recorded: the walk ended "
                                               r"before it, at after_swapgs; recorded: user, entry, do_int80"):
        _int80_trace()["iretq"]


def test_the_c_entry_this_kernel_lacks_points_at_trace_dispatch() -> None:
    trace = _int80_trace()
    with pytest.raises(StageNotRecorded, match=r"this kernel's C entry is do_int80_emulation \(trace\.dispatch\)"):
        trace["do_int80_syscall_32"]
    assert trace.dispatch.name == "do_int80_emulation"


def test_a_stage_lookup_hides_its_frame_from_the_traceback() -> None:
    # pytest drops frames whose locals hold a true __tracebackhide__: the test's line leads.
    with pytest.raises(StageNotRecorded) as raised:
        _int80_trace()["sysretq"]
    assert [entry.frame.code.name for entry in raised.traceback.filter(raised)] == [
        "test_a_stage_lookup_hides_its_frame_from_the_traceback"]


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table under *heading* in docs/trace-api.md, cells without backticks."""
    text = TRACE_API.read_text().split(heading, 1)[1]
    lines = itertools.dropwhile(lambda line: not line.startswith("|"), (line.strip() for line in text.splitlines()))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines))[2:]  # past the head and rule
    return [[cell.strip().replace("`", "").replace("\\|", "|") for cell in line.strip("|").split(" | ")]
            for line in table]


def test_the_docs_list_each_roads_stages_as_the_code_has_them() -> None:
    assert {road: stages for road, stages in _table("### Each road's stages")} == {
        road.name: stage_names(road) for road in ROADS.values()}


def test_the_docs_give_sirl32_calls_way_numbers_as_the_header_has_them() -> None:
    header = (ROOT / "guest" / "payloads" / "sirl32.h").read_text()
    enum = re.search(r"enum sirl32_way \{(.*?)\};", header, re.S)
    assert enum is not None
    ways = {name: value for name, value in re.findall(r"(SIRL32_\w+) = (\d+)", enum.group(1))}
    assert {name: way for way, name, _ in _table("The way numbers (`enum sirl32_way`)")} == ways


def test_the_docs_signal_statuses_are_128_plus_the_signal() -> None:
    for status, means, _ in _table("### Exit statuses"):
        found = re.fullmatch(r"128 \+ (SIG\w+) \((\d+)\)", means)
        if found:
            assert int(status) == 128 + signal.Signals[found.group(1)] == 128 + int(found.group(2)), means
    assert ["133", "128 + SIGTRAP (5)"] in [row[:2] for row in _table("### Exit statuses")]


def test_rawsys_prints_as_the_docs_say() -> None:
    assert 'printf("%ld\\n", ret);' in (ROOT / "guest" / "payloads" / "rawsys.c").read_text()
    assert "signed decimal and a newline" in next(row[2] for row in _table("## The built-in payloads")
                                                  if row[0] == "rawsys")


def test_the_payload_directory_key_takes_several_as_its_docs_say() -> None:
    assert BY_NAME["payloads"].repeat  # the code: several directories
    readme = (ROOT / "README.md").read_text().splitlines()
    readme_row = next(line for line in readme if "`syscall_irl_payloads`" in line)
    assert "list several in the ini key" in readme_row
    assert "list several in the ini key" in " ".join(BY_NAME["payloads"].help.split())
    assert "list several in the ini key `syscall_irl_payloads`" in " ".join(TRACE_API.read_text().split())

"""Telling a process without DWARF (a vmlinux with symbols only, `objcopy --strip-debug`,
as distributions ship them): by the code mapped at a static payload's address, then by its
page-table root (CR3) or, in kernel state, its task pointer; and a syscall argument that
points to a string. Unit tests with fakes; the integration test runs the conformance suite
on the reference kernel with its vmlinux stripped, and allows only the skips whose reason
is really missing DWARF."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_syscall_irl.arch.x86_64.roads import IA32
from pytest_syscall_irl.arch.x86_64.roads import X86_64 as X86_64_ABI
from pytest_syscall_irl.arch.x86_64 import X86_64
from pytest_syscall_irl.arch.x86_64 import tasks
from pytest_syscall_irl.core import shipped
from pytest_syscall_irl.core.cache import CacheEntry, cache_dir
from pytest_syscall_irl.core.errors import GdbError
from pytest_syscall_irl.core.integrity import file_digest
from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.machine.console import CommandResult
from pytest_syscall_irl.machine.gdbmi import GdbTimeoutError
from pytest_syscall_irl.machine.mi_records import Breakpoint, StopEvent
from pytest_syscall_irl.machine.qemu import MachineConfig
from pytest_syscall_irl.trace.model import SyscallSelector, points_to
from pytest_syscall_irl.trace.tracer import MAIN_CODE_BYTES, SyscallTracer

MAIN = 0x401030
CODE = bytes(range(1, MAIN_CODE_BYTES + 1))  # the payload's code from its main on
OTHER = bytes(MAIN_CODE_BYTES)  # another static program's code at the same address
CURRENT_TASK = 0x1AC00
KERNEL_GS = 0xFFFF88801F000000
USER_GS = 0x7F0000001000


# --- conditions ------------------------------------------------------------------------------

def test_the_page_table_root_ignores_the_pcid() -> None:
    assert tasks.page_table_condition(0x1234_5000 | 0x7) == "($cr3 & 0xffffffffff000) == 0x12345000"


def test_the_code_condition_reads_whole_words_only() -> None:
    condition = tasks.code_condition(0x401030, bytes(range(1, 12)))  # 11 bytes: one word is read
    assert condition == "*(unsigned long *)0x401030 == 0x807060504030201"


def test_code_shorter_than_a_word_is_refused() -> None:
    with pytest.raises(ValueError, match="need at least 8"):
        tasks.code_condition(0x401030, b"\x90")


def test_a_string_argument_is_read_up_to_its_nul_and_no_further() -> None:
    condition = points_to("$rdi", "/bin/sh")  # 7 bytes and the NUL: one word
    assert condition == f"*(unsigned long *)($rdi + 0) == {int.from_bytes(b'/bin/sh', 'little'):#x}"
    widths = re.findall(r"\*\(unsigned (\w+) \*\)\(\$rdi \+ (\d+)\)", points_to("$rdi", "/payloads/x"))
    assert widths == [("long", "0"), ("int", "8")]  # 11 bytes and the NUL


def test_a_selector_with_a_string_compares_the_memory_it_points_to() -> None:
    selector = SyscallSelector(59, {0: "/p/x"})
    assert selector.register_condition(X86_64_ABI) == f"$rax == 0x3b && {points_to('$rdi', '/p/x')}"
    assert str(selector) == "nr=59 arg0='/p/x'"


def test_a_compat_string_argument_is_the_low_half_of_its_register() -> None:
    condition = SyscallSelector(11, {0: "/p/x"}).register_condition(IA32)
    assert f"*(unsigned int *)(($rbx & 0xffffffff) + 0) == {int.from_bytes(b'/p/x', 'little'):#x}" in condition
    assert "*(unsigned char *)(($rbx & 0xffffffff) + 4) == 0x0" in condition


# --- the same process, by what the CPU holds -------------------------------------------------

@dataclass
class Target:
    """A stopped target: registers, and memory that fails where none is given."""

    regs: dict[str, int]
    memory: dict[int, bytes] = field(default_factory=dict)

    def registers(self, names: Sequence[str] | None = None, timeout: float = 0) -> dict[str, int]:
        return {name: self.regs[name] for name in names or self.regs}

    def read_memory(self, address: int, size: int, timeout: float = 0) -> bytes:
        if address not in self.memory:
            raise GdbError(f"Cannot access memory at address {address:#x}")
        return self.memory[address][:size]


DO_EXIT = 0xFFFFFFFF81050000


class Symbols:
    path = Path("vmlinux")

    def __init__(self, *names: str) -> None:
        self.symbols = {"current_task": CURRENT_TASK, **{name: DO_EXIT for name in names}}

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols

    def symbol(self, name: str) -> int:
        return self.symbols[name]


def _running(task: int, gs: str = "$gs_base") -> str:
    return f"*(unsigned long *)({gs} + {CURRENT_TASK:#x}) == {task:#x}"


TASK = 0xFFFF8880004D4000
KERNEL_DATA = {KERNEL_GS + CURRENT_TASK: TASK.to_bytes(8, "little")}


def test_before_the_entry_switch_under_pti_the_process_is_its_page_table_root() -> None:
    # PTI: the user CR3 (bit 12 set, a PCID), and the kernel's per-CPU data unmapped.
    target = Target({"gs_base": USER_GS, "k_gs_base": KERNEL_GS, "cr3": 0x2A3F000 | 0x1000 | 0x801})
    this = X86_64.current.same_process(target, cast(Any, Symbols()))
    assert this.here == "($cr3 & 0xffffffffff000) == 0x2a3f000"
    # It exits in kernel state, on the kernel half of its page tables.
    assert this.exiting == "($cr3 & 0xffffffffff000) == 0x2a3e000"


def test_before_the_entry_switch_without_pti_it_exits_as_its_task() -> None:
    target = Target({"gs_base": USER_GS, "k_gs_base": KERNEL_GS, "cr3": 0x2A3F000}, KERNEL_DATA)
    this = X86_64.current.same_process(target, cast(Any, Symbols()))
    assert (this.here, this.exiting) == ("($cr3 & 0xffffffffff000) == 0x2a3f000", _running(TASK))


def test_in_kernel_state_the_process_is_its_task() -> None:
    target = Target({"gs_base": KERNEL_GS, "k_gs_base": USER_GS, "cr3": 0x2A3E000}, KERNEL_DATA)
    this = X86_64.current.same_process(target, cast(Any, Symbols()))
    assert (this.here, this.exiting) == (_running(TASK), _running(TASK))


# --- a count of one payload's process ---------------------------------------------------------

@dataclass
class Hit:
    """A stop at the counted location (at do_exit: *exit*), in an address space holding
    *code* at MAIN."""

    code: bytes | None
    cr3: int = 0x2A3F000
    exit: bool = False


@dataclass
class Gdb:
    """A debugger whose target stops at *hits* in turn, then runs until the command ends."""

    hits: list[Hit]
    conditions: list[str | None] = field(default_factory=list)
    state: str = "stopped"
    now: Hit | None = None
    armed: dict[str, int] = field(default_factory=dict)  # location -> breakpoint number

    def registers(self, names: Sequence[str] | None = None, timeout: float = 0) -> dict[str, int]:
        regs = {"gs_base": USER_GS, "k_gs_base": KERNEL_GS, "cr3": self.now.cr3 if self.now else 0}
        return {name: regs.get(name, 0) for name in names or regs}

    def read_memory(self, address: int, size: int, timeout: float = 0) -> bytes:
        if self.now is None or self.now.code is None or address != MAIN:
            raise GdbError(f"Cannot access memory at address {address:#x}")
        return self.now.code[:size]

    def break_insert(self, location: str, condition: str | None = None, hardware: bool = False,
                     temporary: bool = False, timeout: float = 0) -> Breakpoint:
        self.conditions.append(condition)
        self.armed[location] = len(self.conditions)
        return Breakpoint(len(self.conditions), "breakpoint", None, None, condition, temporary, (), {})

    def delete_breakpoints(self, timeout: float = 0) -> None:
        self.armed.clear()

    def resume(self, timeout: float = 0) -> None:
        self.state = "running"

    def wait_for_stop(self, timeout: float = 0) -> StopEvent:
        if not self.hits:
            time.sleep(min(timeout, 0.01))
            raise GdbTimeoutError("target did not stop")
        self.now, self.state = self.hits.pop(0), "stopped"
        where = f"*{DO_EXIT:#x}" if self.now.exit else "*0xffffffff81000000"
        if where not in self.armed:
            raise AssertionError(f"stopped at {where}, where no breakpoint is: the tracer resumed too soon")
        return StopEvent("breakpoint-hit", self.armed[where], int(where[1:], 0), None, 1, None, {})

    def interrupt(self, timeout: float = 0) -> StopEvent:
        self.state = "stopped"
        return StopEvent("signal-received", None, 0, None, 1, None, {})


@dataclass
class Payload:
    def symbol(self, name: str) -> int:
        assert name == "main"
        return MAIN

    def read(self, address: int, size: int) -> bytes:
        return CODE[:size]


@dataclass
class Command:
    command: str
    polls: int = 3

    def wait(self, timeout: float | None = None) -> CommandResult:
        return CommandResult(self.command, "", 0)

    def poll(self) -> CommandResult | None:
        self.polls -= 1
        return CommandResult(self.command, "", 0) if self.polls < 0 else None


@dataclass
class Guest:
    config: MachineConfig

    @property
    def console(self) -> Guest:
        return self

    def start(self, command: str) -> Command:
        return Command(command)

    def payload(self, name: str) -> Payload:
        return Payload()

    @contextmanager
    def running(self) -> Iterator[None]:
        yield


@dataclass
class Kernel:
    vmlinux: Symbols
    dwarf: bool = False


def _count(gdb: Gdb, tmp_path: Path, vmlinux: Symbols | None = None) -> int:
    guest = Guest(MachineConfig(kernel=tmp_path / "bzImage", initrd=tmp_path / "initrd", append=""))
    kernel = Kernel(vmlinux or Symbols("do_exit"))
    tracer = SyscallTracer(cast(Any, gdb), cast(Any, kernel), cast(Any, guest), X86_64)
    hits, result = tracer.count("/payloads/vdso", 0xFFFFFFFF81000000, "$rax == 0xe4", payload="vdso")
    assert result.status == 0
    return hits


def test_the_first_hit_in_the_payload_names_its_process_by_its_root(tmp_path: Path) -> None:
    gdb = Gdb([Hit(CODE, cr3=0x2A3F000 | 0x3), Hit(CODE), Hit(CODE)])
    assert _count(gdb, tmp_path) == 3
    first, then, exiting = gdb.conditions
    assert first == f"($rax == 0xe4) && ({tasks.code_condition(MAIN, CODE)})"
    assert then == "($rax == 0xe4) && (($cr3 & 0xffffffffff000) == 0x2a3f000)"
    assert exiting == "($cr3 & 0xffffffffff000) == 0x2a3e000"  # the fake maps no kernel data: PTI


def test_nothing_is_counted_once_the_process_exits(tmp_path: Path) -> None:
    # A later process may get the freed root: after do_exit, no breakpoint is left to stop.
    gdb = Gdb([Hit(CODE, cr3=0x2A3F000), Hit(CODE), Hit(CODE, exit=True), Hit(CODE)])
    with pytest.raises(AssertionError, match="no breakpoint is"):
        _count(gdb, tmp_path)
    gdb = Gdb([Hit(CODE, cr3=0x2A3F000), Hit(CODE), Hit(CODE, exit=True)])
    assert _count(gdb, tmp_path) == 2 and gdb.armed == {}


def test_a_kernel_without_do_exit_counts_until_the_command_ends(tmp_path: Path) -> None:
    gdb = Gdb([Hit(CODE), Hit(CODE)])
    assert _count(gdb, tmp_path, Symbols()) == 2
    assert len(gdb.conditions) == 2


def test_a_stop_where_the_code_is_not_the_payloads_is_not_counted(tmp_path: Path) -> None:
    # GDB stops on a condition it cannot evaluate (the code's page unmapped) or on a false
    # read: the tracer reads the code itself before it counts or follows anything.
    gdb = Gdb([Hit(None), Hit(OTHER), Hit(CODE)])
    assert _count(gdb, tmp_path) == 1
    assert len(gdb.conditions) == 3  # the gate, then the process's and its exit's


def test_a_payload_that_never_made_the_call_counts_zero(tmp_path: Path) -> None:
    gdb = Gdb([])
    assert _count(gdb, tmp_path) == 0
    assert len(gdb.conditions) == 1


# --- the suite on a vmlinux without DWARF ------------------------------------------------------

# The skips a symbols-only vmlinux may cause, by test file: each one's reason is DWARF that
# is really missing (checked against the full vmlinux, where neither skips).
ALLOWED_SKIPS = {
    ("test_dispatch.py", "vmlinux has no DWARF (.debug_frame): GDB cannot unwind past do_syscall_64"),
    ("test_write_args.py", "vmlinux has no DWARF: the writer's pid and comm are fields of struct task_struct"),
}
SKIPPED = re.compile(r"^SKIPPED \[(\d+)\] (?:\S+/)?([\w.]+):\d+: (.*)$", re.M)


def _stripped(vmlinux: Path) -> Path:
    """The reference vmlinux with its DWARF removed, made once per vmlinux (by its digest)."""
    if shutil.which("objcopy") is None:
        pytest.fail("objcopy (binutils) is needed to strip the vmlinux; it builds kernels too")
    entry = CacheEntry(cache_dir() / "stripped-vmlinux" / file_digest(vmlinux).hex()[:16], "vmlinux without DWARF")

    def strip(staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        subprocess.run(["objcopy", "--strip-debug", str(vmlinux), str(staging / "vmlinux")], check=True)

    entry.ensure(strip)
    return entry.path / "vmlinux"


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_suite_on_a_vmlinux_without_dwarf_skips_only_what_needs_dwarf(pytester: pytest.Pytester) -> None:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    vmlinux = _stripped(kernel.parent / "vmlinux")
    result = pytester.run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-n", "2",
                          f"--kernel={kernel}", f"--syscall-irl-vmlinux={vmlinux}", str(shipped.SUITES_DIR),
                          timeout=800)
    out = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert result.ret == pytest.ExitCode.OK and set(outcomes) <= {"passed", "skipped"}, out
    skips = {(name, reason) for _, name, reason in SKIPPED.findall(out)}
    allowed = {(name, reason) for name, reason in skips
               if any(name == n and reason.startswith(r) for n, r in ALLOWED_SKIPS)}
    assert skips == allowed and len(skips) == len(ALLOWED_SKIPS), f"skips {sorted(skips)}:\n{out}"
    assert sum(int(n) for n, _, _ in SKIPPED.findall(out)) == outcomes.get("skipped", 0) == len(ALLOWED_SKIPS), out


ONE_PROCESS = '''
import pytest


@pytest.mark.parametrize("pti", [
    pytest.param(False), pytest.param(True, marks=pytest.mark.syscall_irl_boot_args("pti=on"))])
def test_one_process_of_several_runs_of_a_payload(guest, syscall_trace, pti):
    assert ("pti" in guest.run("cat /proc/cpuinfo").output.split()) == pti
    program = guest.payload("syscall_irl").guest_path
    # Each run writes "syscall_irl\\n" once; later runs may get the page-table root of an
    # earlier one, freed at its exit: only the first process is counted.
    writes, _ = syscall_trace.count_syscalls("; ".join([program] * 6), nr="write", args={0: 1, 2: 12})
    assert writes == 6
    ours, _ = syscall_trace.count_syscalls("; ".join([program] * 6), nr="write", payload="syscall_irl")
    assert ours == 1
    vsyscall = guest.payload("vsyscall").guest_path
    emulated, _ = syscall_trace.count("; ".join([vsyscall] * 4), "emulate_vsyscall", payload="vsyscall")
    assert emulated == 1
'''


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_payload_count_follows_one_process_without_dwarf(pytester: pytest.Pytester) -> None:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    pytester.makepyfile(test_one=ONE_PROCESS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--kernel={kernel}",
                                           f"--syscall-irl-vmlinux={_stripped(kernel.parent / 'vmlinux')}",
                                           timeout=240)
    result.assert_outcomes(passed=2)

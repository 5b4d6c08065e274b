"""The whole path on real parts: the reference kernel in QEMU, GDB over MI, the console.

These run in CI (the root conftest fails them there if they skip).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_syscall_irl.machine.gdbmi import GdbSession
from pytest_syscall_irl.arch.x86_64.registers import X86_64_REGISTERS
from pytest_syscall_irl.lab.guest import Guest
from pytest_syscall_irl.kernel.artifacts import Kernel
from pytest_syscall_irl.report.junit import collect_failed_logs, failed_logs, outcomes
from pytest_syscall_irl.kernel.build import reference_kernel

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def _reference_kernel() -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")


def test_boot_and_echo(guest: Guest) -> None:
    result = guest.run("echo syscall_irl")
    assert (result.output, result.status) == ("syscall_irl\n", 0)
    assert guest.run("cat /proc/sys/kernel/osrelease").output.strip() == guest.console.release


def test_exit_status_and_payload(guest: Guest) -> None:
    assert guest.run("exit 3").status == 3
    result = guest.run(guest.payload("syscall_irl").guest_path)
    assert (result.output, result.status) == ("syscall_irl\n", 0)


def test_stop_at_a_kernel_breakpoint_and_read_registers(kernel: Kernel, guest: Guest, gdb: GdbSession) -> None:
    ksys_write = kernel.vmlinux.symbol("ksys_write")  # from the ELF symbol table, not from GDB
    gdb.break_insert(f"*{ksys_write:#x}", condition="$rdi == 1")
    pending = guest.console.start("echo syscall_irl")
    stop = gdb.continue_until_stop(timeout=30)
    regs = gdb.registers()
    assert stop.reason == "breakpoint-hit" and regs["rip"] == ksys_write
    assert regs["cs"] & 3 == 0 and (regs["rdi"], regs["rdx"]) == (1, 12)
    assert gdb.read_memory(regs["rsi"], regs["rdx"]) == b"syscall_irl\n"
    gdb.delete_breakpoints()
    gdb.resume()
    assert pending.wait(30).output == "syscall_irl\n"


def test_register_views_derived_here_are_what_gdb_prints(kernel: Kernel, guest: Guest, gdb: GdbSession) -> None:
    # Stopped where the registers hold varied values: ksys_write of `echo`, rdx = 12.
    gdb.break_insert(f"*{kernel.vmlinux.symbol('ksys_write'):#x}", condition="$rdi == 1")
    pending = guest.console.start("echo syscall_irl")
    gdb.continue_until_stop(timeout=30)
    gdb.registers()  # the first read learns which registers are views
    derived = gdb.registers()
    printed = gdb.raw_registers()  # every register as GDB formats it, views included
    views = {view.name: int(printed[view.name], 16) for view in X86_64_REGISTERS.views}
    # Derived here, not read from GDB: a session that lost its register file would pass the rest vacuously.
    assert sorted(gdb.derived_views) == sorted(views)
    assert {name: derived[name] for name in views} == views
    assert any(views[name] != 0 for name in ("eax", "ecx", "edx", "esi", "edi", "esp")), views
    gdb.delete_breakpoints()
    gdb.resume()
    assert pending.wait(30).output == "syscall_irl\n"


def test_guest_runs_on_after_the_gdb_test(guest: Guest) -> None:
    # The gdb fixture of the previous test deleted its breakpoints and detached.
    assert guest.run("echo still here").output == "still here\n"


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def test_nothing_listens_on_tcp(guest: Guest, gdb: GdbSession) -> None:
    listening = _listening_tcp_inodes()
    for pid in (guest.machine.pid, gdb.pid, os.getpid()):
        assert pid is not None
        assert not _socket_inodes(pid) & listening, f"process {pid} listens on TCP"
    sockets = guest.machine.sockets.directory
    assert (sockets.stat().st_mode & 0o777) == 0o700
    assert {p.name for p in sockets.iterdir()} == {"console.sock", "channel.in", "channel.out", "gdb.sock", "qmp.sock"}


# --- whole runs in a subprocess ------------------------------------------------------

HOLD = """
import os, pathlib, time

def test_hold(guest, gdb):
    assert guest.run("echo up").output == "up\\n"
    pathlib.Path(os.environ["SIRL_READY"]).with_suffix("." + os.environ.get("PYTEST_XDIST_WORKER", "main")).touch()
    mode = os.environ["SIRL_MODE"]
    if mode == "fail":
        assert False, "failing on purpose"
    if mode == "hold":
        time.sleep(120)
"""

PARALLEL = """
import os, pathlib, time

def _rendezvous(name):
    here = pathlib.Path(os.environ["SIRL_READY"]).with_suffix("." + name)
    here.touch()
    others = [p for p in here.parent.glob(here.stem + ".*") if p != here]
    deadline = time.monotonic() + 60
    while not others and time.monotonic() < deadline:
        time.sleep(0.05)
        others = [p for p in here.parent.glob(here.stem + ".*") if p != here]
    assert others, "the other guest never came up: guests did not run in parallel"

def test_a(fresh_guest):
    _rendezvous("a")
    assert fresh_guest.run("echo a").output == "a\\n"

def test_b(fresh_guest):
    _rendezvous("b")
    assert fresh_guest.run("echo b").output == "b\\n"
"""


def _processes_of(run_id: str) -> list[str]:
    """QEMU and GDB processes whose environment carries *run_id*."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if f"SIRL_RUN_ID={run_id}".encode() in environ.split(b"\0") and ("qemu" in comm or comm == "gdb"):
            found.append(f"{proc.name} {comm}")
    return found


class Run:
    """A pytest run in a subprocess, marked so its QEMU and GDB children can be found."""

    def __init__(self, pytester: pytest.Pytester, source: str, mode: str, *args: str) -> None:
        pytester.makepyfile(test_inner=source)
        self.run_id = uuid.uuid4().hex
        self.ready = pytester.path / "ready"
        env = {**os.environ, "SIRL_RUN_ID": self.run_id, "SIRL_MODE": mode, "SIRL_READY": str(self.ready)}
        env.pop("PYTEST_XDIST_WORKER", None)
        env.pop("PYTEST_ADDOPTS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
            cwd=pytester.path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, count: int = 1, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while len(list(self.ready.parent.glob("ready.*"))) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"inner run not ready: {self.output()}")
            time.sleep(0.05)
        assert _processes_of(self.run_id), "the inner run's QEMU/GDB are not visible"

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=30)[0].decode(errors="replace")

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        out = self.proc.communicate(timeout=timeout)[0].decode(errors="replace")
        return self.proc.returncode, out

    def assert_nothing_left(self) -> None:
        deadline = time.monotonic() + 10
        while (left := _processes_of(self.run_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"left behind: {left}"


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:  # whatever happened, kill the inner run's session
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()


def test_two_guests_boot_in_parallel_under_n_2(pytester: pytest.Pytester, runs: list[Run]) -> None:
    runs.append(run := Run(pytester, PARALLEL, "pass", "-n", "2"))
    code, out = run.finish()
    assert code == 0, out
    assert "2 passed" in out
    run.assert_nothing_left()


@pytest.mark.parametrize(
    "mode, args, expected",
    [
        ("pass", [], 0),
        ("fail", [], 1),
        ("hold", ["--timeout=4"], 1),
        ("hold", ["--timeout=4", "--timeout-method=thread"], 1),
    ],
)
def test_nothing_left_after_a_run_that_ends_by_itself(
    pytester: pytest.Pytester, runs: list[Run], mode: str, args: list[str], expected: int
) -> None:
    runs.append(run := Run(pytester, HOLD, mode, *args))
    code, out = run.finish()
    assert code == expected, out
    run.assert_nothing_left()


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, []), (signal.SIGKILL, []), (signal.SIGKILL, ["-n", "2"])])
def test_nothing_left_after_ctrl_c_or_sigkill(
    pytester: pytest.Pytester, runs: list[Run], sig: signal.Signals, workers: list[str]
) -> None:
    runs.append(run := Run(pytester, HOLD, "hold", *workers))
    run.wait_ready()
    run.proc.send_signal(sig)  # to pytest only, as a terminal's Ctrl-C or a CI runner's kill would
    code, out = run.finish(timeout=60)
    assert code == (2 if sig == signal.SIGINT else -signal.SIGKILL), out
    run.assert_nothing_left()


def test_payloads_travel_in_the_initramfs_when_the_iso_cannot_be_mounted(kernel: Kernel, tmp_path: Path) -> None:
    # A distro kernel builds iso9660/virtio-blk as modules: its guests get the payloads
    # inside the initramfs. Boot the reference kernel that way and run one.
    from pytest_syscall_irl.machine.console import GuestConsole
    from pytest_syscall_irl.lab.image import build_guest_image
    from pytest_syscall_irl.kernel.build import cache_dir
    from pytest_syscall_irl.machine.qemu import MachineConfig, QemuMachine

    image = build_guest_image(cache_dir(), payloads_on_iso=False)
    assert image.iso is None and image.delivery == "initramfs"
    config = MachineConfig(kernel=kernel.bzimage.path, initrd=image.initramfs)
    with QemuMachine(config, tmp_path / "logs") as machine:
        machine.launch()
        console = GuestConsole(machine.sockets.console, channel_path=machine.sockets.channel)
        try:
            console.connect()
            machine.resume()
            assert console.wait_ready(60) == "initramfs"
            result = console.run(image.payload("syscall_irl").guest_path)
            assert (result.output, result.status) == ("syscall_irl\n", 0)
        finally:
            console.close()


FAILS_AFTER_A_TRACE = """
def test_fails(guest, gdb, syscall_trace):
    syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    assert guest.run('echo x').output == 'y\\n'
"""


def test_a_failing_test_reports_its_guest_and_gdb_logs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=FAILS_AFTER_A_TRACE)
    result = pytester.runpytest_subprocess("--junitxml=junit.xml")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # The assertion leads, then the trace, then a few lines of each log with the path of the whole file.
    result.stdout.fnmatch_lines(
        ["E   *AssertionError: assert 'x\\n' == 'y\\n'", "*syscall trace 1*", "syscall trace of x86_64 nr=1*",
         "*guest shared-* commands (tail)*", "(last 5 lines; all of it: */shared-main-1/console.transcript)",
         "$ echo x", "x", "[[]exit 0]",
         "*gdb/mi transcript (tail)*", "(last 5 lines; all of it: */gdb-main.mi.log)"]
    )
    lines = result.outlines
    transcript = next(i for i, line in enumerate(lines) if "gdb/mi transcript (tail)" in line)
    inline = list(itertools.takewhile(lambda line: not line.startswith("---"), lines[transcript + 1:]))
    assert 1 < len(inline) <= 6, inline  # the path and at most five lines of MI
    # The failed testcase's properties name its guest's log directory and the GDB/MI transcript.
    (logs,) = failed_logs(pytester.path / "junit.xml").values()
    assert len(logs) == 2 and all(p.exists() for p in logs), logs
    # Named by the worker (here none: "main"), as a person reading the report can match them.
    assert sorted(p.name for p in logs) == ["gdb-main.mi.log", "shared-main-1"], logs
    assert collect_failed_logs(pytester.path / "junit.xml", pytester.path / "artifacts") == 2
    assert any((pytester.path / "artifacts").rglob("*.mi.log"))


KERNEL_WARNING = """
def test_passes_while_the_kernel_warns(guest, gdb):
    # The debugger makes the idle kernel call __warn(), what WARN_ON() does when it fires
    # (file, line, caller, taint=TAINT_WARN, regs, args): "WARNING: CPU: 0 PID: 0 at ...".
    gdb.evaluate("__warn(0, 0, 0, 9, 0, 0)", timeout=60)
    assert guest.run("echo ok").output == "ok\\n"

def test_the_next_test_is_not_blamed(guest):
    assert guest.run("echo ok").output == "ok\\n"
"""


def test_a_kernel_warning_fails_the_test_that_saw_it_as_a_crash(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=KERNEL_WARNING)
    result = pytester.runpytest_subprocess("--junitxml=junit.xml")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_passes_while_the_kernel_warns*",
                                 "*KernelWarning: the kernel printed 1 WARNING(s) on its log*WARNING: CPU: 0 PID:*"])
    assert outcomes(pytester.path / "junit.xml").crashed == 1


LEAVE_RUNNING = """
SEEN = []

def test_ends_with_the_guest_running(guest, gdb):
    SEEN.append((guest.machine.pid, gdb.pid))
    gdb.resume()

def test_next_test_gets_the_same_guest_and_gdb(guest, gdb):
    assert (guest.machine.pid, gdb.pid) == SEEN[0], "the shared guest or GDB was replaced"
    gdb.resume()
    assert guest.run("echo ok").output == "ok\\n"
"""


def test_a_test_may_end_with_its_guest_running(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=LEAVE_RUNNING)
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


LEAVE_A_COMMAND = """
import time
import pytest_syscall_irl.lab.guest

pytest_syscall_irl.lab.guest.SETTLE_TIMEOUT = 2.0
SEEN = []

def test_leaves_a_command_that_ends(guest, gdb):
    SEEN.append(guest.machine.pid)
    guest.console.start("sleep 0.5; echo late")  # while GDB holds the guest stopped

def test_gets_the_same_guest_ready(guest, gdb):
    assert guest.machine.pid == SEEN[0]
    pending = guest.console.start("echo ok")  # GDB holds the guest: nothing may be left to drain
    gdb.resume()
    assert pending.wait(10).output == "ok\\n"

def test_leaves_a_command_that_never_ends(guest):
    guest.console.start("sleep 1000")

def test_gets_a_new_guest(guest):
    assert guest.machine.pid != SEEN[0]
    assert guest.run("echo ok").output == "ok\\n"
"""


def test_a_command_left_running_is_finished_or_its_guest_replaced(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=LEAVE_A_COMMAND)
    pytester.runpytest_subprocess().assert_outcomes(passed=4)


BOOT_ARGS = """
import pytest

@pytest.mark.syscall_irl_boot_args("sirl_probe=1")
def test_marked(guest, fresh_guest):
    assert "sirl_probe=1" in guest.run("cat /proc/cmdline").output.split()
    assert "sirl_probe=1" in fresh_guest.run("cat /proc/cmdline").output.split()

def test_unmarked(guest):
    assert "sirl_probe=1" not in guest.run("cat /proc/cmdline").output.split()

@pytest.mark.boot_args("quiet kaslr")  # the old name: still read, with a deprecation warning
def test_kaslr(guest):
    pass

@pytest.mark.syscall_irl_boot_args("a", "b")
def test_two_strings(guest):
    pass

@pytest.mark.syscall_irl_cpu("  ")
def test_blank_cpu(fresh_guest):
    pass
"""


def test_boot_args_marker_gives_a_test_guests_of_its_own(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=BOOT_ARGS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2, errors=3)
    result.stdout.re_match_lines([r".*boot_args\('quiet kaslr'\): boot arguments: kaslr: guests boot with nokaslr.*",
                                  r".*@pytest.mark.syscall_irl_boot_args takes one string of kernel arguments.*",
                                  r".*@pytest.mark.syscall_irl_cpu takes one QEMU CPU model.*; got \('  ',\) \{\}"])
    assert result.stdout.str().count("@pytest.mark.boot_args is deprecated and goes in the next release: "
                                     "use @pytest.mark.syscall_irl_boot_args") == 1

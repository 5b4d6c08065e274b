"""One test, two kernels: --syscall-irl-baseline and the `baseline` / `baseline_syscall_trace`
fixtures. A real run at -n 2 compares the reference kernel with itself (it must pass), sees a
difference made on the baseline alone (it must fail), and its workers are measured: processes
alive per worker while a comparing test runs and while a plain test runs after it, and none
left after the run. Usage errors come before any boot; the baseline's pool and its blame are
unit-tested with fakes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_syscall_irl import X86_64
from pytest_syscall_irl.core.errors import (BootFailure, ConfigError, FailureClass, GuestPanic, KernelWarning,
                                            SyscallIrlError, classify)
from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.lab.baseline import BASELINE_SHARED_GUESTS, Baseline, blaming_the_baseline
from pytest_syscall_irl.lab.guest import Lab
from pytest_syscall_irl.lab.pool import MAX_SHARED_GUESTS
from pytest_syscall_irl.lab.variant import PLAIN, GuestVariant

USES_KERNEL = "def test_k(kernel):\n    pass\n"


def _reference() -> Path:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    return kernel


# --- usage: the baseline is checked as the kernel under test is, before anything boots ----------

def _usage_error(pytester: pytest.Pytester, *args: str) -> str:
    pytester.makepyfile(test_x="def test_g(guest):\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    out, err = result.stdout.str(), result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out + err
    assert "Traceback" not in err and "ERROR:" in err and " passed" not in out, out + err
    return err


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_a_missing_baseline_is_a_usage_error_naming_its_option(pytester: pytest.Pytester,
                                                                workers: list[str]) -> None:
    err = _usage_error(pytester, f"--kernel={_reference()}", "--syscall-irl-baseline=nope/bzImage", *workers)
    assert "--syscall-irl-baseline: " in err and "nope/bzImage does not exist" in err, err


def test_a_baseline_option_without_the_baseline_is_a_usage_error(pytester: pytest.Pytester) -> None:
    err = _usage_error(pytester, f"--kernel={_reference()}", "--syscall-irl-baseline-vmlinux=vmlinux")
    assert "--syscall-irl-baseline-vmlinux without --syscall-irl-baseline" in err, err


def test_a_baseline_without_its_vmlinux_asks_for_the_baseline_vmlinux(pytester: pytest.Pytester) -> None:
    (pytester.path / "base").mkdir()
    reference = _reference()
    shutil.copy(reference, pytester.path / "base" / "bzImage")  # its vmlinux is not beside the copy
    err = _usage_error(pytester, f"--kernel={reference}", "--syscall-irl-baseline=base/bzImage")
    assert "no vmlinux found" in err and "--syscall-irl-baseline-vmlinux" in err, err
    assert "pass --syscall-irl-vmlinux" not in err, "the fix named the kernel under test's option"


def test_a_baseline_module_directory_without_modules_dep_is_a_usage_error(pytester: pytest.Pytester) -> None:
    (pytester.path / "mods").mkdir()
    reference = _reference()
    err = _usage_error(pytester, f"--kernel={reference}", f"--syscall-irl-baseline={reference}",
                       "--syscall-irl-baseline-modules=mods")
    assert "mods has no modules.dep" in err and "--syscall-irl-baseline-modules=none" in err, err


def test_a_bad_baseline_in_the_ini_file_names_the_ini_file(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsyscall_irl_baseline = gone/bzImage\n")
    err = _usage_error(pytester, f"--kernel={_reference()}")
    assert "syscall_irl_baseline = gone/bzImage in " in err and "tox.ini" in err, err


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_without_a_baseline_a_comparing_test_errors_as_usage_and_the_rest_runs(pytester: pytest.Pytester,
                                                                               workers: list[str]) -> None:
    pytester.makepyfile(test_x=USES_KERNEL + "def test_cmp(kernel, baseline):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--kernel={_reference()}", *workers)
    out = result.stdout.str()
    result.assert_outcomes(passed=1, errors=1)
    assert "no --syscall-irl-baseline given" in out and "usage (setup)" in out, out


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_each_kernel_under_test_sees_the_one_baseline(pytester: pytest.Pytester, workers: list[str]) -> None:
    reference = _reference()
    pytester.makepyfile(test_x="def test_k(kernel, baseline):\n"
                               f"    assert str(baseline.kernel.bzimage.path) == {str(reference)!r}\n"
                               "    assert baseline.kernel.release == kernel.release\n")
    result = pytester.runpytest_subprocess(f"--kernel={reference}", f"--kernel={reference}",
                                           f"--syscall-irl-baseline={reference}", "-v", "--junitxml=junit.xml",
                                           *workers)
    out = result.stdout.str()
    result.assert_outcomes(passed=2)  # once per kernel under test, not once more for the baseline
    # Once, not once per kernel under test: its paths, its banner, its hashes.
    assert out.count(f"({reference}); vmlinux ") == 1 and "syscall-irl: baseline 6." in out, out
    assert out.count("syscall-irl: baseline Linux version ") == 1, out
    assert out.count("syscall-irl: baseline bzImage sha256 ") == 1, out
    junit = (pytester.path / "junit.xml").read_text()
    assert f'<property name="syscall-irl baseline bzImage" value="{reference}"' in junit, junit
    assert '<property name="syscall-irl baseline bzImage sha256" value="' in junit, junit


# --- the baseline's processes, with fakes: lazily started, bounded, stopped by close --------------

class FakeConsole:
    def __init__(self) -> None:
        self.kernel_warnings: list[str] = []

    def kernel_log_tail(self) -> str:
        return ""


class FakeGuest:
    def __init__(self, name: str) -> None:
        self.name, self.alive, self.console, self.debugger = name, True, FakeConsole(), None

    def is_alive(self) -> bool:
        return self.alive

    def settle(self) -> bool:
        return self.alive

    def shutdown(self) -> None:
        self.alive = False

    def warnings_mark(self) -> int:
        return len(self.console.kernel_warnings)

    def check_no_new_warnings(self, mark: int) -> None:
        if self.console.kernel_warnings[mark:]:
            raise KernelWarning(f"WARNING while {self.name} was in use")


class FakeLab:
    def __init__(self, fail: SyscallIrlError | None = None) -> None:
        self.kernel = object()  # only handed on: `use.kernel`
        self.booted: list[FakeGuest] = []
        self.fail = fail

    def boot(self, name: str, *, variant: GuestVariant) -> FakeGuest:
        if self.fail is not None:
            raise self.fail
        self.booted.append(FakeGuest(name))
        return self.booted[-1]

    def running(self) -> int:
        return sum(guest.alive for guest in self.booted)


def _baseline(lab: FakeLab) -> Baseline:
    return Baseline(cast(Lab, lab), worker="gw1", architecture=X86_64)


def test_a_test_that_reads_only_the_baseline_kernel_starts_nothing() -> None:
    lab = FakeLab()
    use = _baseline(lab).use(PLAIN)
    assert use.kernel is lab.kernel
    use.finish()
    assert lab.booted == []


def test_the_baseline_keeps_one_guest_named_apart_and_close_stops_it() -> None:
    lab = FakeLab()
    baseline = _baseline(lab)
    for variant in [PLAIN, GuestVariant.of("pti=on"), PLAIN]:
        use = baseline.use(variant)
        assert use.guest.is_alive() and use.guest is use.guest
        use.finish()
        assert lab.running() <= BASELINE_SHARED_GUESTS == 1
    assert [guest.name for guest in lab.booted] == ["baseline-gw1-1", "baseline-gw1-2", "baseline-gw1-3"]
    baseline.close()
    assert lab.running() == 0 and baseline.processes == (0, 0)
    baseline.close()  # idempotent
    use = baseline.use(PLAIN)
    assert use.guest.is_alive() and lab.running() == 1, "a use after close starts the baseline again"


def test_a_kernel_warning_of_the_baseline_fails_the_test_but_blames_the_baseline() -> None:
    lab = FakeLab()
    use = _baseline(lab).use(PLAIN)
    use.guest.console.kernel_warnings.append("WARNING: at kernel/fork.c")  # type: ignore[attr-defined]
    with pytest.raises(KernelWarning, match=r"^the baseline kernel \(not the kernel under test\): WARNING") as info:
        use.finish()
    assert classify(info.value) is FailureClass.HARNESS


def test_a_baseline_that_does_not_boot_blames_the_baseline_with_its_chain_kept() -> None:
    panic = GuestPanic("Kernel panic - not syncing")
    crash = BootFailure("the kernel panicked while booting")
    crash.__cause__ = panic
    assert classify(crash) is FailureClass.CRASH  # what it would say of the kernel under test
    use = _baseline(FakeLab(fail=crash)).use(PLAIN)
    with pytest.raises(BootFailure, match="^the baseline kernel .*: the kernel panicked") as info:
        use.guest
    assert classify(info.value) is FailureClass.HARNESS and info.value.__cause__ is panic


@pytest.mark.parametrize("error, kept", [(ConfigError("bad"), FailureClass.USAGE),
                                         (SyscallIrlError("gdb died"), FailureClass.HARNESS)])
def test_an_error_that_blames_no_kernel_is_left_as_it_is(error: SyscallIrlError, kept: FailureClass) -> None:
    use = _baseline(FakeLab(fail=error)).use(PLAIN)
    with pytest.raises(type(error)) as info:
        use.guest
    assert classify(info.value) is kept and not str(info.value).startswith("the baseline")


def test_an_assertion_inside_the_baselines_tracer_is_no_violation_of_the_kernel_under_test() -> None:
    with pytest.raises(SyscallIrlError, match=r"^the baseline kernel .*: AssertionError: stage") as info, \
            blaming_the_baseline():
        raise AssertionError("stage entry not reached")
    assert classify(info.value) is FailureClass.HARNESS and isinstance(info.value.__cause__, AssertionError)


# --- a real run at -n 2: two workers, each comparing the reference kernel with itself ----------

MEASURE = '''
import json, os, pathlib

import pytest


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in pathlib.Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
        except (OSError, IndexError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(proc.name))
    return children


def _alive() -> dict[str, int]:
    """This worker's QEMU (the kernel under test's, the baseline's: its logs are under
    syscall-irl/baseline/) and GDB processes, from /proc, and their resident memory."""
    children, todo = _children(), [os.getpid()]
    counts = {"qemu": 0, "baseline_qemu": 0, "gdb": 0, "rss_mb": 0, "marked": 0}
    mark = ("SIRL_RUN_ID=" + os.environ["SIRL_RUN_ID"]).encode()
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                comm = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
                status = pathlib.Path(f"/proc/{pid}/status").read_text()
                environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
            except OSError:
                continue
            kind = ("baseline_qemu" if b"/syscall-irl/baseline/" in cmdline else "qemu") if "qemu" in comm else \\
                ("gdb" if comm == "gdb" else None)
            if kind:
                counts[kind] += 1
                counts["marked"] += mark in environ  # what the outer test's leftover search finds
                counts["rss_mb"] += int(status.split("VmRSS:")[1].split()[0]) // 1024 if "VmRSS:" in status else 0
    return counts


@pytest.fixture
def processes(request):
    """Record what this worker has alive now, after the test body (the test's fixtures are still set up)."""
    yield
    record = {"test": request.node.name, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), **_alive()}
    with open(os.environ["SIRL_MEASURE"], "a") as out:
        out.write(json.dumps(record) + "\\n")
'''

COMPARE = '''
import os
from pathlib import Path

WRITE = {"nr": "write", "args": {0: 1, 2: 12}}


def test_1_compare(kernel, guest, syscall_trace, baseline, baseline_syscall_trace, processes):
    trace = syscall_trace.payload("syscall_irl", **WRITE)
    base_trace = baseline_syscall_trace.payload("syscall_irl", **WRITE)
    again = syscall_trace.payload("syscall_irl", **WRITE)  # the baseline's trace left this guest as it was
    assert trace.exit == base_trace.exit == again.exit == "sysretq", f"{trace}\\n{base_trace}"
    assert [s.name for s in trace.taken()] == [s.name for s in base_trace.taken()], f"{trace}\\n{base_trace}"
    assert baseline.kernel.bzimage.path == Path(os.environ["SIRL_BASELINE"]) and kernel.release
    assert baseline.guest.gdb_socket != guest.gdb_socket and baseline.guest.name.startswith("baseline-")
    assert baseline.guest.run("echo base").output == "base\\n" and guest.run("echo kut").output == "kut\\n"


def test_2_plain(guest, gdb, processes):
    assert guest.run("echo plain").output == "plain\\n"


def test_3_compare_again(syscall_trace, baseline_syscall_trace, processes):
    trace = syscall_trace.payload("syscall_irl", **WRITE)
    assert trace.exit == baseline_syscall_trace.payload("syscall_irl", **WRITE).exit
'''

DIFFER = '''
from pytest_syscall_irl import x86

WRITE = {"nr": "write", "args": {0: 1, 2: 12}}


def test_a_difference_is_seen(syscall_trace, baseline_syscall_trace):
    def iret_instead(gdb):
        # Back from do_syscall_64, RSP points at pt_regs: RCX != RIP makes the kernel leave by IRET.
        regs = gdb.registers(["rsp"])["rsp"]
        ip = int.from_bytes(gdb.read_memory(regs + x86.PT_REGS_OFFSETS["ip"], 8), "little")
        gdb.write_memory(regs + x86.PT_REGS_OFFSETS["cx"], (ip + 1).to_bytes(8, "little"))

    baseline_syscall_trace.inject("dispatch_return", iret_instead)
    trace = syscall_trace.payload("syscall_irl", **WRITE)
    base_trace = baseline_syscall_trace.payload("syscall_irl", **WRITE)
    assert trace.exit == base_trace.exit, f"kernel under test left by {trace.exit}, the baseline by {base_trace.exit}"


def test_a_command_failing_on_the_baseline(baseline_syscall_trace):
    baseline_syscall_trace.payload("syscall_irl", **WRITE, expect_status=7)  # it exits 0: CommandFailed
'''


def _processes_of(run_id: str) -> list[str]:
    """QEMU and GDB processes whose environment carries *run_id*."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes() if proc.name.isdigit() else b""
            comm = (proc / "comm").read_text().strip() if environ else ""
        except OSError:
            continue
        if f"SIRL_RUN_ID={run_id}".encode() in environ.split(b"\0") and ("qemu" in comm or comm == "gdb"):
            found.append(f"{proc.name} {comm}")
    return found


@dataclass
class Compared:
    """The inner run: its exit status, output, duration, measurements and leftovers."""

    code: int
    out: str
    seconds: float
    measured: list[dict[str, Any]]
    left: list[str]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compared]:
    reference = _reference()
    where = tmp_path_factory.mktemp("compare")
    (where / "conftest.py").write_text(MEASURE)
    (where / "test_a.py").write_text(COMPARE)
    (where / "test_b.py").write_text(COMPARE)
    (where / "test_c.py").write_text(DIFFER)
    run_id, measure = uuid.uuid4().hex, where / "measure.jsonl"
    env = {**os.environ, "SIRL_RUN_ID": run_id, "SIRL_MEASURE": str(measure), "SIRL_BASELINE": str(reference)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    start = time.monotonic()
    # --dist loadfile: each worker takes a file in order, so a plain test follows a comparing one.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                           "-rA", f"--kernel={reference}", f"--syscall-irl-baseline={reference}",
                           f"--rootdir={where}", str(where)],
                          cwd=where, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.monotonic() - start
    deadline = time.monotonic() + 10
    while (left := _processes_of(run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = measure.read_text().splitlines() if measure.exists() else []
    yield Compared(proc.returncode, proc.stdout + proc.stderr, seconds, [json.loads(line) for line in lines], left)


@pytest.mark.integration
def test_the_reference_compared_with_itself_passes_at_n_2(compared: Compared) -> None:
    passed = [f"PASSED test_{file}.py::test_{name}" for file in "ab"
              for name in ("1_compare", "2_plain", "3_compare_again")]
    missing = [line for line in passed if line not in compared.out]
    assert not missing, f"not passed: {missing}\n{compared.out}"
    assert "syscall-irl: baseline " in compared.out, "the header names no baseline"
    print(f"inner run (-n 2, 8 tests, 2 workers): {compared.seconds:.1f} s")


@pytest.mark.integration
def test_a_difference_made_on_the_baseline_alone_fails_the_comparison(compared: Compared) -> None:
    assert compared.code == pytest.ExitCode.TESTS_FAILED, compared.out
    assert "FAILED test_c.py::test_a_difference_is_seen" in compared.out, compared.out
    assert "kernel under test left by sysretq, the baseline by iret" in compared.out, compared.out
    assert "baseline syscall trace 1" in compared.out and "violation (call)" in compared.out, compared.out


@pytest.mark.integration
def test_what_fails_on_the_baseline_is_the_harness_not_the_kernel_under_test(compared: Compared) -> None:
    assert "FAILED test_c.py::test_a_command_failing_on_the_baseline" in compared.out, compared.out
    report = compared.out.split("test_a_command_failing_on_the_baseline ___")[1].split("\n___")[0]
    assert "CommandFailed: the baseline kernel (not the kernel under test): " in report, report
    assert "harness (call)" in report and "violation" not in report, report


@pytest.mark.integration
def test_a_worker_holds_the_baseline_only_while_it_compares(compared: Compared) -> None:
    by_test = {(record["worker"], record["test"]): record for record in compared.measured}
    assert {worker for worker, _ in by_test} == {"gw0", "gw1"}, compared.measured
    for (worker, test), record in by_test.items():
        if "compare" in test:  # one baseline guest and its GDB, beside the kernel under test's
            assert record["baseline_qemu"] == BASELINE_SHARED_GUESTS and record["gdb"] == 2, record
            assert 1 <= record["qemu"] <= MAX_SHARED_GUESTS, record
        else:  # the next test does not compare: the baseline's guest and GDB are gone
            assert record["baseline_qemu"] == 0 and record["gdb"] == 1, record
    print("alive per worker:", *compared.measured, sep="\n  ")


@pytest.mark.integration
def test_no_qemu_or_gdb_outlives_the_run(compared: Compared) -> None:
    # The search for leftovers finds the run's processes by their environment: it did see them all.
    assert compared.measured and all(record["marked"] == record["qemu"] + record["baseline_qemu"] + record["gdb"]
                                     for record in compared.measured), compared.measured
    assert not compared.left, f"left behind: {compared.left}"

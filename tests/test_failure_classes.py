"""Failure classes: one taxonomy (violation, crash, harness, usage) decided where the error is
raised, carried by each failed testcase of the JUnit report, and read back by report/junit.py."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import (BootFailure, ConfigError, ConsoleError, ConsoleTimeout, FailureClass,
                                            GdbError, GuestPanic, QemuError, SyscallIrlError, classify)
from pytest_syscall_irl.machine.console import CommandResult
from pytest_syscall_irl.machine.gdbmi import GdbTimeoutError
from pytest_syscall_irl.report.junit import FAILURE_CLASS_PROPERTY, case_class, failed_logs, outcomes
from pytest_syscall_irl.trace.tracer import CommandFailed

VIOLATION, CRASH, HARNESS, USAGE = (FailureClass.VIOLATION, FailureClass.CRASH, FailureClass.HARNESS,
                                    FailureClass.USAGE)


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise error from exc
    except BaseException as raised:
        return raised


@pytest.mark.parametrize("exc, expected", [
    (AssertionError("FMASK 0x217fd5, expected 0x257fd5"), VIOLATION),
    (GuestPanic("guest kernel crashed"), CRASH),
    (BootFailure("the kernel did not reach the guest's agent"), CRASH),
    (GdbError("GDB rejected '-exec-continue'"), HARNESS),
    (GdbTimeoutError("target did not stop within 30 s"), HARNESS),
    (QemuError("QEMU exited at once"), HARNESS),
    (ConsoleTimeout("no READY within 90 s"), HARNESS),
    (SyscallIrlError("an error nobody classified"), HARNESS),
    (KeyError("rip"), HARNESS),  # our own code broke
    (ConfigError("--accel=fast: one of auto, kvm, tcg"), USAGE),
    (CommandFailed(CommandResult("/payloads/nope", "sh: /payloads/nope: not found\n", 127), 0), HARNESS),
    (CommandFailed(CommandResult("/payloads/vsyscall", "", 139), 0), VIOLATION),
    (CommandFailed(CommandResult("/payloads/syscall_irl", "", 1), 0), VIOLATION),
])
def test_each_error_says_whose_fault_it_is(exc: BaseException, expected: FailureClass) -> None:
    assert classify(exc) is expected


def test_a_crash_under_a_harness_error_is_the_kernels() -> None:
    # GDB lost its target because the kernel panicked under it: the panic is the news.
    assert classify(_raised_from(GdbError("GDB lost the remote target"), GuestPanic("Kernel panic"))) is CRASH
    assert classify(_raised_from(GdbError("GDB lost the remote target"), ConsoleError("closed"))) is HARNESS


def test_only_violations_and_crashes_blame_the_kernel() -> None:
    assert {cls for cls in FailureClass if cls.kernel_at_fault} == {VIOLATION, CRASH}


def test_a_failed_command_says_its_status_and_output() -> None:
    error = CommandFailed(CommandResult("/payloads/nope 3", "sh: /payloads/nope: not found\n", 127), (0, 139))
    assert "`/payloads/nope 3` exited with status 127 (not found), expected 0 or 139" in str(error)
    assert "not found" in (error.log_tail or "") and error.exit_code == 127
    killed = CommandFailed(CommandResult("/payloads/vsyscall", "", 139), 0)
    assert "killed by signal 11" in str(killed)


# --- the plugin writes the class into the JUnit report ----------------------------------

CASES = '''
import pytest
from pytest_syscall_irl.core.errors import BootFailure, ConfigError, GdbError, GuestPanic
from pytest_syscall_irl.machine.console import CommandResult
from pytest_syscall_irl.machine.gdbmi import GdbTimeoutError
from pytest_syscall_irl.trace.tracer import CommandFailed

@pytest.fixture
def unbootable():
    raise BootFailure("the kernel did not reach the guest's agent: guest kernel crashed")

@pytest.fixture
def asserting_fixture():
    assert False, "a fixture's check"

@pytest.fixture
def breaks_at_teardown():
    yield
    raise GdbError("GDB died at teardown")

def test_violation():
    assert 0x217fd5 == 0x257fd5, "FMASK"

def test_pytest_fail():
    pytest.fail("the kernel left by sysretq")

def test_panic():
    raise GuestPanic("guest kernel crashed")

def test_boot(unbootable):
    pass

def test_gdb():
    raise GdbTimeoutError("target did not stop within 30 s")

def test_fixture_assertion(asserting_fixture):
    pass

def test_timeout():
    pytest.fail("Timeout (>5.0s) from pytest-timeout.")

def test_not_found():
    raise CommandFailed(CommandResult("/payloads/nope", "not found", 127), 0)

def test_usage():
    raise ConfigError("boot arguments: kaslr: drop it")

def test_teardown(breaks_at_teardown):
    pass

def test_violation_and_teardown(breaks_at_teardown):
    assert False

def test_passes():
    pass

def test_skips():
    pytest.skip("nothing to check here")
'''
EXPECTED = {"test_violation": "violation", "test_pytest_fail": "violation", "test_panic": "crash",
            "test_boot": "crash", "test_gdb": "harness", "test_fixture_assertion": "harness",
            "test_timeout": "harness", "test_not_found": "harness", "test_usage": "usage",
            "test_teardown": "harness", "test_violation_and_teardown": "violation"}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["in-process", "xdist"])
def test_every_failed_testcase_carries_its_class(pytester: pytest.Pytester, workers: list[str]) -> None:
    pytester.makepyfile(test_cases=CASES)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--junitxml={junit}", *workers)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    cases = {case.get("name"): case for case in ElementTree.parse(junit).getroot().iter("testcase")}
    for name, expected in EXPECTED.items():
        values = [prop.get("value") for prop in cases[name].iter("property")
                  if prop.get("name") == FAILURE_CLASS_PROPERTY]
        assert values and expected in values, (name, values)
        cls = case_class(cases[name])
        assert cls is not None and cls.value == expected, (name, cls)
    found = outcomes(junit)
    # pytest writes test_violation_and_teardown twice (its call failed, then its teardown):
    # both say violation, the worst of the two failures.
    assert (found.violated, found.crashed, found.broken, found.misused) == (4, 2, 5, 1), found
    assert (found.passed, found.skipped) == (1, 1), found
    assert failed_logs(junit) == {}  # the class property is not a log path
    assert "syscall-irl failure class" in result.stdout.str()


def _report(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{textwrap.dedent(body)}</testsuite></testsuites>')
    return path


def test_a_report_without_classes_is_read_from_the_messages(tmp_path: Path) -> None:
    junit = _report(tmp_path, '''
        <testcase classname="t" name="a"><failure message="assert 1 == 2">...</failure></testcase>
        <testcase classname="t" name="b"><failure message="AssertionError: FMASK">...</failure></testcase>
        <testcase classname="t" name="c"><failure message="Failed: the kernel left by sysretq">..</failure></testcase>
        <testcase classname="t" name="d"><failure message="pytest_syscall_irl.core.errors.GuestPanic: x">.</failure>
        </testcase>
        <testcase classname="t" name="e"><failure message="pytest_syscall_irl.core.errors.GdbError: x">.</failure>
        </testcase>
        <testcase classname="t" name="f"><failure message="worker 'gw0' crashed while running 't::f'">.</failure>
        </testcase>
        <testcase classname="t" name="g"><failure message="Failed: Timeout (&gt;5.0s) from pytest-timeout.">.
        </failure></testcase>
        <testcase classname="t" name="h"><error message="failed on setup with AssertionError">.</error></testcase>
        <testcase classname="t" name="i"><failure message="KeyError: 'rip'">.</failure></testcase>
    ''')
    found = outcomes(junit)
    assert (found.violated, found.crashed, found.broken) == (3, 1, 5), found


def test_an_unreadable_report_counts_nothing(tmp_path: Path) -> None:
    assert outcomes(tmp_path / "missing.xml") == outcomes(_report(tmp_path, ""))
    assert outcomes(tmp_path / "missing.xml").kernel_at_fault == 0


class _Console:
    def __init__(self, crash: str | None) -> None:
        self.kernel_crash = crash


class _Guest:
    def __init__(self, crash: str | None) -> None:
        self.console = _Console(crash)


@pytest.mark.parametrize(("crash", "expected"), [
    ("Kernel panic - not syncing: Fatal exception", FailureClass.CRASH),
    (None, FailureClass.HARNESS),
])
def test_a_panic_on_the_kernel_log_makes_a_gdb_error_under_a_trace_a_crash(crash: str | None,
                                                                             expected: FailureClass) -> None:
    # A kernel that panics under a trace exits QEMU (panic=-1): the test sees GDB's "target
    # exited" (the harness's error); only the kernel log of the guest it used says why.
    from pytest_syscall_irl.core.errors import GdbError
    from pytest_syscall_irl.plugin.artifacts import Evidence, failure_class

    used = Evidence()
    used.add_guest(_Guest(crash))  # type: ignore[arg-type]
    call = pytest.CallInfo.from_call(lambda: _raise(GdbError("the target exited while the trace ran")), "call")
    fake = type("Report", (), {"when": "call"})()  # failure_class reads only the phase
    assert failure_class(fake, call, used) is expected  # type: ignore[arg-type]


def _raise(exc: BaseException) -> None:
    raise exc


def test_a_panic_of_the_baseline_kernel_is_not_the_tested_kernels_crash() -> None:
    from pytest_syscall_irl.core.errors import GdbError
    from pytest_syscall_irl.plugin.artifacts import Evidence, failure_class

    used = Evidence()
    used.add_guest(_Guest(None))  # type: ignore[arg-type]
    used.add_guest(_Guest("Kernel panic - not syncing: Fatal exception"), under_test=False)  # type: ignore[arg-type]
    call = pytest.CallInfo.from_call(lambda: _raise(GdbError("the target exited while the trace ran")), "call")
    fake = type("Report", (), {"when": "call"})()
    assert failure_class(fake, call, used) is FailureClass.HARNESS  # type: ignore[arg-type]

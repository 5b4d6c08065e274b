"""Every invariant of the conformance suite can fail: for each, a fault makes the kernel
break it at run time through the debugger, and the suite's own test must report it with
expected and actual values (and the captured trace, where it took one), as a violation
(the failure class of its JUnit testcase)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from invariant_faults import FAULTS

from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.report.junit import outcomes

pytestmark = pytest.mark.integration

SUITE = Path(__file__).resolve().parent.parent / "test_suites" / "x86_64"
FAULT_CONFTEST = '''
import os
import pytest
from invariant_faults import FAULTS

@pytest.fixture(autouse=True)
def _fault(request):
    FAULTS[os.environ["SIRL_FAULT"]].apply(request)
'''


@pytest.fixture(scope="module")
def suite_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    root = tmp_path_factory.mktemp("faulty")
    shutil.copytree(SUITE, root / "x86_64")
    shutil.copy(Path(__file__).with_name("invariant_faults.py"), root)
    (root / "conftest.py").write_text(FAULT_CONFTEST)
    return root


def test_every_suite_test_has_a_fault() -> None:
    suite_tests = {f"{path.name}::{name}" for path in SUITE.glob("test_*.py")
                   for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    faulted = {fault.test.split("[")[0] for fault in FAULTS.values()}
    assert suite_tests - faulted == set(), "invariants without a fault proving they can fail"


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_invariant_reports_the_broken_kernel(name: str, suite_copy: Path, pytester: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fault = FAULTS[name]
    monkeypatch.setenv("SIRL_FAULT", name)
    monkeypatch.setenv("PYTHONPATH", str(suite_copy))
    monkeypatch.chdir(suite_copy)
    junit = pytester.path / "junit.xml"
    result = pytester.run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"x86_64/{fault.test}",
                          f"--junitxml={junit}", timeout=240)
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "1 failed" in out, out
    found = outcomes(junit)  # the kernel's fault, not the harness's: git bisect would call it bad
    assert (found.violated, found.crashed, found.broken) == (1, 0, 0), (found, out)
    assert re.search(fault.message, out), f"failure message does not match {fault.message!r}:\n{out}"
    if fault.traced:  # the report carries the whole captured path
        assert "syscall trace 1" in out and re.search(r"syscall trace of (x86_64|ia32) nr=", out), out

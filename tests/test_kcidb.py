"""--syscall-irl-kcidb: the run as KCIDB I/O data, validated against the latest schema of the
`kcidb-io` package (what `kcidb-submit` checks before it sends anything)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl.core.errors import ConfigError, FailureClass
from pytest_syscall_irl.kernel.artifacts import BzImage
from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.report.identity import BANNER_FROM_VMLINUX, KernelIdentity
from pytest_syscall_irl.report.kcidb import (LOG_EXCERPT_MAX, ORIGIN_PATTERN, SCHEMA_VERSION,
                                             KcidbRun, PhaseReport, check_origin, kcidb_path)

kcidb_io = pytest.importorskip("kcidb_io", reason="kcidb-io is in the dev extras: pip install -e .[dev]")
SCHEMA = kcidb_io.schema.LATEST

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GIT_KERNEL = KernelIdentity("6.1.192", "/src/arch/x86/boot/bzImage", "a" * 64,
                            "Linux version 6.1.192 (me@host) (gcc (Debian 12.2.0) 12.2.0, GNU ld 2.40) #1 SMP",
                            BANNER_FROM_VMLINUX, "c" * 64, "/src/.config", "/src", COMMIT, False)
PLAIN_KERNEL = KernelIdentity("6.12.118", "/k/vmlinuz", "b" * 64, "Linux version 6.12.118 (d@e) (gcc-12) #1 SMP",
                              BANNER_FROM_VMLINUX)
PANIC_LOG = "Kernel panic - not syncing: Attempted to kill init!"


def _phase(nodeid: str, kernel: str, outcome: str = "passed", cls: FailureClass | None = None, when: str = "call",
           message: str = "") -> PhaseReport:
    identity = GIT_KERNEL if kernel == "6.1.192" else PLAIN_KERNEL
    name = nodeid.split("::")[-1].partition("[")[0]
    return PhaseReport(nodeid, kernel, identity, f"syscall_irl.x86_64.test_x.{name}", when, outcome, cls, message,
                       1764950000.0, 0.5)


def _run(phases: list[PhaseReport]) -> dict[str, Any]:
    run = KcidbRun()
    for phase in phases:
        run.add(phase)
    data = run.data("my_ci", "run1")
    SCHEMA.validate(data)
    return data


def _statuses(data: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(test["misc"]["kernel"], test["path"].rpartition(".")[2]): test["status"] for test in data["tests"]}


def test_every_outcome_has_its_status_on_each_of_two_kernels() -> None:
    phases = []
    for kernel in ("6.1.192", "6.12.118"):
        phases += [_phase(f"t.py::test_pass[{kernel}]", kernel),
                   _phase(f"t.py::test_violation[{kernel}]", kernel, "failed", FailureClass.VIOLATION),
                   _phase(f"t.py::test_crash[{kernel}]", kernel, "failed", FailureClass.CRASH, message=PANIC_LOG),
                   _phase(f"t.py::test_harness[{kernel}]", kernel, "failed", FailureClass.HARNESS, when="setup"),
                   _phase(f"t.py::test_usage[{kernel}]", kernel, "failed", FailureClass.USAGE, when="setup"),
                   _phase(f"t.py::test_skip[{kernel}]", kernel, "skipped", when="setup")]
    statuses = _statuses(_run(phases))
    expected = {"pass": "PASS", "violation": "FAIL", "crash": "FAIL", "harness": "ERROR", "usage": "ERROR",
                "skip": "SKIP"}
    assert statuses == {(kernel, f"test_{name}"): status for kernel in ("6.1.192", "6.12.118")
                        for name, status in expected.items()}


def test_a_crash_carries_the_kernels_log() -> None:
    data = _run([_phase("t.py::test_crash", "6.1.192", "failed", FailureClass.CRASH, message=PANIC_LOG)])
    assert PANIC_LOG in data["tests"][0]["log_excerpt"]
    assert data["tests"][0]["misc"]["failure_classes"] == ["crash"]


def test_the_worst_phase_decides_and_its_message_is_kept() -> None:
    # The call's assertion passed judgement on the kernel; the WARNING at teardown is a crash.
    data = _run([_phase("t.py::test_x", "6.1.192"),
                 _phase("t.py::test_x", "6.1.192", "failed", FailureClass.HARNESS, when="call", message="gdb died"),
                 _phase("t.py::test_x", "6.1.192", "failed", FailureClass.CRASH, when="teardown", message=PANIC_LOG)])
    (test,) = data["tests"]
    assert (test["status"], test["log_excerpt"]) == ("FAIL", PANIC_LOG)
    assert test["duration"] == 1.5


def test_an_unclassified_failure_is_the_harnesss() -> None:
    data = _run([_phase("t.py::test_x", "6.1.192", "failed", None, message="worker crashed")])
    assert data["tests"][0]["status"] == "ERROR"


def test_a_long_log_keeps_its_end() -> None:
    log = "x" * LOG_EXCERPT_MAX + PANIC_LOG
    data = _run([_phase("t.py::test_crash", "6.1.192", "failed", FailureClass.CRASH, message=log)])
    excerpt = data["tests"][0]["log_excerpt"]
    assert len(excerpt) == LOG_EXCERPT_MAX and excerpt.endswith(PANIC_LOG)


def test_checkouts_and_builds_name_each_kernel() -> None:
    data = _run([_phase("t.py::test_a[6.1.192]", "6.1.192"), _phase("t.py::test_a[6.12.118]", "6.12.118")])
    checkouts = {checkout["id"]: checkout for checkout in data["checkouts"]}
    assert checkouts[f"my_ci:{COMMIT}"]["git_commit_hash"] == COMMIT
    assert f"my_ci:bzimage-{'b' * 64}" in checkouts  # not built in git: named by its bzImage
    builds = {build["id"]: build for build in data["builds"]}
    git_build = builds[f"my_ci:{'a' * 64}"]
    assert git_build["checkout_id"] == f"my_ci:{COMMIT}"
    assert (git_build["architecture"], git_build["compiler"]) == ("x86_64", "gcc (Debian 12.2.0) 12.2.0, GNU ld 2.40")
    assert git_build["misc"]["config_sha256"] == "c" * 64
    assert {test["build_id"] for test in data["tests"]} == set(builds)


def test_a_dirty_tree_is_not_its_commits_checkout() -> None:
    dirty = KernelIdentity(**{**GIT_KERNEL.as_dict(), "git_dirty": True})  # type: ignore[arg-type]
    run = KcidbRun()
    run.add(PhaseReport("t.py::test_a", "6.1.192", dirty, "syscall_irl.x86_64.t.test_a", "call", "passed"))
    data = run.data("my_ci", "run1")
    SCHEMA.validate(data)
    assert data["checkouts"][0]["id"] == f"my_ci:{COMMIT}+dirty-{'a' * 12}"


def test_paths_map_what_the_schema_forbids() -> None:
    path = kcidb_path("x86_64", "test_vdso", ["TestClock"], "test_calls", "clock_gettime-6.1/x[0]")
    assert path == "syscall_irl.x86_64.test_vdso.TestClock.test_calls.clock_gettime-6_1_x_0_"
    assert SCHEMA.path_re.match(path)


def test_our_copy_of_the_schemas_rules_is_the_schemas() -> None:
    test = SCHEMA.json["$defs"]["test"]["properties"]
    assert ORIGIN_PATTERN.pattern == test["origin"]["pattern"]
    assert LOG_EXCERPT_MAX == test["log_excerpt"]["maxLength"]
    # The latest schema is the one we write: a newer kcidb-io says it is time to look again.
    assert (SCHEMA.major, SCHEMA.minor) == (SCHEMA_VERSION["major"], SCHEMA_VERSION["minor"])


@pytest.mark.parametrize("origin", ["My CI", "ci-lab", "", "ci:x"])
def test_an_origin_kcidb_refuses_is_an_error_naming_the_rule(origin: str) -> None:
    with pytest.raises(ConfigError, match=r"lowercase letters, digits and underscores"):
        check_origin(origin)


def test_a_bad_origin_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("--syscall-irl-kcidb=k.json", "--syscall-irl-kcidb-origin=My CI")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--syscall-irl-kcidb-origin='My CI'" in result.stderr.str()
    assert "e.g. --syscall-irl-kcidb-origin=my_ci" in result.stderr.str()


# --- a real run ----------------------------------------------------------------------------

LOCAL = '''
import pytest

def test_local_violation(kernel):
    assert kernel.release == "0.0", "the release is not 0.0"

def test_local_skip(kernel):
    pytest.skip("nothing to test here")
'''
SUITES = Path(__file__).resolve().parents[1] / "test_suites"


@pytest.mark.integration
def test_a_run_on_two_kernels_under_xdist_writes_valid_kcidb(pytester: pytest.Pytester) -> None:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    pytester.makepyfile(test_local=LOCAL)
    result = pytester.runpytest_subprocess(
        str(SUITES), "test_local.py", f"--kernel={kernel}", f"--kernel={kernel}", "-n", "2", "-p", "no:cacheprovider",
        "-k", "idt_vector_0x80_is_the_int80_entry or test_local", "--syscall-irl-kcidb=out/kcidb.json",
        "--syscall-irl-kcidb-origin=lab_ci")
    result.assert_outcomes(passed=2, failed=2, skipped=2)
    data = json.loads((pytester.path / "out/kcidb.json").read_text())
    SCHEMA.validate(data)
    release = BzImage.read(kernel).release
    statuses = {(test["misc"]["kernel"], test["path"]): test["status"] for test in data["tests"]}
    expected = {"test_compat_entries.test_idt_vector_0x80_is_the_int80_entry": "PASS",
                "test_local.test_local_violation": "FAIL", "test_local.test_local_skip": "SKIP"}
    assert statuses == {(f"{release}@{n}", f"syscall_irl.x86_64.{path}"): status
                        for n in (1, 2) for path, status in expected.items()}
    sha = hashlib.sha256(kernel.read_bytes()).hexdigest()
    # The same bzImage twice is one build (and one checkout): KCIDB names a build by what it is.
    assert [build["id"] for build in data["builds"]] == [f"lab_ci:{sha}"]
    assert {test["build_id"] for test in data["tests"]} == {f"lab_ci:{sha}"}
    violation = next(test for test in data["tests"] if test["path"].endswith("violation"))
    assert "the release is not 0.0" in violation["log_excerpt"]
    written = pytester.path / "out/kcidb.json"
    result.stdout.fnmatch_lines([f"syscall-irl: KCIDB report (6 tests, origin lab_ci) in {written}"])

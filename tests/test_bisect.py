"""`syscall-irl bisect-run` for `git bisect run`: the verdicts, and a real bisection over
Debian's 6.1 source in a throwaway git repository, where one commit breaks the FMASK line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_syscall_irl.cli import bisect
from pytest_syscall_irl.core.errors import KernelError
from pytest_syscall_irl.kernel.build import KernelBuild, reference_kernel

FAILURE = '<testcase classname="t" name="f{n}"><failure message="{message}">...</failure>{props}</testcase>'
ERROR = '<testcase classname="t" name="e{n}"><error message="failed on setup">...</error>{props}</testcase>'
PASSED = '<testcase classname="t" name="p{n}"/>'
SKIPPED = '<testcase classname="t" name="s{n}"><skipped message="no vDSO clocksource"/></testcase>'
ASSERTION = "AssertionError: FMASK 0x217fd5, expected 0x257fd5"
HARNESS = "pytest_syscall_irl.core.errors.GdbError: GDB exited"
GDB_TIMEOUT = "pytest_syscall_irl.machine.mi_transport.GdbTimeoutError: target did not stop within 30 s"
PANIC = "pytest_syscall_irl.core.errors.GuestPanic: Kernel panic - not syncing"


def _props(cls: str | None) -> str:
    return "" if cls is None else f'<properties><property name="syscall-irl failure class" value="{cls}"/></properties>'


def _junit(path: Path, failures: list[str], errors: int | list[str | None], passed: int = 0, skipped: int = 0,
           classes: list[str | None] | None = None) -> Path:
    """A JUnit report; *classes* gives the plugin's class of each failure (None: no property),
    *errors* a count of unclassified errors or the class of each."""
    classes = classes or [None] * len(failures)
    error_classes = [None] * errors if isinstance(errors, int) else errors
    cases = [FAILURE.format(n=n, message=message, props=_props(cls))
             for n, (message, cls) in enumerate(zip(failures, classes))]
    cases += [ERROR.format(n=n, props=_props(cls)) for n, cls in enumerate(error_classes)]
    cases += [PASSED.format(n=n) for n in range(passed)] + [SKIPPED.format(n=n) for n in range(skipped)]
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    return path


@pytest.mark.parametrize("status, failures, errors, expected", [
    (1, [ASSERTION], 0, bisect.BAD),
    (1, [PANIC], 0, bisect.BAD),             # the kernel under test panicked
    (1, [ASSERTION], 2, bisect.BAD),         # an invariant failed: an error elsewhere does not hide it
    (1, [], 2, bisect.SKIP),                 # only errors: the harness or the environment broke
    (1, [HARNESS], 0, bisect.SKIP),          # GDB died inside the test body: still not the kernel's fault
    (1, [GDB_TIMEOUT], 0, bisect.SKIP),      # a GDB timeout in the body, from a report without classes
    (2, [], 0, bisect.INTERRUPTED),          # interrupted: stop bisecting
    (3, [], 0, bisect.SKIP),                 # pytest's internal error: the harness broke
    (4, [], 0, bisect.ABORT),                # usage error (an option, no QEMU or GDB): the same on every commit
    (5, [], 0, bisect.ABORT),                # no tests collected: the selection matches nothing, on any commit
])
def test_verdicts(tmp_path: Path, status: int, failures: list[str], errors: int, expected: int) -> None:
    assert bisect.verdict(status, _junit(tmp_path / "junit.xml", failures, errors, passed=3)).status == expected


@pytest.mark.parametrize("classes, errors, expected", [
    (["violation"], [], bisect.BAD),
    (["crash"], [], bisect.BAD),
    ([], ["crash"], bisect.BAD),             # a kernel that never booted: the guest fixture errored with BootFailure
    (["harness"], ["harness"], bisect.SKIP),
    (["harness"], ["crash"], bisect.BAD),
    (["usage"], [], bisect.ABORT),
    (["usage"], ["harness"], bisect.SKIP),   # a harness failure could be this commit's: do not abort the bisection
])
def test_verdicts_follow_the_failure_class_the_plugin_recorded(tmp_path: Path, classes: list[str | None],
                                                               errors: list[str | None], expected: int) -> None:
    # The messages would say otherwise: the plugin's class wins.
    junit = _junit(tmp_path / "junit.xml", [HARNESS if cls == "violation" else ASSERTION for cls in classes], errors,
                   passed=2, classes=list(classes))
    assert bisect.verdict(1, junit).status == expected


def test_a_run_where_every_test_skipped_is_skipped_not_good(tmp_path: Path) -> None:
    found = bisect.verdict(0, _junit(tmp_path / "junit.xml", [], 0, skipped=5))
    assert found.status == bisect.SKIP and "nothing was checked" in found.reason
    found = bisect.verdict(0, _junit(tmp_path / "junit.xml", [], 0, passed=1, skipped=5))
    assert found.status == bisect.GOOD and "1 test(s) passed, 5 skipped" in found.reason


def test_git_bisect_aborts_on_the_abort_statuses() -> None:
    # git bisect run: 0 good, 1-127 but 125 bad, 125 skip, anything else aborts.
    assert bisect.ABORT > 127 and bisect.INTERRUPTED > 127 and bisect.SKIP == 125 and 0 < bisect.BAD < 125


def test_a_missing_build_tool_aborts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bisect, "missing_build_deps", lambda: ["bison"])
    monkeypatch.setattr(KernelBuild, "build", lambda self: pytest.fail("built without bison"))
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path), [], say=lambda line: None)
    assert result.status == bisect.ABORT and "apt-get install bison" in result.reason


def test_a_build_that_fails_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: KernelBuild) -> Path:
        raise KernelError("kernel build step failed", exit_code=2)

    monkeypatch.setattr(KernelBuild, "build", fail)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pytest ran on a kernel that did not build"))
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path), ["-k", "fmask"], say=lambda line: None)
    assert result.status == bisect.SKIP and "did not build" in result.reason


def test_a_directory_that_is_no_kernel_tree_is_skipped(tmp_path: Path) -> None:
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path), [], say=lambda line: None)
    assert result.status == bisect.SKIP and "not a Linux source tree" in result.reason


# --- a real history -----------------------------------------------------------------

COMMON_C = Path("arch/x86/kernel/cpu/common.c")
FMASK_FLAGS = "X86_EFLAGS_AC|X86_EFLAGS_ID);"


def _replace(path: Path, text: str) -> None:
    # The tree's files are hard links into the cache's extracted source: never write in place.
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def _git(tree: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _commit(tree: Path, message: str, changes: dict[Path, str]) -> str:
    for path, text in changes.items():
        _replace(tree / path, text)
    _git(tree, "add", "-f", *map(str, changes))  # Debian's .gitignore ignores the whole top level
    _git(tree, "commit", "-q", "-m", message)
    return _git(tree, "rev-parse", "HEAD").strip()


def _history(tree: Path) -> dict[str, str]:
    """Four commits over the source; the third drops AC from the SYSCALL flag mask."""
    original = (tree / COMMON_C).read_text()
    assert original.count(FMASK_FLAGS) == 1, "Debian's 6.1 syscall_init no longer has the expected FMASK line"
    _git(tree, "init", "-q")
    _git(tree, "config", "user.email", "bisect@example.invalid")
    _git(tree, "config", "user.name", "bisect test")
    notes = Path("BISECT-NOTES")
    return {
        "base": _commit(tree, "base: Debian linux-source-6.1", {COMMON_C: original, notes: "base\n"}),
        "benign": _commit(tree, "notes: an unrelated change", {notes: "base\nunrelated\n"}),
        "culprit": _commit(tree, "x86/cpu: drop AC from MSR_SYSCALL_MASK",
                           {COMMON_C: original.replace(FMASK_FLAGS, "X86_EFLAGS_ID);")}),
        "later": _commit(tree, "notes: another unrelated change", {notes: "base\nunrelated\nlater\n"}),
    }


@pytest.mark.integration
@pytest.mark.timeout(2400)  # one full tinyconfig build (~3 min on 2 free cores) and two incremental ones
def test_git_bisect_run_names_the_commit_that_breaks_fmask(tmp_path: Path) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build): its extracted source is reused")
    tree = tmp_path / "linux"
    # Hard links: seconds, no copy of 1.5 GB; git checkout and _replace write new files.
    subprocess.run(["cp", "-al", str(KernelBuild().debian_tree), str(tree)], check=True)
    commits = _history(tree)
    _git(tree, "bisect", "start", commits["later"], commits["base"])
    env = {**os.environ, "SYSCALL_IRL_CACHE": str(tmp_path / "cache")}  # this tree's builds stay out of the cache
    syscall_irl = Path(sys.executable).with_name("syscall-irl")
    run = subprocess.run(["git", "bisect", "run", str(syscall_irl), "bisect-run", "-j2", "--",
                          "--pyargs", "pytest_syscall_irl.suites", "-k", "test_fmask", "--syscall-irl-accel=tcg",
                          "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=3000)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert f"{commits['culprit']} is the first bad commit" in out, out[-4000:]
    log = _git(tree, "bisect", "log")
    assert f"# bad: [{commits['culprit']}]" in log and "# good: [" in log, log

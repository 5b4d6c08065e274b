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

FAILURE = '<testcase classname="t" name="f{n}"><failure message="{message}">...</failure></testcase>'
ERROR = '<testcase classname="t" name="e{n}"><error message="failed on setup">...</error></testcase>'
ASSERTION = "AssertionError: FMASK 0x217fd5, expected 0x257fd5"
HARNESS = "pytest_syscall_irl.core.errors.GdbError: GDB exited"
PANIC = "pytest_syscall_irl.core.errors.GuestPanic: Kernel panic - not syncing"


def _junit(path: Path, failures: list[str], errors: int) -> Path:
    cases = [FAILURE.format(n=n, message=message) for n, message in enumerate(failures)]
    cases += [ERROR.format(n=n) for n in range(errors)]
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    return path


@pytest.mark.parametrize("status, failures, errors, expected", [
    (0, [], 0, bisect.GOOD),
    (1, [ASSERTION], 0, bisect.BAD),
    (1, [PANIC], 0, bisect.BAD),             # the kernel under test panicked
    (1, [ASSERTION], 2, bisect.BAD),         # an invariant failed: an error elsewhere does not hide it
    (1, [], 2, bisect.SKIP),                 # only errors: the harness or the environment broke
    (1, [HARNESS], 0, bisect.SKIP),          # GDB died inside the test body: still not the kernel's fault
    (2, [], 0, bisect.ABORT),                # interrupted: stop bisecting
    (4, [], 0, bisect.SKIP),                 # usage error (e.g. a vmlinux without symbols at this commit)
    (5, [], 0, bisect.SKIP),                 # no tests collected
])
def test_verdicts(tmp_path: Path, status: int, failures: list[str], errors: int, expected: int) -> None:
    assert bisect.verdict(status, _junit(tmp_path / "junit.xml", failures, errors)).status == expected


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
                          "--pyargs", "pytest_syscall_irl.suites", "-k", "test_fmask", "--accel=tcg",
                          "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=3000)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert f"{commits['culprit']} is the first bad commit" in out, out[-4000:]
    log = _git(tree, "bisect", "log")
    assert f"# bad: [{commits['culprit']}]" in log and "# good: [" in log, log

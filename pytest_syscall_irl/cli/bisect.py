"""One step of `git bisect run`: build the kernel tree as it is checked out, run pytest on it,
and turn the outcome into the exit status git bisect understands.

    git bisect run syscall-irl bisect-run -- --pyargs pytest_syscall_irl.suites -k fmask

The JUnit report tells each failed test's class (core/errors.py, `FailureClass`):

- 0 (good): tests passed, and none failed or crashed.
- 1 (bad): the kernel is at fault: a test found an invariant violated, or the kernel crashed
  (a panic, Oops or BUG; a kernel that never reached the guest's agent).
- 125 (skip): this commit cannot be judged: the kernel did not build, the harness broke
  (GDB, QEMU, a deadline of ours: the only failures are the harness's), or every selected
  test skipped (nothing was checked). Skipping, not blaming, keeps a broken build or a
  flaky machine from being named the culprit.
- 128 (abort): no commit can be judged: a usage error (pytest exit status 4: a bad option,
  no QEMU or GDB), no test selected (exit status 5), or a tool the build needs is missing.
  git bisect stops on any status above 127, rather than skipping every commit.
- 130 (abort): interrupted.

The tree is built with KernelBuild (tinyconfig + the fragment, out of tree in the cache, so each
step after the first is an incremental build).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import SyscallIrlError
from ..kernel.build import KernelBuild, Progress, missing_build_deps
from ..report.junit import Outcomes, outcomes

GOOD, BAD, SKIP, ABORT, INTERRUPTED = 0, 1, 125, 128, 130
PYTEST_OK, PYTEST_TESTS_FAILED, PYTEST_INTERRUPTED, PYTEST_USAGE_ERROR, PYTEST_NO_TESTS = 0, 1, 2, 4, 5


@dataclass(frozen=True)
class Verdict:
    """The exit status for git bisect, and why."""

    status: int
    reason: str


def _judge_failures(found: Outcomes) -> Verdict:
    """The verdict of a run with failed tests, by their classes (crash and violation first)."""
    if found.kernel_at_fault:
        what = ", ".join(part for part in (f"{found.violated} invariant(s) violated" if found.violated else "",
                                           f"{found.crashed} test(s) saw the kernel crash" if found.crashed else "")
                         if part)
        return Verdict(BAD, f"the kernel is at fault: {what}")
    if found.broken:
        return Verdict(SKIP, f"{found.broken} test(s) broken by the harness and none blamed the kernel")
    if found.misused:
        return Verdict(ABORT, f"{found.misused} test(s) failed on a usage error: no commit can fix that")
    return Verdict(SKIP, "pytest reported failures but its JUnit report names none: cannot judge")


def verdict(pytest_status: int, junit: Path) -> Verdict:
    """Map pytest's exit status and its JUnit report (each failure's class) to git bisect's."""
    if pytest_status == PYTEST_INTERRUPTED:
        return Verdict(INTERRUPTED, "pytest was interrupted")
    if pytest_status == PYTEST_USAGE_ERROR:
        return Verdict(ABORT, "pytest exited with a usage error (an option, the kernel's files, QEMU or GDB): "
                              "no commit can be judged until it is fixed")
    if pytest_status == PYTEST_NO_TESTS:
        return Verdict(ABORT, "no test was collected: the selection matches no test on any commit")
    found = outcomes(junit)
    if pytest_status == PYTEST_OK:
        if found.passed == 0:
            return Verdict(SKIP, f"no test passed ({found.skipped} skipped): nothing was checked on this commit")
        return Verdict(GOOD, f"{found.passed} test(s) passed" + (f", {found.skipped} skipped" if found.skipped else ""))
    if pytest_status == PYTEST_TESTS_FAILED:
        return _judge_failures(found)
    return Verdict(SKIP, f"pytest exited {pytest_status} (an internal error): the harness broke")


def pytest_command(pytest_args: Sequence[str], build: KernelBuild, junit: Path) -> list[str]:
    """pytest on the freshly built kernel; the user's arguments come first, ours last."""
    return [sys.executable, "-m", "pytest", *pytest_args, f"--syscall-irl-kernel={build.bzimage}",
            f"--syscall-irl-vmlinux={build.vmlinux}", f"--junitxml={junit}"]


def bisect_step(build: KernelBuild, pytest_args: Sequence[str], say: Progress) -> Verdict:
    """Build the tree, run pytest on it (its output goes to ours), judge."""
    missing = missing_build_deps()
    if missing:  # the same on every commit: skipping each would end the bisection with no answer
        return Verdict(ABORT, f"building a kernel needs: apt-get install {' '.join(missing)}")
    try:
        build.build()
    except SyscallIrlError as exc:
        return Verdict(SKIP, f"the kernel did not build: {exc.message}")  # a failed make names its log
    junit = build.directory / "bisect-junit.xml"
    junit.unlink(missing_ok=True)
    command = pytest_command(pytest_args, build, junit)
    say("running " + " ".join(command))
    try:
        status = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    except KeyboardInterrupt:
        return Verdict(INTERRUPTED, "interrupted")
    return verdict(status, junit)

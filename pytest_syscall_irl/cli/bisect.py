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
  no QEMU or GDB), no test selected (exit status 5), a tool the build needs is missing, or
  bisect-run's own arguments are wrong (an unknown option, a --base or a fragment outside the
  tree that is not there: cli/main.py gives its usage errors this status, where argparse's 2
  would read as "bad"). git bisect stops on any status above 127, rather than skipping or
  blaming every commit.
- 130 (abort): interrupted.

The tree is built with KernelBuild (tinyconfig + the fragments, out of tree in the cache, so each
step after the first is an incremental build). The JUnit report it judges is the user's own
`--junitxml` if they gave one (kept for them), else one of its own beside the build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import SyscallIrlError
from ..kernel.build import KernelBuild, Progress
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


JUNIT_FLAGS = ("--junitxml", "--junit-xml")  # pytest's two spellings (it allows no abbreviation)


def user_junit(pytest_args: Sequence[str]) -> Path | None:
    """The JUnit report the user asked pytest for (the last --junitxml, as pytest takes it), or None."""
    found: str | None = None
    args = list(pytest_args)
    for index, arg in enumerate(args):
        if arg == "--":  # what follows is file names
            break
        flag, equals, value = arg.partition("=")
        if flag in JUNIT_FLAGS:
            found = value if equals else (args[index + 1] if index + 1 < len(args) else None)
    if not found:
        return None
    # Where pytest writes it: LogXML expands variables and ~, relative to the directory it runs in.
    return Path(os.path.abspath(os.path.expanduser(os.path.expandvars(found))))


def pytest_command(pytest_args: Sequence[str], build: KernelBuild, junit: Path) -> list[str]:
    """pytest on the freshly built kernel; the user's arguments come first, ours last (a
    --junitxml of ours only when the user gave none: argparse keeps the last one)."""
    ours = [] if user_junit(pytest_args) is not None else [f"--junitxml={junit}"]
    return [sys.executable, "-m", "pytest", *pytest_args, f"--syscall-irl-kernel={build.bzimage}",
            f"--syscall-irl-vmlinux={build.vmlinux}", *ours]


def argument_problem(build: KernelBuild) -> str | None:
    """What in bisect-run's own arguments no commit can fix, or None: a --tree that is no
    directory, a fragment outside the tree that cannot be read (one inside may be missing
    from this commit only: the build fails and the commit is skipped)."""
    tree = build.tree if build.tree is not None else Path(".")
    if not tree.is_dir():
        return f"--tree {tree} is not a directory"
    for fragment in build.fragments:
        inside = fragment.resolve().is_relative_to(tree.resolve())
        if not inside and not (fragment.is_file() and os.access(fragment, os.R_OK)):
            return f"cannot read config fragment {fragment} (--config): fix the path"
    return None


def bisect_step(build: KernelBuild, pytest_args: Sequence[str], say: Progress) -> Verdict:
    """Build the tree, run pytest on it (its output goes to ours), judge."""
    problem = argument_problem(build)
    if problem:
        return Verdict(ABORT, problem)
    missing = build.missing_deps()
    if missing:  # the same on every commit: skipping each would end the bisection with no answer
        return Verdict(ABORT, f"building a kernel needs: apt-get install {' '.join(missing)}")
    try:
        build.build()
    except SyscallIrlError as exc:
        return Verdict(SKIP, f"the kernel did not build: {exc.message}")  # a failed make names its log
    junit = user_junit(pytest_args) or build.directory / "bisect-junit.xml"
    junit.unlink(missing_ok=True)  # a report of an earlier step must not be judged as this one's
    command = pytest_command(pytest_args, build, junit)
    say("running " + " ".join(command))
    try:
        status = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    except KeyboardInterrupt:
        return Verdict(INTERRUPTED, "interrupted")
    return verdict(status, junit)

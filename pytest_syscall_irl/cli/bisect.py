"""One step of `git bisect run`: build the kernel tree as it is checked out, run pytest on it,
and turn the outcome into the exit status git bisect understands.

    git bisect run syscall-irl bisect-run -- --pyargs pytest_syscall_irl.suites -k fmask

- 0 (good): the selected tests passed.
- 1 (bad): a test failed: an invariant does not hold on this commit.
- 125 (skip): this commit cannot be judged: the kernel did not build, or the harness or the
  environment broke (a test error, a usage error, no tests ran). Skipping, not blaming, keeps a
  broken build or a flaky machine from being named the culprit.
- 130: interrupted; git bisect stops on any status above 127.

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
from ..report.junit import outcomes
from ..kernel.build import KernelBuild, Progress

GOOD, BAD, SKIP, ABORT = 0, 1, 125, 130
PYTEST_TESTS_FAILED, PYTEST_INTERRUPTED = 1, 2


@dataclass(frozen=True)
class Verdict:
    """The exit status for git bisect, and why."""

    status: int
    reason: str


def verdict(pytest_status: int, junit: Path) -> Verdict:
    """Map pytest's exit status (and its JUnit report: violations vs breakage) to git bisect's."""
    if pytest_status == 0:
        return Verdict(GOOD, "the tests passed")
    if pytest_status == PYTEST_INTERRUPTED:
        return Verdict(ABORT, "pytest was interrupted")
    if pytest_status == PYTEST_TESTS_FAILED:
        found = outcomes(junit)
        if found.violated:
            return Verdict(BAD, f"{found.violated} test(s) failed: an invariant does not hold")
        return Verdict(SKIP, f"{found.broken} test(s) broken and none failed: the harness or the environment broke")
    return Verdict(SKIP, f"pytest exited {pytest_status} (usage error, internal error or no tests)")


def pytest_command(pytest_args: Sequence[str], build: KernelBuild, junit: Path) -> list[str]:
    """pytest on the freshly built kernel; the user's arguments come first, ours last."""
    return [sys.executable, "-m", "pytest", *pytest_args, f"--kernel={build.bzimage}",
            f"--vmlinux={build.vmlinux}", f"--junitxml={junit}"]


def bisect_step(build: KernelBuild, pytest_args: Sequence[str], say: Progress) -> Verdict:
    """Build the tree, run pytest on it (its output goes to ours), judge."""
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
        return Verdict(ABORT, "interrupted")
    return verdict(status, junit)

"""The trace instrument as a user meets it: a suite of plain pytest functions in a
directory of its own, outside this package, with its own guest programs (C, 64- and
32-bit) given with --syscall-irl-payloads, run on the reference kernel in QEMU with GDB.

These run in CI (the root conftest fails them there if they skip)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from pytest_syscall_irl.kernel.build import reference_kernel

pytestmark = pytest.mark.integration

USER_SUITE = Path(__file__).with_name("user_suite")


def test_a_users_own_suite_and_programs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    reference = reference_kernel()
    if reference is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    suite = tmp_path / "my-kernel-checks"  # outside the package, as a user's would be
    shutil.copytree(USER_SUITE, suite)
    # test_compare_kernels.py compares with a baseline: the reference kernel itself, so each comparison holds.
    result = pytester.run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", "-n", "2",
                          f"--rootdir={suite}", f"--syscall-irl-payloads={suite / 'payloads'}",
                          f"--syscall-irl-baseline={reference}", str(suite), timeout=600)
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, out
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 9 and "skipped" not in outcomes, out

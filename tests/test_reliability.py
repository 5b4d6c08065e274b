"""The reliability matrix (tests/reliability.py) on the real QEMU, GDB and reference
kernel: every way of giving bad input or ending a run badly ends as it should, in time,
leaving no process, socket directory or TCP listener behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_syscall_irl.kernel.build import reference_kernel


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_every_case_of_the_reliability_matrix_is_ok() -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    script = Path(__file__).with_name("reliability.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=880)
    lines = [line for line in done.stdout.splitlines() if line[:3] in ("OK ", "BAD")]
    assert len(lines) >= 24, done.stdout + done.stderr
    assert done.returncode == 0 and all(line.startswith("OK ") for line in lines), done.stdout + done.stderr

"""Where the files shipped beside the code are: the guest sources (init, agent, payloads, the
reference kernel fragment) and the conformance suite.

The repository keeps them at its top level (`guest/`, `test_suites/`); the wheel carries them
inside the package (`pytest_syscall_irl/guest_sources/`, `pytest_syscall_irl/suites/`, mapped by
pyproject's [tool.setuptools.package-dir]). A checkout and an editable install find the first,
an installed wheel the second.
"""

from __future__ import annotations

from pathlib import Path

# This module is pytest_syscall_irl/core/shipped.py: the package is one folder up.
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _shipped(in_wheel: str, in_checkout: str) -> Path:
    installed = PACKAGE_DIR / in_wheel
    return installed if installed.is_dir() else PACKAGE_DIR.parent / in_checkout


GUEST_DIR = _shipped("guest_sources", "guest")
SUITES_DIR = _shipped("suites", "test_suites")
KERNEL_FRAGMENT = GUEST_DIR / "kernel.config"

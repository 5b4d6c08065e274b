"""Project-wide pytest configuration (the plugin itself registers through its entry point).

In CI (CI=true) an integration test must run: a skip there would hide that the real
QEMU, GDB or kernel path was never exercised, so it is turned into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if os.environ.get("CI") == "true" and report.skipped and item.get_closest_marker("integration"):
        report.outcome = "failed"
        report.longrepr = f"integration test skipped in CI (not allowed): {report.longrepr}"
    return report

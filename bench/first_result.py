"""A pytest plugin for the benchmark: when the first test result arrived.

Load it with ``-p first_result`` (this directory on PYTHONPATH) and set SIRL_BENCH_FIRST_FILE:
the process that reports (the xdist controller, or pytest itself without workers) writes
the wall-clock time (time.time()) of the first test's call result to that file.
"""

from __future__ import annotations

import os
import time

import pytest

ENV = "SIRL_BENCH_FIRST_FILE"


class FirstResult:
    def __init__(self, path: str) -> None:
        self.path: str | None = path

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.path is not None and report.when == "call":
            with open(self.path, "w") as out:
                out.write(f"{time.time()}\n")
            self.path = None


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(ENV) and not hasattr(config, "workerinput"):
        config.pluginmanager.register(FirstResult(os.environ[ENV]), "syscall-irl-bench-first-result")

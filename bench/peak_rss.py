"""A pytest plugin for the benchmark: the peak RSS of every QEMU and GDB the suite runs.

Load it with ``-p peak_rss`` (this directory on PYTHONPATH) and set SIRL_BENCH_RSS_FILE:
each guest's QEMU and each GDB session appends "qemu KB" or "gdb KB" (VmHWM) to that
file just before it is shut down. Instrumentation only: it wraps the two methods.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import pytest

from pytest_syscall_irl.machine.gdbmi import GdbSession
from pytest_syscall_irl.lab.guest import Guest

ENV = "SIRL_BENCH_RSS_FILE"


def _record(what: str, pid: int | None) -> None:
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/status") as status:
            peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        with open(os.environ[ENV], "a") as out:
            out.write(f"{what} {peak}\n")
    except (OSError, StopIteration):
        pass  # already gone


def _before(method: Callable[..., Any], what: str, pid: Callable[[Any], int | None]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        _record(what, pid(self))
        return method(self, *args, **kwargs)

    return wrapper


def _qemu_pid(guest: Guest) -> int | None:
    # A second shutdown must not read a pid the system has given to another process.
    return guest.machine.pid if guest.is_alive() else None


def _gdb_pid(gdb: GdbSession) -> int | None:
    return gdb.pid if gdb.is_alive() else None


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(ENV):
        Guest.shutdown = _before(Guest.shutdown, "qemu", _qemu_pid)  # type: ignore[method-assign]
        GdbSession.close = _before(GdbSession.close, "gdb", _gdb_pid)  # type: ignore[method-assign]

"""Child processes are stopped with everything they started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pytest_syscall_irl.core import procs


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _pid_written_to(pidfile: Path) -> int:
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, f"nothing wrote its pid to {pidfile}"
        time.sleep(0.01)
    return int(pidfile.read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _alive(pid)


def test_stop_takes_down_what_a_forking_wrapper_started(tmp_path: Path) -> None:
    # A --qemu wrapper that forks (`time qemu ...`, `strace qemu ...`) instead of exec'ing.
    pidfile = tmp_path / "grandchild"
    wrapper = procs.spawn(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], stdout=subprocess.DEVNULL)
    grandchild = _pid_written_to(pidfile)
    assert _alive(grandchild)
    procs.stop(wrapper, grace=2)
    assert _gone_within(grandchild, 5), f"pid {grandchild}, started by the stopped wrapper, is still running"


def test_stop_kills_a_group_member_that_ignores_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "stubborn"
    script = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done' & wait"
    wrapper = procs.spawn(["sh", "-c", script], stdout=subprocess.DEVNULL)
    stubborn = _pid_written_to(pidfile)
    started = time.monotonic()
    procs.stop(wrapper, grace=0.5)
    assert _gone_within(stubborn, 5 - (time.monotonic() - started))  # 5 s from the stop, its grace included


def test_stop_is_idempotent_and_returns_the_status() -> None:
    proc = procs.spawn(["true"])
    proc.wait()
    assert procs.stop(proc) == 0
    assert procs.stop(proc) == 0

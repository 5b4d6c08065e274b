"""Child processes are stopped with everything they started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pytest_syscall_irl import procs


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_takes_down_what_a_forking_wrapper_started(tmp_path: Path) -> None:
    # A --qemu wrapper that forks (`time qemu ...`, `strace qemu ...`) instead of exec'ing.
    pidfile = tmp_path / "grandchild"
    wrapper = procs.spawn(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "wrapper never started its child"
        time.sleep(0.01)
    grandchild = int(pidfile.read_text())
    assert _alive(grandchild)
    procs.stop(wrapper, grace=2)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(grandchild), f"pid {grandchild}, started by the stopped wrapper, is still running"


def test_stop_kills_a_group_member_that_ignores_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "stubborn"
    script = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done' & wait"
    wrapper = procs.spawn(["sh", "-c", script], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stubborn = int(pidfile.read_text())
    started = time.monotonic()
    procs.stop(wrapper, grace=0.5)
    while _alive(stubborn) and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert not _alive(stubborn)


def test_stop_is_idempotent_and_returns_the_status() -> None:
    proc = procs.spawn(["true"])
    proc.wait()
    assert procs.stop(proc) == 0
    assert procs.stop(proc) == 0

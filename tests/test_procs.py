"""Child processes are stopped with everything they started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_syscall_irl.core import procs, reaper


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


# A process that spawns a forking wrapper through procs.spawn, prints the wrapper's child
# and its reaper, then waits to be killed (as pytest is, by SIGKILL or os._exit).
_PARENT = """
import subprocess, sys, time
from pytest_syscall_irl.core import procs
wrapper = procs.spawn(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
print(wrapper.stdout.readline().strip(), procs._reaper.pid, flush=True)
time.sleep(300)
"""


def test_a_killed_parent_takes_a_wrappers_child_with_it() -> None:
    # PDEATHSIG kills the wrapper only; the reaper kills the rest of its group.
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    grandchild, reaper = map(int, parent.stdout.readline().split())  # type: ignore[union-attr]
    assert _alive(grandchild) and _alive(reaper)
    parent.kill()
    parent.wait()
    assert _gone_within(grandchild, 5), f"pid {grandchild}, started by a wrapper, outlived its killed pytest"
    assert _gone_within(reaper, 5), "the reaper outlived the process it watched"


def test_run_kills_a_hung_commands_group_at_its_timeout(tmp_path: Path) -> None:
    # A --qemu wrapper that hangs in the version probe: its child must not stay behind.
    pidfile = tmp_path / "grandchild"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        procs.run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], "", timeout=1)
    assert time.monotonic() - started < 5
    assert _gone_within(_pid_written_to(pidfile), 5)


def test_run_kills_what_a_finished_command_left_in_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    done = procs.run(["sh", "-c", f"sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}; echo out"], "", timeout=10)
    assert (done.returncode, done.stdout) == (0, "out\n")
    assert _gone_within(_pid_written_to(pidfile), 5)


def test_run_gives_the_input_and_returns_the_output() -> None:
    done = procs.run(["sh", "-c", "cat; echo err >&2; exit 3"], "in\n", timeout=10)
    assert (done.returncode, done.stdout, done.stderr) == (3, "in\n", "err\n")


def test_the_reaper_records_and_forgets_groups() -> None:
    groups: set[int] = set()
    for line in [b"+100", b"+200", b"-100", b"+1", b"+x", b"", b"?300"]:
        reaper.apply(groups, line)
    assert groups == {200}  # never group 1 (init's), never a line it cannot read


def test_the_reaper_kills_recorded_groups_at_end_of_file() -> None:
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    read, write = os.pipe()
    served = subprocess.Popen([sys.executable, "-I", "-S", reaper.__file__], stdin=read)
    os.close(read)
    os.write(write, b"+%d\n" % victim.pid)
    time.sleep(0.3)
    assert victim.poll() is None, "the reaper killed a group while its watcher lived"
    os.close(write)  # what the watcher's death does
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert served.wait(timeout=5) == 0


def test_the_first_spawn_costs_little() -> None:
    # The reaper starts once per process, at the first spawn, without waiting for it.
    code = ("import time; from pytest_syscall_irl.core import procs; t = time.perf_counter(); "
            "procs.spawn(['true']).wait(); print(time.perf_counter() - t)")
    first = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert first < 0.2, f"the first spawn took {first * 1000:.0f} ms"


def test_a_reaper_that_died_is_replaced_at_the_next_spawn() -> None:
    running = procs.spawn(["sleep", "300"])
    first = procs._reaper.pid
    os.kill(first, signal.SIGKILL)
    assert _gone_within(first, 5)
    try:
        procs.spawn(["true"]).wait()
        assert procs._reaper.pid != first and _alive(procs._reaper.pid)
    finally:
        procs.stop(running)

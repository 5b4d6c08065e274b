"""Child processes that cannot outlive us.

QEMU and GDB are started in their own session (a Ctrl-C typed at pytest's terminal
reaches pytest only, which then shuts them down in order) and with
PR_SET_PDEATHSIG=SIGKILL, so they die with their parent even when the parent is
SIGKILLed or leaves through os._exit (pytest-timeout's thread method).
An atexit hook is the last line of defence for an ordinary interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_live: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()


def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work here.
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    # The parent may have died before prctl took effect: then nobody will tell us.
    if os.getppid() != parent_pid:
        os._exit(127)


def spawn(command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start *command* as a child bound to this process's lifetime.

    Takes the keyword arguments of subprocess.Popen, except start_new_session and
    preexec_fn, which it sets.
    """
    parent = os.getpid()
    proc: subprocess.Popen[Any] = subprocess.Popen(
        list(command),
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(parent),
        **kwargs,
    )
    _live.add(proc)
    log.debug("started pid %d: %s", proc.pid, " ".join(command))
    return proc


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    # spawn() made the child a session (and process group) leader: its group holds
    # whatever it started, e.g. the real QEMU under a --qemu wrapper that forks.
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> int:
    """Terminate *proc* and its process group (SIGTERM, then SIGKILL after *grace*
    seconds) and reap it.

    Idempotent; returns the exit status.
    """
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Members that ignored SIGTERM or outlived their leader. Only right after we saw
        # the leader alive: a group id reaped long ago could name someone else's group.
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    _live.discard(proc)
    return proc.returncode


_cleanups: list[Callable[[], None]] = []


def on_exit(cleanup: Callable[[], None]) -> None:
    """Run *cleanup* when this process leaves by an ordinary exit or SIGTERM, after its
    children are killed (e.g. remove their socket directories). Nothing runs on SIGKILL
    or os._exit: what must not outlive us then has to be swept by the next run."""
    if cleanup not in _cleanups:
        _cleanups.append(cleanup)
    _catch_sigterm()


def _catch_sigterm() -> None:
    # SIGTERM's default action ends the interpreter without atexit. Only where nobody
    # else handles it, and only the main thread may set a handler.
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: object) -> None:
    _kill_leftovers()
    # Then die of SIGTERM as before, so whoever sent it sees the usual exit status.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    while _cleanups:
        try:
            _cleanups.pop()()
        except Exception:  # the last line of defence must not stop half-way
            log.exception("clean-up at exit failed")

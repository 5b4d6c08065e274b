"""Child processes that cannot outlive us.

QEMU and GDB are started in their own session (a Ctrl-C typed at pytest's terminal
reaches pytest only, which then shuts them down in order) and with
PR_SET_PDEATHSIG=SIGKILL, so they die with their parent even when the parent is
SIGKILLed or leaves through os._exit (pytest-timeout's thread method). That covers the
direct child only: what it starts itself (the real QEMU under a --qemu wrapper that does
not `exec`) stays in its process group, which the reaper (`reaper.py`, one per process,
started at the first spawn) kills when this process is gone, however it went.
An atexit hook is the last line of defence for an ordinary interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_live: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()


class _Reaper:
    """This process's reaper (see `reaper.py`): its pid and the write end of its pipe."""

    def __init__(self) -> None:
        self.owner = 0  # the pid that started it: a forked copy of us needs its own
        self.pid = 0
        self.fd = -1

    def fd_for(self, pid: int) -> int:
        """The pipe to tell about groups, the reaper started first if *pid* has none alive."""
        if self.owner == pid and self._alive():
            return self.fd
        read, write = os.pipe()  # both close on exec: no child but the reaper holds either
        try:
            # posix_spawn, not Popen: nothing here ever waits for the reaper while we live,
            # and a Popen left running warns at exit. stdout/stderr: /dev/null, so that the
            # reaper never holds open a pipe whose reader waits for pytest's output to end.
            self.pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", _REAPER_SCRIPT], os.environ,
                                      file_actions=[(os.POSIX_SPAWN_DUP2, read, 0),
                                                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                                    (os.POSIX_SPAWN_DUP2, 1, 2)],
                                      setsid=True)
        finally:
            os.close(read)
        if self.owner == pid and self.fd >= 0:
            os.close(self.fd)  # the write end of a reaper that died (someone killed it)
        self.owner, self.fd = pid, write
        for proc in list(_live):  # what the dead reaper knew, the new one must
            if proc.poll() is None:
                self.tell(b"+%d\n" % proc.pid)
        log.debug("reaper %d started", self.pid)
        return write

    def _alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def tell(self, message: bytes) -> None:
        """Write one protocol line; a reaper that is gone is a lost second line, not an error."""
        if self.owner != os.getpid():
            return
        try:
            os.write(self.fd, message)
        except OSError:
            pass


_REAPER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")
_reaper = _Reaper()
_reaper_lock = threading.Lock()


def _die_with_parent(parent_pid: int, reaper_fd: int) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work here.
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    # The parent may have died before prctl took effect: then nobody will tell us.
    if os.getppid() != parent_pid:
        os._exit(127)
    # Recorded before exec: no moment when the group runs and the reaper does not know it.
    # One write under PIPE_BUF is atomic however many children write at once.
    try:
        os.write(reaper_fd, b"+%d\n" % os.getpid())
    except OSError:
        pass  # no reaper: PDEATHSIG still holds for this child


def spawn(command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start *command* as a child bound to this process's lifetime, with everything it
    starts in its process group (see the reaper).

    Takes the keyword arguments of subprocess.Popen, except start_new_session and
    preexec_fn, which it sets.
    """
    parent = os.getpid()
    with _reaper_lock:
        try:
            reaper_fd = _reaper.fd_for(parent)
        except OSError as exc:  # no reaper is a narrower safety net, not a reason to fail
            log.warning("cannot start the reaper (%s): a --syscall-irl-qemu wrapper's children may outlive a "
                        "killed run", exc)
            reaper_fd = -1
    proc: subprocess.Popen[Any] = subprocess.Popen(
        list(command),
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(parent, reaper_fd),
        **kwargs,
    )
    _live.add(proc)
    log.debug("started pid %d: %s", proc.pid, " ".join(command))
    return proc


def run(command: Sequence[str], stdin: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run *command* to the end with *stdin* as its input and its output captured, as
    subprocess.run does, but bound like `spawn`: on a timeout (TimeoutExpired) or any
    other exception its whole group is killed, and at the end whatever the command left
    running in its group (a wrapper's child) is too."""
    proc = spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except BaseException:
        stop(proc, grace=0)
        raise
    # Just reaped by communicate: the group's number cannot have been reused yet.
    _signal_group(proc, signal.SIGKILL)
    _forget(proc)
    return subprocess.CompletedProcess(list(command), proc.returncode, out, err)


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
        _forget(proc)
    _live.discard(proc)
    return proc.returncode


def _forget(proc: subprocess.Popen[Any]) -> None:
    # Only after we killed the group ourselves: a leader that ended on its own may have
    # left members behind, which the reaper keeps recorded until the group is empty.
    _reaper.tell(b"-%d\n" % proc.pid)


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

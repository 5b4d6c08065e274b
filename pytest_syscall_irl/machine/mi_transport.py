"""One GDB process speaking MI: its start and end, one token-matched round trip per
command, the async records routed to whoever waits for a stop, and the transcript.

pygdbmi's ``GdbController`` starts the process (through ``procs.spawn``, so GDB dies
with us) and its parser reads the records (mi_records.parse_line); the I/O is ours.
``GdbController.write()`` waits for 0.2 s of silence after every command (so each costs
>= 200 ms, measured with pygdbmi 0.11) and does not match results to MI tokens, so a
``*stopped`` record can be swallowed by whichever call was reading. Here one reader
thread hands each result record to the command whose token it carries and every async
record to a queue, so a stop is never lost.

What the commands mean is gdbmi.GdbSession's business; this module knows only the
records. No pytest here.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Union

from pygdbmi.gdbcontroller import GdbController

from ..core import procs
from ..core.errors import GdbError, tail
from .mi_records import MiResult, StopEvent, parse_line

__all__ = ["CLOSE_TIMEOUT", "DEFAULT_TIMEOUT", "GdbCommandError", "GdbTimeoutError", "MiTransport", "State"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # one ordinary command
CLOSE_TIMEOUT = 2.0
TAIL_LINE_CHARS = 400

State = Literal["running", "stopped", "detached"]
PathLike = Union[str, "os.PathLike[str]"]


class GdbCommandError(GdbError):
    """GDB answered an MI command with ``^error``; ``gdb_message`` is its msg."""

    def __init__(self, mi_command: str, gdb_message: str, log_tail: str) -> None:
        super().__init__(
            f"GDB rejected {mi_command!r}: {gdb_message}", command=[mi_command], log_tail=log_tail
        )
        self.mi_command = mi_command
        self.gdb_message = gdb_message


class GdbTimeoutError(GdbError):
    """GDB did not answer, or the target did not stop, before the deadline."""


def _cut(line: str) -> str:
    if len(line) <= TAIL_LINE_CHARS:
        return line
    return f"{line[:TAIL_LINE_CHARS]}... ({len(line) - TAIL_LINE_CHARS} more characters in the transcript file)"


@dataclass
class _Pending:
    token: int
    command: str
    done: threading.Event = field(default_factory=threading.Event)
    record: dict[str, Any] | None = None
    console: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


_EOF = object()  # queued when GDB's stdout closes, so waiters wake up


class _GdbProcess(GdbController):
    """pygdbmi's process handling, with the child bound to our lifetime by procs.spawn.

    Overrides pygdbmi's ``spawn_new_gdb_subprocess``, which would start GDB with a bare
    Popen (a GDB that outlives a SIGKILLed or os._exit-ed pytest) and attach the
    IoManager whose ``write()`` costs >= 200 ms a command; the readers here replace it.
    """

    def spawn_new_gdb_subprocess(self) -> int:
        """Start GDB with pipes on stdin, stdout and stderr; return its pid."""
        # debuginfod would fetch symbols over the network (Ubuntu enables it by default).
        env = dict(os.environ, DEBUGINFOD_URLS="")
        pipe = subprocess.PIPE
        self.gdb_process = procs.spawn(self.command, stdin=pipe, stdout=pipe, stderr=pipe, env=env)
        return int(self.gdb_process.pid)


class _Transcript:
    """Every MI line both ways with seconds since the start, in a file and a short tail."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lines: deque[str] = deque(maxlen=200)
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if path is not None:
            self._file = open(path, "a", encoding="utf-8", buffering=1)

    def record(self, prefix: str, line: str) -> None:
        # "  12.345 -> 7-exec-continue": a stall shows as a jump in the first column.
        entry = f"{time.monotonic() - self._started:8.3f} {prefix}{line}"
        with self._lock:
            self._lines.append(entry)
            if self._file is not None:
                self._file.write(entry + "\n")

    def tail(self, lines: int) -> str:
        return tail("\n".join(_cut(line) for line in self._lines), lines)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class MiTransport:
    """A started GDB (``gdb --nx --quiet --interpreter=mi3``) and its reader threads.

    Example::

        mi = MiTransport("gdb", transcript_path="gdb.log")
        assert mi.command('-data-evaluate-expression "1+2"').payload["value"] == "3"
        mi.close()
    """

    def __init__(self, gdb: str = "gdb", *, transcript_path: PathLike | None = None) -> None:
        """Start GDB and the threads reading its stdout and stderr; GdbError if it cannot start."""
        self._command_line = [gdb, "--nx", "--quiet", "--interpreter=mi3"]
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()  # guards _pending, _state, _exited
        self._command_lock = threading.Lock()  # one command in flight
        self._pending: _Pending | None = None
        self._state: State = "detached"
        self._exited = False
        self._closed = False
        self._async: queue.Queue[object] = queue.Queue()
        self._transcript = _Transcript(Path(transcript_path) if transcript_path is not None else None)
        self._proc = self._spawn()
        self._threads = [
            threading.Thread(target=self._read_stdout, name="gdbmi-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="gdbmi-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        try:
            controller = _GdbProcess(command=self._command_line)
        except (ValueError, OSError) as exc:  # ValueError: pygdbmi found no such executable
            self._transcript.close()
            raise GdbError(f"cannot start GDB: {exc}", command=self._command_line) from exc
        proc: subprocess.Popen[bytes] = controller.gdb_process  # type: ignore[assignment]
        log.info("GDB started, pid %d: %s", proc.pid, " ".join(self._command_line))
        return proc

    # ---- the transcript --------------------------------------------------------

    @property
    def transcript_path(self) -> Path | None:
        """Where every MI line is written, or None."""
        return self._transcript.path

    def transcript_tail(self, lines: int = 40) -> str:
        """The last *lines* lines of the MI transcript, each cut to TAIL_LINE_CHARS (a
        disassembly or a register dump is kilobytes on one line; the file keeps it whole)."""
        return self._transcript.tail(lines)

    # ---- reading ---------------------------------------------------------------

    def _read_stdout(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        for raw in iter(stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self._transcript.record("<- ", line)
            try:
                self._dispatch(line)
            except Exception:  # a parser surprise must not kill the only reader
                log.exception("cannot handle GDB output line %r", line)
        with self._lock:
            self._exited = True
            self._state = "detached"
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.done.set()
        self._async.put(_EOF)

    def _read_stderr(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None
        for raw in iter(stderr.readline, b""):
            self._transcript.record("<2 ", raw.decode("utf-8", "replace").rstrip("\r\n"))

    def _dispatch(self, line: str) -> None:
        if not line or line.startswith("(gdb)"):
            return
        record = parse_line(line)
        kind = record["type"]
        if kind == "result":
            self._on_result(record)
        elif kind == "notify":  # both "*" exec and "=" notify records
            self._on_async(record)
        elif kind in ("console", "log", "target"):
            with self._lock:
                if self._pending is not None:
                    target = self._pending.log if kind == "log" else self._pending.console
                    target.append(str(record["payload"]))

    def _on_result(self, record: dict[str, Any]) -> None:
        token = record.get("token")
        if record["message"] == "running":
            # Decided here, in stream order: a stop that GDB reported before this ^running
            # is stale, one after it is this resume's, however late the waiter comes.
            self.drop_stale_stops(f"token {token} (^running)")
        with self._lock:
            if record["message"] == "running":
                self._state = "running"
            elif record["message"] == "connected":
                self._state = "stopped"
            pending = self._pending
            if pending is None or (token is not None and token != pending.token):
                log.warning("GDB result for no waiting command (late answer?): token %s", token)
                return
            pending.record = record
            self._pending = None
        pending.done.set()

    def _on_async(self, record: dict[str, Any]) -> None:
        message = record["message"]
        if message == "running":
            # The target resumed after any stop still queued (a breakpoint whose commands
            # end in `continue` resumes without a ^running of ours): those stops are stale.
            self.drop_stale_stops("*running")
        with self._lock:
            if message == "running":
                self._state = "running"
            elif message == "stopped":
                self._state = "stopped"
            elif message == "thread-group-exited":
                self._state = "detached"
        self._async.put(record)

    # ---- commands --------------------------------------------------------------

    def command(self, mi: str, timeout: float = DEFAULT_TIMEOUT) -> MiResult:
        """Send one MI command (no token: one is added) and return its result record.

        Raises GdbCommandError on ``^error``, GdbTimeoutError past *timeout*, GdbError
        if GDB is gone.
        """
        deadline = time.monotonic() + timeout
        if not self._command_lock.acquire(timeout=timeout):
            raise GdbTimeoutError(
                f"{mi!r} waited {timeout:g} s for another command to finish", command=[mi]
            )
        try:
            pending = self._send(mi)
            if not pending.done.wait(max(deadline - time.monotonic(), 0.0)):
                with self._lock:
                    if self._pending is pending:
                        self._pending = None  # a late answer will be logged and dropped
                if pending.record is None:
                    raise GdbTimeoutError(
                        f"GDB did not answer {mi!r} within {timeout:g} s",
                        command=[mi],
                        log_tail=self.transcript_tail(),
                    )
        finally:
            self._command_lock.release()
        return self._result(pending)

    def _send(self, mi: str) -> _Pending:
        if "\n" in mi or "\r" in mi:
            raise GdbError(f"line break in {mi!r}: GDB would read two commands")
        with self._lock:
            if self._closed or self._exited:
                raise self._gone(mi)
            pending = _Pending(next(self._tokens), mi)
            self._pending = pending
        line = f"{pending.token}{mi}"
        self._transcript.record("-> ", line)
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self._gone(mi) from exc
        return pending

    def _result(self, pending: _Pending) -> MiResult:
        record = pending.record
        if record is None:
            raise self._gone(pending.command)
        payload = record.get("payload") or {}
        if record["message"] == "error":
            raise GdbCommandError(pending.command, str(payload.get("msg", "")), self.transcript_tail())
        return MiResult(record["message"], payload, "".join(pending.console), "".join(pending.log))

    def _gone(self, mi: str) -> GdbError:
        if self._closed:
            return GdbError(f"GDB session is closed; cannot send {mi!r}", command=[mi])
        try:
            code: int | None = self._proc.wait(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        return GdbError(
            f"GDB exited while handling {mi!r}", command=[mi], exit_code=code,
            log_tail=self.transcript_tail(),
        )

    # ---- stops -----------------------------------------------------------------

    def wait_for_stop(self, timeout: float, skip: Callable[[StopEvent], bool] | None = None) -> StopEvent:
        """The next ``*stopped`` record (one that arrived during another command too) for
        which *skip* is not true. GdbTimeoutError past *timeout*, GdbError if GDB is gone."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                record = self._async.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise GdbTimeoutError(
                    f"target did not stop within {timeout:g} s (state {self.state})",
                    log_tail=self.transcript_tail(),
                ) from None
            if record is _EOF:
                self._async.put(_EOF)  # for the next waiter
                raise self._gone("(waiting for the target to stop)")
            assert isinstance(record, dict)
            if record["message"] == "stopped":
                stop = StopEvent.from_payload(record.get("payload") or {})
                if skip is None or not skip(stop):
                    return stop

    def drop_stale_stops(self, why: str) -> None:
        """Drop the stops queued so far: a later wait_for_stop must not see them (they
        came before the target resumed, or before a new target was selected)."""
        while True:
            try:
                record = self._async.get_nowait()
            except queue.Empty:
                return
            if record is _EOF:
                self._async.put(_EOF)
                return
            if isinstance(record, dict) and record["message"] == "stopped":
                log.info("discarding a stop nobody waited for before %s: %s", why, record)

    # ---- the process -----------------------------------------------------------

    @property
    def state(self) -> State:
        """``"running"``, ``"stopped"`` or ``"detached"`` (no target), from GDB's records."""
        with self._lock:
            return self._state

    def mark_detached(self) -> None:
        """Record that GDB has no target now (GDB prints no async record for a detach)."""
        with self._lock:
            self._state = "detached"

    def is_alive(self) -> bool:
        """True while GDB runs and the transport is not closed."""
        with self._lock:
            return not (self._closed or self._exited) and self._proc.poll() is None

    @property
    def closed(self) -> bool:
        """True once close() began: every command fails from then on."""
        return self._closed

    @property
    def pid(self) -> int:
        """GDB's process id."""
        return self._proc.pid

    def close(self, timeout: float = CLOSE_TIMEOUT, *, ask_to_exit: bool = True) -> None:
        """Ask GDB to exit (with *ask_to_exit*; it detaches, the guest runs on), then
        stop and reap it, and close the transcript. Idempotent."""
        if self._closed:
            return
        if ask_to_exit and not self._exited:
            try:
                self.command("-gdb-exit", timeout)
                # A SIGTERM during GDB 13's own exit path makes it segfault: let it finish.
                self._proc.wait(timeout)
            except (GdbError, subprocess.TimeoutExpired) as exc:
                log.warning("GDB did not exit cleanly: %s", exc)
        self._closed = True  # from here on a command fails with "closed", not "exited"
        code = procs.stop(self._proc, grace=timeout)
        for thread in self._threads:
            thread.join(timeout)
        self._close_pipes()
        self.mark_detached()
        log.info("GDB pid %d ended with status %s", self._proc.pid, code)
        self._transcript.close()

    def _close_pipes(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


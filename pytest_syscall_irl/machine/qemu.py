"""A QEMU x86_64 machine with its serial ports, gdbstub and QMP monitor on unix sockets.

Two serial ports: ttyS0, the kernel's console (logged whole to console.log), and ttyS1,
the guest agent's command channel (guest/agent.c; two FIFOs rather than a socket, see
machine/channel.py; not logged: QEMU writes a serial port's output one byte per write(),
and a log file would double that). Nothing listens on TCP: the sockets and FIFOs live in a private 0700 directory with a
short path (unix socket paths are limited to ~108 bytes, pytest's tmp paths can
exceed that). QEMU starts paused (-S) so the console is connected before the guest
prints anything; `resume()` starts it. QEMU's stdout/stderr go to a log file, never
to a pipe nobody reads.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from ..core import procs
from ..core.errors import QemuError, StateLoadError, SyscallIrlError, tail

log = logging.getLogger(__name__)

# tsc=reliable: under TCG the TSC follows host time while jiffies follow the timer
# interrupts the emulated CPU gets round to, so on a loaded host the clocksource
# watchdog sees a skew, marks the TSC unstable and switches clocksource; that switch
# stalled guests for ~7 s (guest messages mid-way through command output, too).
DEFAULT_APPEND = "console=ttyS0 nokaslr panic=-1 printk.time=1 tsc=reliable"
SOCKET_WAIT = 10.0
EXIT_GRACE = 2.0  # how long a QEMU whose QMP just disconnected may take to exit
SAVE_TIMEOUT = 60.0
LOAD_TIMEOUT = 30.0  # a 256 MB guest loads in ~0.1 s
SAVE_BANDWIDTH = 1 << 40  # bytes/s: no cap


@dataclass(frozen=True)
class MachineConfig:
    """Everything that determines a guest: the same config gives the same machine."""

    kernel: Path
    initrd: Path
    append: str = DEFAULT_APPEND
    iso: Path | None = None
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    memory_mb: int = 256
    cpus: int = 1
    cpu: str | None = None  # QEMU's -cpu model (default: QEMU's own, qemu64 under TCG)
    extra_args: tuple[str, ...] = ()
    # A second serial port (ttyS1) for the guest agent's commands. Only for a kernel that drives
    # two 8250 ports: one that drives fewer (8250.nr_uarts=1) died silently registering the
    # second port it found (6.1.192), and its agent talks on ttyS0 anyway.
    channel: bool = True
    # A saved machine state to start from (see QemuMachine.save_state) instead of booting:
    # every other field must equal those of the machine that saved it.
    incoming: Path | None = None


@dataclass(frozen=True)
class Sockets:
    """The unix sockets of one machine, all in one private directory."""

    directory: Path

    @property
    def console(self) -> Path:
        return self.directory / "console.sock"

    @property
    def channel(self) -> Path:
        """The agent's command channel, the guest's second serial port (ttyS1): the FIFOs
        PATH.in and PATH.out (see machine/channel.py for why not a socket)."""
        return self.directory / "channel"

    def make_channel(self) -> None:
        """Create the channel's FIFOs (QEMU opens them; it does not create them)."""
        for suffix in (".in", ".out"):
            fifo = Path(f"{self.channel}{suffix}")
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)

    @property
    def gdb(self) -> Path:
        return self.directory / "gdb.sock"

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"


def option_value(value: object) -> str:
    """*value* as a QEMU option value (`-drive file=...`, `-chardev ...,path=...`): a comma
    would end it and start another option, so QEMU reads a doubled comma as one."""
    return str(value).replace(",", ",,")


def _chardev(name: str, path: Path, *extra: str) -> str:
    # extra: "key=value" options, whose values are paths too (logfile=).
    escaped = [f"{key}={option_value(value)}" for key, _, value in (option.partition("=") for option in extra)]
    return ",".join([f"socket,id={name},path={option_value(path)},server=on,wait=off", *escaped])


def _machine_args(config: MachineConfig) -> list[str]:
    accel = config.accel if config.accel == "kvm" else "tcg"
    return [
        "-accel", accel,
        *(["-cpu", config.cpu] if config.cpu else []),
        "-m", f"{config.memory_mb}M",
        "-smp", str(config.cpus),
        "-nodefaults", "-display", "none", "-nic", "none",
        "-no-reboot",
    ]


def _boot_args(config: MachineConfig) -> list[str]:
    return ["-kernel", str(config.kernel), "-initrd", str(config.initrd), "-append", config.append]


def _disk_args(config: MachineConfig) -> list[str]:
    if config.iso is None:
        return []
    return ["-drive", f"file={option_value(config.iso)},if=virtio,format=raw,readonly=on,media=disk"]


def _channel_args(config: MachineConfig, sockets: Sockets) -> list[str]:
    return ["-chardev", f"pipe,id=cmd,path={sockets.channel}", "-serial", "chardev:cmd"] if config.channel else []


def _socket_args(config: MachineConfig, sockets: Sockets, console_log: Path) -> list[str]:
    return [
        "-chardev", _chardev("con", sockets.console, f"logfile={console_log}"),
        "-serial", "chardev:con",
        *_channel_args(config, sockets),
        "-chardev", _chardev("gdb", sockets.gdb),
        "-gdb", "chardev:gdb",
        "-chardev", _chardev("qmp", sockets.qmp),
        "-mon", "chardev=qmp,mode=control",
    ]


def _incoming_args(config: MachineConfig) -> list[str]:
    if config.incoming is None:
        return []
    # QEMU runs the exec: command with /bin/sh -c.
    return ["-incoming", f"exec:cat {shlex.quote(str(config.incoming))}"]


def qemu_command(config: MachineConfig, sockets: Sockets, console_log: Path) -> list[str]:
    """The full QEMU command line for *config*, started paused (-S)."""
    return [
        config.qemu,
        *_machine_args(config),
        *_boot_args(config),
        *_disk_args(config),
        *_socket_args(config, sockets, console_log),
        "-S",
        *_incoming_args(config),
        *config.extra_args,
    ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie will never clean up (and where PID 1 does not reap, it stays one).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def sweep_socket_dirs(base: Path) -> None:
    """Remove socket directories whose owner died without cleaning up (SIGKILL, os._exit).

    Their QEMU died with the owner (procs.spawn); only the empty directory stayed.
    """
    for directory in base.glob("sirl-*-*"):
        owner = directory.name.split("-")[1]
        if owner.isdigit() and directory.is_dir() and not _pid_alive(int(owner)):
            shutil.rmtree(directory, ignore_errors=True)


_socket_dirs: set[Path] = set()  # this process's, removed at exit if a machine did not


def _remove_socket_dirs() -> None:
    for directory in list(_socket_dirs):
        shutil.rmtree(directory, ignore_errors=True)
        _socket_dirs.discard(directory)


def _socket_base() -> Path:
    # $TMPDIR when its paths stay short (unix socket paths are limited to ~108 bytes, and
    # pytest's tmp paths can exceed that), else /tmp.
    base = Path(tempfile.gettempdir())
    return base if len(str(base)) <= 48 or not os.path.isdir("/tmp") else Path("/tmp")


def private_socket_dir() -> Path:
    """A fresh 0700 directory, named after its owner pid, with a path short enough for
    unix sockets; removed at exit (or SIGTERM) if its machine's shutdown did not run."""
    base = _socket_base()
    sweep_socket_dirs(base)
    if not _socket_dirs:
        procs.on_exit(_remove_socket_dirs)
    directory = Path(tempfile.mkdtemp(prefix=f"sirl-{os.getpid()}-", dir=base))
    _socket_dirs.add(directory)
    return directory


@dataclass
class QemuMachine:
    """One QEMU process. `launch()`, then `resume()`; `shutdown()` is idempotent.

    Logs (qemu.log: QEMU's own output; console.log: everything the guest printed)
    go to *log_dir*, which outlives the machine for failure artifacts.
    """

    config: MachineConfig
    log_dir: Path
    sockets: Sockets = field(init=False)
    command: list[str] = field(init=False, default_factory=list)
    _proc: subprocess.Popen[Any] | None = field(init=False, default=None)
    _qmp: QEMUMonitorProtocol | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.sockets = Sockets(private_socket_dir())

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.log_dir / "qemu.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def launch(self) -> None:
        """Start QEMU paused and connect QMP; on any failure nothing is left running."""
        self.command = qemu_command(self.config, self.sockets, self.console_log)
        log.info("launching QEMU: %s", " ".join(self.command))
        try:
            self._check_incoming()
            if self.config.channel:
                self.sockets.make_channel()
            with open(self.qemu_log, "wb") as out:
                self._proc = procs.spawn(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            self._wait_for_socket(self.sockets.qmp)
            self._qmp = self._connect_qmp()
            self._qmp.settimeout(SOCKET_WAIT)
        except QemuError as exc:
            self.shutdown()
            raise self.load_failure(exc) from exc.__cause__
        except Exception as exc:
            failure = self._failure(f"QEMU failed to start: {exc}")
            self.shutdown()
            raise self.load_failure(failure) from exc

    def load_failure(self, failure: SyscallIrlError) -> SyscallIrlError:
        """*failure* as a StateLoadError when QEMU's log says it could not load the state it
        was started from: it may exit before QMP answers, or before the console connects."""
        if self.config.incoming is None or isinstance(failure, StateLoadError) or \
                "load of migration failed" not in (failure.log_tail or ""):
            return failure
        return StateLoadError(f"QEMU could not load the saved state {self.config.incoming}: {failure.message}",
                              command=failure.command, exit_code=failure.exit_code, log_tail=failure.log_tail)

    def _check_incoming(self) -> None:
        incoming = self.config.incoming
        if incoming is not None and not os.access(incoming, os.R_OK):
            # QEMU would wait for the state forever: `cat` fails, the stream is just empty.
            raise StateLoadError(f"saved machine state {incoming} is missing or unreadable", command=self.command)

    def _wait_for_socket(self, path: Path) -> None:
        deadline = time.monotonic() + SOCKET_WAIT
        while not path.exists():
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._failure("QEMU exited at once")
            if time.monotonic() > deadline:
                raise self._failure(f"QEMU did not create {path} within {SOCKET_WAIT:.0f} s")
            time.sleep(0.005)

    def _connect_qmp(self) -> QEMUMonitorProtocol:
        # The socket file appears at bind(), before QEMU listens: a connection in
        # between is refused (seen on a loaded machine), so retry until the deadline.
        deadline = time.monotonic() + SOCKET_WAIT
        while True:
            qmp = QEMUMonitorProtocol(str(self.sockets.qmp))
            try:
                qmp.connect()
                return qmp
            except Exception:
                qmp.close()
                if not self.is_running() or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _failure(self, message: str) -> QemuError:
        code = self._proc.poll() if self._proc else None
        return QemuError(message, command=self.command, exit_code=code, log_tail=self.log_tail())

    def log_tail(self) -> str:
        """The tail of QEMU's own output and of the guest console."""
        parts = []
        for path in (self.qemu_log, self.console_log):
            if path.exists() and path.stat().st_size:
                parts.append(f"--- {path.name} ---\n" + tail(path.read_text(errors="replace")))
        return "\n".join(parts)

    def qmp(self, command: str, **arguments: object) -> Any:
        """Run a QMP command and return its result."""
        if self._qmp is None:
            raise QemuError(f"QMP {command}: machine is not running", command=self.command)
        try:
            return self._qmp.cmd(command, **arguments)
        except Exception as exc:
            raise self._failure(f"QMP command {command} failed: {exc}") from exc

    def resume(self) -> None:
        """Let the vCPUs run (QEMU starts paused); a machine started from a saved state
        first finishes loading it."""
        if self.config.incoming is not None:
            self._wait_incoming(LOAD_TIMEOUT)
        self.qmp("cont")

    def _wait_incoming(self, timeout: float) -> None:
        # QEMU 7.2 accepts `cont` while the state is still loading, but the guest then
        # never takes another interrupt: wait until the state is in.
        deadline = time.monotonic() + timeout
        try:
            while self.qmp("query-status").get("status") == "inmigrate":
                if time.monotonic() > deadline:
                    raise self._failure(f"QEMU did not load the saved state within {timeout:.0f} s")
                time.sleep(0.002)
        except QemuError as exc:
            # QEMU exits when the stream is not a state of this machine; QMP may report the
            # disconnect a moment before the process is gone, so give it that moment.
            if self.wait(EXIT_GRACE) is None:
                raise
            failure = self._failure(f"QEMU could not load the saved state {self.config.incoming}")
            raise StateLoadError(failure.message, command=failure.command, exit_code=failure.exit_code,
                                 log_tail=failure.log_tail) from exc

    def save_state(self, path: Path, timeout: float = SAVE_TIMEOUT) -> None:
        """Stop the vCPUs and write the whole machine state to *path* (QEMU migration).

        The machine stays stopped afterwards; start a new one from *path* with
        `MachineConfig(..., incoming=path)` and otherwise identical settings.
        """
        self.qmp("stop")
        # The default bandwidth cap (32 MiB/s) would make a local save take seconds.
        self.qmp("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
        self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp("query-migrate")
            if status.get("status") == "completed":
                return
            if status.get("status") in ("failed", "cancelled"):
                raise self._failure(f"saving the machine state failed: {status.get('error-desc', status)}")
            if time.monotonic() > deadline:
                self.qmp("migrate_cancel")
                raise self._failure(f"saving the machine state took more than {timeout:.0f} s")
            time.sleep(0.01)

    def wait(self, timeout: float) -> int | None:
        """Wait up to *timeout* s for QEMU to exit by itself; its exit code, or None."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, grace: float = 3.0) -> None:
        """Stop QEMU: QMP quit, then SIGTERM, then SIGKILL; always reap and clean up."""
        try:
            if self._qmp is not None and self.is_running():
                try:
                    self._qmp.settimeout(1.0)
                    self._qmp.cmd("quit")
                except Exception:  # QEMU may die before answering; that is what we asked for
                    pass
            if self._proc is not None:
                if self.wait(grace) is None:
                    procs.stop(self._proc, grace)
                procs.stop(self._proc)
        finally:
            self._post_shutdown()

    def _post_shutdown(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:
                pass
            self._qmp = None
        shutil.rmtree(self.sockets.directory, ignore_errors=True)
        _socket_dirs.discard(self.sockets.directory)

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# --- accelerator ---------------------------------------------------------------------

KVM_PROBE_DEADLINE = 10.0


def kvm_probe(qemu: str, kernel: Path, deadline: float = KVM_PROBE_DEADLINE) -> tuple[bool, str]:
    """Does a KVM guest really run here? Returns (usable, reason).

    /dev/kvm existing proves nothing: with broken nested virtualisation a KVM guest
    hangs before the kernel prints a line. The probe boots *kernel* under KVM with no
    root file system; a working KVM reaches the kernel's "VFS: Unable to mount root"
    panic, and QEMU exits on it (panic=-1, -no-reboot), in about a second.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="sirl-kvm-") as tmp:
        serial = Path(tmp) / "serial.log"
        command = [qemu, "-accel", "kvm", "-m", "128M", "-nodefaults", "-display", "none", "-no-reboot",
                   "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1", "-serial", f"file:{serial}"]
        with open(Path(tmp) / "qemu.log", "wb") as out:
            proc = procs.spawn(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            pass
        finally:
            procs.stop(proc)
        text = serial.read_text(errors="replace") if serial.exists() else ""
    if "Kernel panic" in text:
        return True, "a KVM guest booted in the probe"
    if "Linux version" in text:
        return False, f"a KVM guest started but did not finish booting within {deadline:.0f} s"
    return False, f"a KVM guest printed nothing within {deadline:.0f} s (broken nested virtualisation?)"

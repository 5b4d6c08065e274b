"""QEMU command line and machine lifecycle (the lifecycle with a stand-in 'QEMU')."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import QemuError
from pytest_syscall_irl.machine.qemu import (MachineConfig, QemuMachine, Sockets, private_socket_dir, qemu_command,
                                     sweep_socket_dirs)


def _config(**kw: object) -> MachineConfig:
    return MachineConfig(kernel=Path("/k/bzImage"), initrd=Path("/k/initrd.gz"), **kw)  # type: ignore[arg-type]


def _value(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def test_command_line_uses_only_unix_sockets_and_no_network() -> None:
    sockets = Sockets(Path("/tmp/sirl-x"))
    cmd = qemu_command(_config(), sockets, Path("/logs/console.log"))
    joined = " ".join(cmd)
    assert "-s" not in cmd and "tcp:" not in joined and "tcp::" not in joined
    assert _value(cmd, "-gdb") == ["chardev:gdb"]
    chardevs = _value(cmd, "-chardev")
    assert all(c.startswith(("socket,", "pipe,")) and "path=/tmp/sirl-x/" in c for c in chardevs)
    assert "logfile=/logs/console.log" in chardevs[0]
    assert _value(cmd, "-nic") == ["none"] and "-nodefaults" in cmd and "-no-reboot" in cmd
    assert "-S" in cmd  # started paused: the console connects before the guest prints


def test_the_kernel_console_is_ttys0_and_the_agent_channel_ttys1_unlogged() -> None:
    # The first -serial is ttyS0 (COM1), the second ttyS1 (COM2): the kernel's console must
    # stay first; the channel has no logfile (QEMU writes serial output a byte per write()).
    cmd = qemu_command(_config(), Sockets(Path("/tmp/sirl-x")), Path("/logs/console.log"))
    assert _value(cmd, "-serial") == ["chardev:con", "chardev:cmd"]
    chardevs = {c.split("id=")[1].split(",")[0]: c for c in _value(cmd, "-chardev")}
    assert chardevs["cmd"] == "pipe,id=cmd,path=/tmp/sirl-x/channel"  # FIFOs channel.in, channel.out
    assert "logfile=/logs/console.log" in chardevs["con"]
    alone = qemu_command(_config(channel=False), Sockets(Path("/tmp/sirl-x")), Path("/logs/console.log"))
    assert _value(alone, "-serial") == ["chardev:con"] and "channel" not in " ".join(alone)


def test_command_line_boot_and_disk() -> None:
    cmd = qemu_command(_config(iso=Path("/i/p.iso"), append="console=ttyS0 x=1", accel="kvm"),
                       Sockets(Path("/tmp/s")), Path("/l"))
    assert _value(cmd, "-kernel") == ["/k/bzImage"] and _value(cmd, "-initrd") == ["/k/initrd.gz"]
    assert _value(cmd, "-append") == ["console=ttyS0 x=1"]
    assert _value(cmd, "-drive") == ["file=/i/p.iso,if=virtio,format=raw,readonly=on,media=disk"]
    assert _value(cmd, "-accel") == ["kvm"]
    assert _value(qemu_command(_config(), Sockets(Path("/s")), Path("/l")), "-drive") == []


def test_private_socket_dir_is_private_and_short() -> None:
    path = private_socket_dir()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert len(str(path / "console.sock")) < 100
        assert path.name.startswith(f"sirl-{os.getpid()}-")
    finally:
        path.rmdir()


def test_socket_dirs_of_dead_owners_are_swept(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # its pid now belongs to nobody
    stale = tmp_path / f"sirl-{child.pid}-abc"
    mine = tmp_path / f"sirl-{os.getpid()}-def"
    other = tmp_path / "sirl-notapid-x"
    for directory in (stale, mine, other):
        directory.mkdir()
    sweep_socket_dirs(tmp_path)
    assert not stale.exists() and mine.exists() and other.exists()


def _fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\nimport sys, time, signal\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_immediate_exit_is_reported_with_stderr(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path, "sys.stderr.write('qemu: could not load kernel\\n'); sys.exit(1)")
    machine = QemuMachine(_config(qemu=qemu), tmp_path / "logs")
    with pytest.raises(QemuError) as info:
        machine.launch()
    assert info.value.exit_code == 1
    assert "could not load kernel" in str(info.value)
    assert "fake-qemu" in str(info.value)  # the command line
    assert not machine.sockets.directory.exists()


def test_shutdown_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    # Never creates its QMP socket and ignores SIGTERM: launch fails, nothing survives.
    qemu = _fake_qemu(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)")
    machine = QemuMachine(_config(qemu=qemu), tmp_path / "logs")
    import pytest_syscall_irl.machine.qemu as q

    old, q.SOCKET_WAIT = q.SOCKET_WAIT, 0.3
    try:
        with pytest.raises(QemuError, match="did not create"):
            machine.launch()
    finally:
        q.SOCKET_WAIT = old
    pid = machine.pid
    assert pid is not None and not machine.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    machine.shutdown()  # idempotent


LEAVER = """
import sys, time
from pytest_syscall_irl.machine.qemu import private_socket_dir
print(private_socket_dir(), flush=True)
if sys.argv[1] == "exit":
    sys.stdin.readline()
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("how, status", [("exit", 0), ("sigterm", -signal.SIGTERM)])
def test_socket_dirs_are_removed_when_their_process_leaves(how: str, status: int) -> None:
    # A machine's shutdown removes its own; this is for those whose shutdown never ran.
    child = subprocess.Popen([sys.executable, "-c", LEAVER, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None and child.stdin is not None
    directory = Path(child.stdout.readline().strip())
    assert directory.is_dir()
    if how == "sigterm":
        child.send_signal(signal.SIGTERM)
    child.stdin.close()  # "exit" leaves now
    assert child.wait(10) == status  # SIGTERM still ends it by SIGTERM
    assert not directory.exists()


def test_socket_dirs_of_zombie_owners_are_swept(tmp_path: Path) -> None:
    # A killed owner nobody has reaped yet still answers kill(pid, 0), but will never clean up.
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stale = tmp_path / f"sirl-{child.pid}-abc"
    stale.mkdir()
    sweep_socket_dirs(tmp_path)
    assert not stale.exists()
    child.wait()


def test_a_console_that_never_connects_to_an_unloadable_state_is_a_state_load_error(tmp_path: Path) -> None:
    # QEMU can exit on a state it cannot load after QMP answered, before the console connects.
    from pytest_syscall_irl.core.errors import ConsoleError, StateLoadError

    config = MachineConfig(kernel=tmp_path / "bzImage", initrd=tmp_path / "initrd", incoming=tmp_path / "state")
    machine = QemuMachine(config, tmp_path / "logs")
    try:
        tail = "--- qemu.log ---\nqemu-system-x86_64: load of migration failed: Operation not supported"
        refused = ConsoleError("cannot connect to the guest console", log_tail=tail)
        assert isinstance(machine.load_failure(refused), StateLoadError)
        other = ConsoleError("cannot connect to the guest console", log_tail="--- qemu.log ---\nsomething else")
        assert machine.load_failure(other) is other
    finally:
        machine.shutdown()


def test_commas_in_paths_are_doubled_for_qemus_option_parser() -> None:
    # A cache under /ci/a,b would otherwise end `file=` at the comma: "Invalid parameter 'b/...'".
    cmd = qemu_command(_config(iso=Path("/a,b/p.iso")), Sockets(Path("/s,t")), Path("/l,m/console.log"))
    assert _value(cmd, "-drive") == ["file=/a,,b/p.iso,if=virtio,format=raw,readonly=on,media=disk"]
    assert "socket,id=con,path=/s,,t/console.sock,server=on,wait=off,logfile=/l,,m/console.log" in \
        _value(cmd, "-chardev")

"""Console framing against a fake guest agent on a unix socket (the protocol of guest/init)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_syscall_irl.machine.console import GuestConsole, clean_output
from pytest_syscall_irl.core.errors import ConsoleError, GuestPanic

Reply = Callable[[str], bytes]


def _agent(server: socket.socket, reply: Reply) -> None:
    try:
        _serve_agent(server.accept()[0], reply)
    except OSError:  # the test closed its side (or the server) first
        pass


def _serve_agent(conn: socket.socket, reply: Reply) -> None:
    conn.sendall(b"[    0.500000] Run /init as init process\r\nSIRL{READY:iso:6.1.0}\r\n")
    buf = b""
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            ident, command = line.decode().split(" ", 1)
            conn.sendall(f"SIRL{{{ident}:B}}\r\n".encode() + reply(command) +
                         f"SIRL{{{ident}:E:{7 if command == 'false7' else 0}}}\r\n".encode())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Reply], GuestConsole]]:
    path = tmp_path / "c.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    consoles: list[GuestConsole] = []

    def start(reply: Reply) -> GuestConsole:
        threading.Thread(target=_agent, args=(server, reply), daemon=True).start()
        console = GuestConsole(path, tmp_path / "transcript", timeout=2)
        console.connect()
        consoles.append(console)
        return console

    yield start
    for console in consoles:
        console.close()
    server.close()


def test_ready_reports_delivery_and_release(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"")
    assert console.wait_ready() == "iso" and console.release == "6.1.0"


def test_output_and_status_are_framed(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"a\r\n\r\nb\r\n" if cmd == "two" else b"")
    console.wait_ready()
    assert console.run("two").output == "a\n\nb\n"
    result = console.run("false7")
    assert result.status == 7 and result.output == ""
    with pytest.raises(ConsoleError, match="status 7"):
        result.check()


def test_kernel_messages_are_dropped_from_output(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"x\r\n[   12.345678] random: crng init done\r\ny\r\n")
    console.wait_ready()
    assert console.run("cmd").output == "x\ny\n"


def test_marker_text_in_output_of_an_earlier_id_does_not_end_a_command(
        serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"SIRL{1:E:0}\r\nreal\r\n" if cmd == "tricky" else b"")
    console.wait_ready()
    console.run("first")  # id 1
    assert console.run("tricky").output == "SIRL{1:E:0}\nreal\n"


def test_started_command_is_drained_before_the_next(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: (cmd + "\r\n").encode())
    console.wait_ready()
    pending = console.start("one")
    assert console.run("two").output == "two\n"
    assert pending.wait().output == "one\n"


def test_panic_raises_at_once_with_its_text(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"[    3.0] BUG: kernel NULL pointer dereference, address: 0\r\n[    3.1] RIP: x\r\n")
    console.wait_ready()
    with pytest.raises(GuestPanic) as info:
        console.run("oops")
    assert "NULL pointer dereference" in str(info.value) and "RIP: x" in str(info.value)


def test_timeout_names_what_it_waited_for(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"")
    with pytest.raises(ConsoleError, match="READY"):
        console.expect(__import__("re").compile("SIRL\\{READY:nope"), timeout=0.3)


def test_multiline_command_is_refused(serve: Callable[[Reply], GuestConsole]) -> None:
    console = serve(lambda cmd: b"")
    with pytest.raises(ValueError, match="one line"):
        console.start("a\nb")


def test_clean_output() -> None:
    assert clean_output("a\r\r\n[    1.000000] msg\r\nb") == "a\nb"
    # A record the console printed between two bytes of a program's line.
    assert clean_output("hel[    4.503601] sh (82) used greatest stack depth\r\nlo\r\n") == "hello\n"


def test_kernel_messages_inside_the_framing_are_taken_out(tmp_path: Path) -> None:
    # Seen on a defconfig kernel: a late probe message printed right after the begin
    # marker, before its line end, and another in the middle of the command's output.
    console, server = _silent_console(tmp_path)
    conn = server.accept()[0]
    try:
        conn.sendall(b"SIRL{READY:iso:6.1.192}\r\n")
        console.wait_ready(5)
        pending = console.start("echo hello")
        conn.recv(4096)
        conn.sendall(b"SIRL{1:B}[    4.324469] input: ImExPS/2 Generic Explorer Mouse as /devices/platform/i8042"
                     b"/serio1/input/input3\r\n\r\nhel[    4.503601] sh (82) used greatest stack depth: 14056 bytes "
                     b"left\r\nlo\r\nSIRL{1:E:0}")
        result = pending.wait(5)
        assert (result.output, result.status) == ("hello\n", 0)
    finally:
        conn.close()
        console.close()
        server.close()


def test_ready_seen_when_it_is_the_very_first_byte(tmp_path: Path) -> None:
    # With `quiet`, the agent's READY line can be the first thing the guest prints.
    console, server = _silent_console(tmp_path)
    conn = server.accept()[0]
    conn.sendall(b"SIRL{READY:initramfs:6.1.0}\r\n")
    try:
        assert console.wait_ready(5, silence=2) == "initramfs"
    finally:
        conn.close(), console.close(), server.close()


def test_a_guest_that_prints_nothing_is_reported_after_the_silence_bound(tmp_path: Path) -> None:
    console, server = _silent_console(tmp_path)
    start = time.monotonic()
    try:
        with pytest.raises(ConsoleError, match=r"printed nothing at all on its console within 1 s.*--accel=tcg"):
            console.wait_ready(60, silence=1)
        assert time.monotonic() - start < 5
    finally:
        console.close(), server.close()


def _silent_console(tmp_path: Path) -> tuple[GuestConsole, socket.socket]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "quiet.sock"))
    server.listen(1)
    console = GuestConsole(tmp_path / "quiet.sock")
    console.connect()
    return console, server

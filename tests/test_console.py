"""Console framing against a fake guest agent on unix sockets (the protocol of guest/agent.c):
on the shared line (ttyS0) and on the agent's own port (ttyS1)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import ConsoleError, ConsoleTimeout, GuestPanic
from pytest_syscall_irl.machine.channel import BEGIN, END, OUTPUT, FrameParser, encode, end_frame
from pytest_syscall_irl.machine.console import GuestConsole, clean_output

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
        with pytest.raises(ConsoleError,
                           match=r"printed nothing at all on its console within 1 s.*--syscall-irl-accel=tcg"):
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


# --- the command channel (a port of the agent's own) -----------------------------------------


def test_frames_come_out_whole_whatever_the_pieces() -> None:
    stream = encode(BEGIN, 7) + encode(OUTPUT, 7, b"SIRB\x00" * 3) + end_frame(7, -2)
    for size in (1, 5, 12, 13, len(stream)):
        parser = FrameParser()
        frames = [f for i in range(0, len(stream), size) for f in parser.feed(stream[i:i + size])]
        assert [(f.kind, f.ident) for f in frames] == [(BEGIN, 7), (OUTPUT, 7), (END, 7)]
        assert frames[1].payload == b"SIRB\x00" * 3 and frames[2].status == -2 and parser.pending_bytes == 0


def test_a_stream_out_of_step_is_an_error_not_a_guess() -> None:
    with pytest.raises(ConsoleError, match="out of step"):
        FrameParser().feed(b"[    1.000000] not a frame\n")


def test_ten_megabytes_in_small_chunks_are_parsed_in_linear_time() -> None:
    chunk = bytes(range(256)) * 64  # 16 KB, as the agent sends
    stream = b"".join(encode(OUTPUT, 1, chunk) for _ in range(640))
    parser = FrameParser()
    start = time.monotonic()
    size = sum(len(f.payload) for i in range(0, len(stream), 4093) for f in parser.feed(stream[i:i + 4093]))
    assert size == 10 << 20 and time.monotonic() - start < 5


ChannelReply = Callable[[str], tuple[bytes, int]]


class FakeGuest:
    """A fake guest with a kernel console (a unix socket) and an agent on a port of its own
    (two FIFOs, as QEMU's pipe chardev)."""

    def __init__(self, tmp_path: Path, reply: ChannelReply) -> None:
        self.reply = reply
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(tmp_path / "con.sock"))
        self.server.listen(1)
        for suffix in (".in", ".out"):
            os.mkfifo(tmp_path / f"cmd{suffix}")
        # O_RDWR, as QEMU opens them: neither open waits for the other side.
        self.agent_in = os.open(tmp_path / "cmd.in", os.O_RDWR)
        self.agent_out = os.open(tmp_path / "cmd.out", os.O_RDWR)
        self.console = GuestConsole(tmp_path / "con.sock", tmp_path / "transcript", timeout=3,
                                    channel_path=tmp_path / "cmd")
        self.console.connect()
        self.kernel = self.server.accept()[0]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.kernel.sendall(b"[    0.5] Run /init as init process\r\nSIRL{READY:iso:6.1.0:ttyS1}\r\n")

    def _serve(self) -> None:
        buf = b""
        try:
            while data := os.read(self.agent_in, 4096):
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line == b"quit":
                        return
                    ident, command = line.decode().split(" ", 1)
                    output, status = self.reply(command)
                    if status < 0:  # hang: the test plays the kernel
                        continue
                    frames = encode(BEGIN, int(ident)) + b"".join(
                        encode(OUTPUT, int(ident), output[i:i + 16384]) for i in range(0, len(output), 16384))
                    os.write(self.agent_out, frames + end_frame(int(ident), status))
        except OSError:
            pass

    def close(self) -> None:
        self.console.close()
        self.kernel.close()
        self.server.close()
        # Stop the thread before closing its fds: a read on a closed (and reused) fd reads another file.
        os.write(self.agent_in, b"quit\n")
        self.thread.join(5)
        for fd in (self.agent_in, self.agent_out):
            os.close(fd)


@pytest.fixture
def fake_guest(tmp_path: Path) -> Iterator[Callable[[ChannelReply], FakeGuest]]:
    made: list[FakeGuest] = []

    def make(reply: ChannelReply) -> FakeGuest:
        made.append(FakeGuest(tmp_path, reply))
        assert made[-1].console.wait_ready() == "iso" and made[-1].console.channel == "ttyS1"
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def test_channel_output_is_byte_exact_and_never_cleaned(fake_guest: Callable[[ChannelReply], FakeGuest]) -> None:
    hostile = b"[    1.000000] hi\r\nOops: 0000 [#1]\nBUG: x\nSIRL{2:E:0}\n" + end_frame(1, 0) + bytes(range(256))
    guest = fake_guest(lambda cmd: (hostile, 5))
    result = guest.console.run("anything")
    assert (result.data, result.status) == (hostile, 5)
    assert result.output.startswith("[    1.000000] hi\r\nOops: 0000 [#1]\nBUG: x\n")


def test_ten_megabytes_through_the_channel_in_seconds(fake_guest: Callable[[ChannelReply], FakeGuest]) -> None:
    big = bytes(range(256)) * (40 << 10)
    guest = fake_guest(lambda cmd: (big, 0))
    start = time.monotonic()
    assert guest.console.run("cat big", timeout=30).data == big
    assert time.monotonic() - start < 10


def test_a_crash_on_the_kernel_console_ends_the_wait(fake_guest: Callable[[ChannelReply], FakeGuest]) -> None:
    guest = fake_guest(lambda cmd: (b"", -1))
    pending = guest.console.start("hang")
    guest.kernel.sendall(b"[    3.0] BUG: kernel NULL pointer dereference, address: 0\r\n[    3.1] RIP: x\r\n")
    with pytest.raises(GuestPanic) as info:
        pending.wait(5)
    assert "NULL pointer dereference" in str(info.value) and "RIP: x" in str(info.value)


def test_a_kernel_warning_is_recorded_not_raised(fake_guest: Callable[[ChannelReply], FakeGuest]) -> None:
    guest = fake_guest(lambda cmd: (b"ok\n", 0))
    guest.kernel.sendall(b"[    3.0] WARNING: CPU: 0 PID: 1 at kernel/fork.c:1 f+0x1/0x2\r\n")
    deadline = time.monotonic() + 5
    while not guest.console.kernel_warnings and time.monotonic() < deadline:
        time.sleep(0.01)
    assert guest.console.run("echo ok").output == "ok\n"
    assert guest.console.kernel_warnings == ["[    3.0] WARNING: CPU: 0 PID: 1 at kernel/fork.c:1 f+0x1/0x2"]


def test_a_command_that_does_not_end_times_out_with_its_output_so_far(
        fake_guest: Callable[[ChannelReply], FakeGuest]) -> None:
    guest = fake_guest(lambda cmd: (b"", -1))
    pending = guest.console.start("hang")
    assert pending.poll() is None
    with pytest.raises(ConsoleTimeout, match="'hang' did not end within 0 s"):
        pending.wait(0.3)


def test_the_shared_line_reads_a_megabyte_in_linear_time(tmp_path: Path) -> None:
    # Without a search window pexpect took 174 s for 1 MB on the shared line.
    console, server = _silent_console(tmp_path)
    conn = server.accept()[0]
    try:
        conn.sendall(b"SIRL{READY:iso:6.1.0}\r\n")
        console.wait_ready(5)
        pending = console.start("big")
        conn.recv(4096)
        threading.Thread(target=conn.sendall, args=(b"SIRL{1:B}\r\n" + b"x" * 1023 + b"\n" + b"y" * (1 << 20) +
                                                    b"\r\nSIRL{1:E:0}\r\n",), daemon=True).start()
        start = time.monotonic()
        assert len(pending.wait(30).output) == 1024 + (1 << 20) + 1
        assert time.monotonic() - start < 15
    finally:
        conn.close(), console.close(), server.close()

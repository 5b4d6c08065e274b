"""The agent's command channel on the real guest: what a command prints comes back exactly,
whatever it looks like, and only the kernel's own console can say that the kernel crashed.

Each case is one of those seen on the shared console line (ttyS0), where output was
cleaned by pattern: dmesg came back empty, a printk-looking line vanished, a program
printing "Oops" was a kernel crash, a command printing the agent's end markers got
status 0 and cut-off output, and 1 MB of output took minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator

import pytest

from pytest_syscall_irl.core.errors import GuestPanic
from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.lab.guest import Guest, Lab
from pytest_syscall_irl.machine.channel import end_frame
from pytest_syscall_irl.machine.gdbmi import GdbSession

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True, scope="module")
def _reference_kernel() -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")


@pytest.fixture
def framed(guest: Guest) -> Iterator[Guest]:
    """The shared guest, which must talk on its own port (the reference kernel has ttyS1)."""
    assert guest.console.channel == "ttyS1" and guest.console.framed
    yield guest


def test_dmesg_output_comes_through(framed: Guest) -> None:
    result = framed.run("dmesg | tail -3")
    assert result.status == 0 and len(result.output.splitlines()) == 3
    assert all(line.startswith("[") for line in result.output.splitlines())


def test_a_line_that_looks_like_a_kernel_record_comes_through_exactly(framed: Guest) -> None:
    assert framed.run(r"printf '[    1.000000] hi\n'").output == "[    1.000000] hi\n"


def test_carriage_returns_and_missing_line_ends_are_kept(framed: Guest) -> None:
    result = framed.run(r"printf 'a\r\nb\rc'")
    assert result.data == b"a\r\nb\rc" and result.output == "a\r\nb\rc"


def test_binary_output_is_byte_exact(framed: Guest) -> None:
    every_byte = bytes(range(256))
    assert framed.run(f"printf '{_octal(every_byte)}'").data == every_byte


def test_a_program_printing_oops_and_bug_exits_normally(framed: Guest) -> None:
    result = framed.run("echo 'Oops: 0000 [#1]'; echo 'BUG: expected 1 got 2'; "
                        "echo 'Kernel panic - not syncing: no'; exit 4")
    assert result.status == 4
    assert result.output == "Oops: 0000 [#1]\nBUG: expected 1 got 2\nKernel panic - not syncing: no\n"


def _octal(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


def test_fake_end_markers_do_not_end_a_command(framed: Guest) -> None:
    # The shared line's end markers for the next ids, and the channel's own END frame, status
    # 0, for this very command's id: all of it is output; the real status and output come back.
    ident = int(repr(framed.console._ids)[len("count("):-1])  # the id the command gets
    fake = _octal(end_frame(ident, 0))
    command = ("for i in 1 2 3 4 5 6 7 8 9; do printf 'SIRL{%d:E:0}\\n' $((i + " + str(ident) + ")); done; "
               f"printf '{fake}'; echo after; exit 5")
    result = framed.run(command)
    assert result.status == 5
    assert result.data.endswith(end_frame(ident, 0) + b"after\n")
    assert f"SIRL{{{ident + 9}:E:0}}\n" in result.output


def test_stderr_comes_through_the_same_channel(framed: Guest) -> None:
    assert framed.run("echo out; echo err >&2").output == "out\nerr\n"


def test_output_of_1_mb_is_read_in_seconds(framed: Guest) -> None:
    start = time.monotonic()
    result = framed.run("head -c 1048576 /dev/zero | tr '\\0' x", timeout=60)
    assert len(result.data) == 1 << 20 and result.data == b"x" * (1 << 20)
    assert time.monotonic() - start < 20


def test_output_of_10_mb_is_read_in_seconds(fresh_guest: Guest) -> None:
    fresh_guest.run("head -c 10485760 /dev/urandom > /tmp/big").check()
    digest = fresh_guest.run("md5sum /tmp/big").check().output.split()[0]
    start = time.monotonic()
    result = fresh_guest.run("cat /tmp/big", timeout=120)
    elapsed = time.monotonic() - start
    assert len(result.data) == 10 << 20 and hashlib.md5(result.data).hexdigest() == digest
    assert elapsed < 60, f"10 MB took {elapsed:.1f} s"


def test_a_real_kernel_panic_raises_guest_panic_with_the_log_tail(fresh_guest: Guest, gdb: GdbSession) -> None:
    # The reference kernel has no sysrq: the debugger (which holds the idle guest stopped in
    # the kernel) makes it call panic(linux_banner) while a command waits on the channel.
    pending = fresh_guest.console.start("sleep 30")
    assert gdb.registers()["cs"] & 3 == 0, "stopped in user mode: the idle guest should be in the kernel"
    gdb.set_register("rdi", gdb.symbol_address("linux_banner"))
    gdb.set_register("rip", gdb.symbol_address("panic"))
    gdb.resume()
    with pytest.raises(GuestPanic) as info:
        pending.wait(30)
    assert "Kernel panic - not syncing: Linux version" in (info.value.log_tail or "")


@pytest.fixture
def one_port_guest(syscall_irl_lab: Lab) -> Iterator[Guest]:
    """A cold-booted guest of a machine with no second serial port, as a kernel that drives
    one 8250 port gets: its agent finds no ttyS1 and talks on the kernel's console."""
    config = dataclasses.replace(syscall_irl_lab.machine_config(), channel=False)
    guest = syscall_irl_lab._cold_boot(f"one-port-{os.getpid()}", 90, config)
    yield guest
    guest.shutdown()


def test_without_a_second_port_the_agent_falls_back_to_the_shared_line(one_port_guest: Guest) -> None:
    assert one_port_guest.console.channel == "ttyS0" and not one_port_guest.console.framed
    result = one_port_guest.run("echo hi; exit 3")
    assert (result.output, result.status) == ("hi\n", 3)
    # Reading is linear there too (a search window): 200 KB took ~7 s without one.
    start = time.monotonic()
    assert len(one_port_guest.run("head -c 204800 /dev/zero | tr '\\0' x", timeout=120).output) == 204800
    assert time.monotonic() - start < 60

"""What a run tests with, said once for the report header and the JUnit testsuite properties:
the kernel (release, bzImage, vmlinux), QEMU and GDB versions, the accelerator. The pytest
layer writes them (plugin/header.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..lab.settings import kernel_ids

if TYPE_CHECKING:
    from ..lab.settings import LabSettings


def version_line(program: str) -> str:
    """The first line of `program --version` (the program's path if it prints nothing)."""
    out = subprocess.run([program, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else program


def describe(every: Sequence[LabSettings]) -> tuple[list[str], list[tuple[str, str]]]:
    """(header lines, JUnit testsuite properties) of a run with these settings, one per
    kernel under test (QEMU, GDB and the accelerator are the run's)."""
    from ..lab.accel import decide_accel  # QEMU's modules load only when needed
    settings = every[0]
    accel, why = decide_accel(settings)
    qemu, gdb = version_line(settings.qemu), version_line(settings.gdb)
    lines = [
        *(f"syscall-irl: {line}" for line in kernel_lines(every)),
        f"syscall-irl: {qemu}; {gdb}",
        f"syscall-irl: accelerator {accel} ({why})",
        "syscall-irl: guests " + (f"restored from a saved ready guest ({settings.cache / 'snapshots'})"
                                  if settings.snapshots else "cold-booted (--syscall-irl-no-snapshots)"),
    ]
    properties = [*kernel_properties(every), ("syscall-irl qemu", qemu), ("syscall-irl gdb", gdb),
                  ("syscall-irl accelerator", accel)]
    return lines, properties


def kernel_lines(settings: Sequence[LabSettings]) -> list[str]:
    """What a report header says of each kernel under test (named by its id when there are several)."""
    lines = []
    for kernel_id, one in zip(kernel_ids(settings), settings):
        about = one.describe()
        name = f"kernel[{kernel_id}]" if len(settings) > 1 else "kernel"
        lines += [f"{name} {about['release']} ({about['bzImage']})",
                  f"{name} vmlinux {about['vmlinux']}; modules {about['modules']}; payloads via {about['payloads']}",
                  f"{name} {channel_line(one)}"]
    return lines


def channel_line(settings: LabSettings) -> str:
    """Where the guest's commands travel: the agent's own serial port, or (the fallback, for a
    kernel that drives one 8250 port) the kernel's console, where output is cleaned by pattern."""
    from ..kernel.check import command_channel
    if command_channel(settings.kernel) == "ttyS1":
        return "commands on ttyS1, a serial port of their own: output byte-exact"
    return ("commands on ttyS0, shared with the kernel's messages (the kernel drives one 8250 port: "
            "CONFIG_SERIAL_8250_RUNTIME_UARTS < 2): output cleaned by pattern, a program printing Oops or BUG "
            "counts as a kernel crash")


def kernel_properties(settings: Sequence[LabSettings]) -> list[tuple[str, str]]:
    """Each kernel under test and its options as (name, value) pairs, for JUnit's testsuite properties."""
    return [(f"syscall-irl kernel[{kernel_id}] {name}", value)
            for kernel_id, one in zip(kernel_ids(settings), settings) for name, value in one.describe().items()]

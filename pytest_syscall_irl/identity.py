"""What a run tests with, said once for the report header and the JUnit testsuite properties:
the kernel (release, bzImage, vmlinux), QEMU and GDB versions, the accelerator."""

from __future__ import annotations

import subprocess

from .guest import LabSettings, decide_accel


def version_line(program: str) -> str:
    """The first line of `program --version` (the program's path if it prints nothing)."""
    out = subprocess.run([program, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else program


def describe(settings: LabSettings) -> tuple[list[str], list[tuple[str, str]]]:
    """(header lines, JUnit testsuite properties) of a run with these settings."""
    kernel = settings.kernel
    accel, why = decide_accel(settings)
    qemu, gdb = version_line(settings.qemu), version_line(settings.gdb)
    lines = [
        f"syscall-irl: kernel {kernel.release} ({kernel.bzimage.path})",
        f"syscall-irl: vmlinux {kernel.vmlinux.path} ({'DWARF' if kernel.dwarf else 'no DWARF'})",
        f"syscall-irl: {qemu}; {gdb}",
        f"syscall-irl: accelerator {accel} ({why}); payloads via "
        f"{'ISO9660 image' if kernel.payloads_on_iso else 'initramfs (kernel cannot mount the ISO)'}",
        "syscall-irl: guests " + (f"restored from a saved ready guest ({settings.cache / 'snapshots'})"
                                  if settings.snapshots else "cold-booted (--no-snapshots)"),
    ]
    properties = [("syscall-irl kernel", kernel.release), ("syscall-irl bzImage", str(kernel.bzimage.path)),
                  ("syscall-irl vmlinux", str(kernel.vmlinux.path)), ("syscall-irl qemu", qemu),
                  ("syscall-irl gdb", gdb), ("syscall-irl accelerator", accel)]
    return lines, properties

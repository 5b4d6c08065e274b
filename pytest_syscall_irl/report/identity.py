"""What a run tests with, said once for the report header and the JUnit testsuite properties:
the kernel (release, bzImage, vmlinux), QEMU and GDB versions, the accelerator."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
                                  if settings.snapshots else "cold-booted (--no-snapshots)"),
    ]
    properties = [*kernel_properties(every), ("syscall-irl qemu", qemu), ("syscall-irl gdb", gdb),
                  ("syscall-irl accelerator", accel)]
    return lines, properties


def record_suite_properties(config: Any, properties: list[tuple[str, str]]) -> None:
    """Testsuite properties of the JUnit report, if this process writes one (an xdist controller
    does, its workers do not): pytest's LogXML plugin takes them, as record_testsuite_property does."""
    for plugin in config.pluginmanager.get_plugins():
        if hasattr(plugin, "add_global_property"):
            for name, value in properties:
                plugin.add_global_property(name, value)


class HeaderRelay:
    """A pytest plugin for an xdist controller, which collects nothing and so cannot know that a
    kernel is needed: writes the identity the first worker that resolved it sent with a report
    (report.syscall_irl_identity), once, and records its JUnit properties."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.shown = False

    def pytest_runtest_logreport(self, report: Any) -> None:
        identity = getattr(report, "syscall_irl_identity", None)
        if not identity or self.shown:
            return
        self.shown = True
        lines, properties = identity
        record_suite_properties(self.config, [(str(name), str(value)) for name, value in properties])
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            for line in lines:
                reporter.write_line(line)


def kernel_lines(settings: Sequence[LabSettings]) -> list[str]:
    """What a report header says of each kernel under test (named by its id when there are several)."""
    lines = []
    for kernel_id, one in zip(kernel_ids(settings), settings):
        about = one.describe()
        name = f"kernel[{kernel_id}]" if len(settings) > 1 else "kernel"
        lines += [f"{name} {about['release']} ({about['bzImage']})",
                  f"{name} vmlinux {about['vmlinux']}; modules {about['modules']}; payloads via {about['payloads']}"]
    return lines


def kernel_properties(settings: Sequence[LabSettings]) -> list[tuple[str, str]]:
    """Each kernel under test and its options as (name, value) pairs, for JUnit's testsuite properties."""
    return [(f"syscall-irl kernel[{kernel_id}] {name}", value)
            for kernel_id, one in zip(kernel_ids(settings), settings) for name, value in one.describe().items()]

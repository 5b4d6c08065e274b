"""The report header (kernel, QEMU, GDB, accelerator) and its JUnit testsuite properties,
written once per run, and relayed from an xdist worker when only a worker knows that a
kernel is needed. The lines themselves are the report layer's (report/identity.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from .markers import timeout_line
from .settings import explicit, settings_of, settings_resolved

HEADER_SENT_KEY = pytest.StashKey[bool]()
KERNEL_TAKEN_KEY = pytest.StashKey[str]()  # --kernel belongs to another plugin or conftest: its dest
Identity = tuple[list[str], list[tuple[str, str]]]  # (header lines, JUnit testsuite properties)


def announce(config: pytest.Config) -> list[str]:
    """The header lines; the same identity goes into the JUnit report's testsuite properties."""
    lines, properties = identity(config)
    record_suite_properties(config, properties)
    return lines


def identity(config: pytest.Config) -> Identity:
    from ..report.identity import describe
    lines, properties = describe(settings_of(config))
    return [*lines, *run_lines(config)], properties


def run_lines(config: pytest.Config) -> list[str]:
    """How each test is bounded, and whether --kernel is ours."""
    lines = [line for line in [timeout_line(config)] if line]
    taken = config.stash.get(KERNEL_TAKEN_KEY, None)
    if taken is not None:
        lines.append(f"syscall-irl: --kernel is another plugin's or conftest's option (dest {taken!r}), "
                     f"not ours: use --syscall-irl-kernel")
    return lines


def forward_header(config: pytest.Config, report: pytest.TestReport) -> None:
    """An xdist controller collects nothing, so without options it cannot know that a kernel
    is needed: a worker that resolved the settings sends the header with its first report."""
    if not hasattr(config, "workerinput") or explicit(config) or config.stash.get(HEADER_SENT_KEY, False):
        return
    if settings_resolved(config):
        config.stash[HEADER_SENT_KEY] = True
        report.syscall_irl_identity = identity(config)  # type: ignore[attr-defined]


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

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.shown = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
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

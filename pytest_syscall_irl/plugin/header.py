"""The report header (each kernel and its identity, QEMU, GDB, accelerator), its JUnit testsuite
properties and suite name, and the header of the HTML page, written once per run, and relayed
from an xdist worker when only a worker knows that a kernel is needed. The lines themselves are
the report layer's (report/identity.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .markers import timeout_line
from .settings import baseline_of, explicit, settings_of, settings_resolved

if TYPE_CHECKING:
    from ..report.identity import RunIdentity

HEADER_SENT_KEY = pytest.StashKey[bool]()
KERNEL_TAKEN_KEY = pytest.StashKey[str]()  # --kernel belongs to another plugin or conftest: its dest
Identity = tuple[list[str], list[tuple[str, str]]]  # (header lines, JUnit testsuite properties)
# pytest's default junit_suite_name: any other value is the user's, and is kept.
PYTEST_SUITE_NAME = "pytest"


def announce(config: pytest.Config) -> list[str]:
    """The header lines; the same identity goes into the JUnit report (testsuite properties and
    suite name) and the HTML page."""
    found = identity(config)
    record_identity(config, found)
    return found.lines


def identity(config: pytest.Config) -> RunIdentity:
    from ..report.identity import describe
    found = describe(settings_of(config))
    base_lines, base_properties = baseline_identity(config)
    return found._replace(lines=[*found.lines, *base_lines, *run_lines(config)],
                          properties=[*found.properties, *base_properties])


def baseline_identity(config: pytest.Config) -> Identity:
    """The --syscall-irl-baseline kernel in the header (its paths and its identity, as for a
    kernel under test), and its JUnit properties (`syscall-irl baseline <name>`)."""
    from ..report.identity import kernel_identity
    baseline = baseline_of(config)
    if baseline is None:
        return [], []
    about, identity = baseline.describe(), kernel_identity(baseline.kernel)
    lines = [f"syscall-irl: baseline {about['release']} ({about['bzImage']}); vmlinux {about['vmlinux']}; "
             f"modules {about['modules']}", *identity.header_lines("syscall-irl: baseline")]
    plain = {name: about[name] for name in ("release", "bzImage", "modules")}
    plain["vmlinux"] = str(baseline.kernel.vmlinux.path)  # a property is the path, nothing appended
    plain.update(identity.properties())
    return lines, [(f"syscall-irl baseline {name}", value) for name, value in plain.items()]


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
        report.syscall_irl_identity = tuple(identity(config))  # type: ignore[attr-defined]  # plain, for execnet


def record_identity(config: Any, found: RunIdentity) -> None:
    """Where this process writes reports (an xdist controller does, its workers do not): the JUnit
    report's testsuite properties and, unless the user set junit_suite_name, its suite name
    (pytest's LogXML plugin takes both: it writes them at the end), and the HTML page's header."""
    user_named = config.getini("junit_suite_name") != PYTEST_SUITE_NAME
    for plugin in config.pluginmanager.get_plugins():
        if hasattr(plugin, "add_global_property"):
            for name, value in found.properties:
                plugin.add_global_property(name, value)
            if hasattr(plugin, "suite_name") and not user_named:
                plugin.suite_name = found.suite_name
    page = config.pluginmanager.get_plugin("syscall_irl_html")
    if page is not None:
        page.header = list(found.lines)


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
        from ..report.identity import RunIdentity
        lines, properties, suite_name = identity  # a list, after the trip from the worker
        found = RunIdentity([str(line) for line in lines], [(str(name), str(value)) for name, value in properties],
                            str(suite_name))
        record_identity(self.config, found)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            for line in found.lines:
                reporter.write_line(line)

"""--syscall-irl-kcidb=FILE: the run as KCIDB I/O JSON (report/kcidb.py builds it).

Where a test runs (an xdist worker, or the only process) its reports are tagged with what the
controller cannot know: which kernel the test ran on, that kernel's identity, its KCIDB path
(`report.syscall_irl_kcidb`). The controller collects the tagged reports with their failure
class (the section plugin/artifacts.py writes) and writes the file at the session's end. Only
tests that use a kernel are KCIDB tests: the others test nothing of a kernel.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ..core.errors import ConfigError, FailureClass

KCIDB_OPTION = "syscall_irl_kcidb"
ORIGIN_OPTION = "syscall_irl_kcidb_origin"
CLASS_SECTION = "syscall-irl failure class"  # plugin/artifacts.py: ("syscall-irl failure class", "crash (call)")


def add_options(group: Any) -> None:
    """The options, in the plugin's group."""
    from ..report.kcidb import DEFAULT_ORIGIN
    group.addoption("--syscall-irl-kcidb", dest=KCIDB_OPTION, metavar="FILE",
                    help="write the run as KCIDB I/O JSON (checkouts, builds, tests), for `kcidb-submit`.")
    group.addoption("--syscall-irl-kcidb-origin", dest=ORIGIN_OPTION, metavar="NAME", default=DEFAULT_ORIGIN,
                    help=f"the KCIDB origin of those objects: your CI system's name in KCIDB, lowercase letters, "
                         f"digits and underscores (default: {DEFAULT_ORIGIN}).")


def configure(config: pytest.Config, controller: bool) -> None:
    """Check the origin (a usage error names the rule) and, in the process that writes
    reports, register the writer."""
    path = config.getoption(KCIDB_OPTION, None)
    if not path:
        return
    from ..report.kcidb import check_origin
    try:
        origin = check_origin(str(config.getoption(ORIGIN_OPTION)))
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from exc
    if controller:
        target = (config.invocation_params.dir / path).resolve()
        config.pluginmanager.register(KcidbWriter(target, origin), "syscall_irl_kcidb")


def tag(item: pytest.Item, report: pytest.TestReport) -> None:
    """Tag a report of a test that used a kernel (with --syscall-irl-kcidb): its kernel's id and
    identity, its KCIDB path."""
    from .fixtures import LAB_FIXTURE
    from .settings import settings_of, settings_resolved
    config = item.config
    if not config.getoption(KCIDB_OPTION, None) or LAB_FIXTURE not in getattr(item, "fixturenames", ()):
        return
    if not settings_resolved(config):
        return
    from ..lab.settings import kernel_ids
    from ..report.identity import kernel_identity
    from ..report.kcidb import architecture_of
    settings = settings_of(config)
    callspec = getattr(item, "callspec", None)
    index = int(callspec.params.get(LAB_FIXTURE, 0)) if callspec is not None else 0
    kernel, kernel_id = settings[index].kernel, kernel_ids(settings)[index]
    architecture = architecture_of(kernel.vmlinux.machine)
    report.syscall_irl_kcidb = {  # type: ignore[attr-defined]
        "kernel": kernel_id, "identity": kernel_identity(kernel).as_dict(), "architecture": architecture,
        "path": item_path(item, architecture, kernel_id if callspec is not None and LAB_FIXTURE in callspec.params
                          else None)}


def item_path(item: pytest.Item, architecture: str, kernel_id: str | None) -> str:
    """The test's KCIDB path: file stem, classes, function name and its parameters' id, without
    the kernel's id (the build says which kernel)."""
    from ..report.kcidb import kcidb_path
    scopes = item.nodeid.split("::")[1:-1]
    name = getattr(item, "originalname", None) or item.name
    callspec = getattr(item, "callspec", None)
    parameters = without_kernel(callspec.id, kernel_id) if callspec is not None else ""
    return kcidb_path(architecture, Path(str(item.path)).stem, scopes, name, parameters)


def without_kernel(parameters: str, kernel_id: str | None) -> str:
    """A parameter id ("6.1.192@1-clock_gettime") without the kernel's part; pytest joins the
    ids of parameters with "-" in the order they were parametrized."""
    if not kernel_id:
        return parameters
    if parameters == kernel_id:
        return ""
    if parameters.startswith(f"{kernel_id}-"):
        return parameters[len(kernel_id) + 1:]
    if parameters.endswith(f"-{kernel_id}"):
        return parameters[:-len(kernel_id) - 1]
    return parameters.replace(f"-{kernel_id}-", "-", 1)


def failure_class(report: pytest.TestReport) -> FailureClass | None:
    """The class plugin/artifacts.py wrote under a failed report; None if it wrote none (a
    report the plugin never saw: an xdist worker that crashed)."""
    for title, text in report.sections:
        if title == CLASS_SECTION:
            try:
                return FailureClass(text.split(" ", 1)[0])
            except ValueError:
                return None
    return None


def message(report: pytest.TestReport, found: FailureClass | None) -> str:
    """A failed report's message; for a crash, with the tail of the guest's console."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(getattr(crash, "message", "") or report.longreprtext)
    if found is FailureClass.CRASH:
        text += "".join(f"\n\n{title}\n{body}" for title, body in report.sections if "console" in title)
    return text


class KcidbWriter:
    """A pytest plugin for the process that writes reports: collects the tagged reports and
    writes the KCIDB JSON at the session's end."""

    def __init__(self, path: Path, origin: str) -> None:
        from ..report.kcidb import KcidbRun
        self.path = path
        self.origin = origin
        self.run = KcidbRun()
        # Unique per run: the same test of the same build in another run is another KCIDB test.
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:12]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        tagged = getattr(report, "syscall_irl_kcidb", None)
        if not tagged:
            return
        from ..report.identity import KernelIdentity
        from ..report.kcidb import PhaseReport
        found = failure_class(report) if report.failed else None
        self.run.add(PhaseReport(
            report.nodeid, str(tagged["kernel"]), KernelIdentity.from_dict(tagged["identity"]), str(tagged["path"]),
            report.when or "", report.outcome, found, message(report, found) if report.failed else "",
            getattr(report, "start", None), float(report.duration), str(tagged["architecture"])))

    def pytest_sessionfinish(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.write_text(json.dumps(self.run.data(self.origin, self.run_id), indent=1) + "\n")
        os.replace(staging, self.path)  # a CI step never reads half a report

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(f"syscall-irl: KCIDB report ({len(self.run.tests)} tests, origin "
                                    f"{self.origin}) in {self.path}")

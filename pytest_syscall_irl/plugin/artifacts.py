"""What a failing test's report shows of what it used: the syscall traces first, whole, then
a few lines of each log (a guest's commands and console, the GDB/MI transcript) with the path
of the whole file, kept for the artifacts. The assertion and its traceback come before all of
them (pytest prints the sections after the failure). The fixtures record each thing as they
hand it out (`evidence(item).add_guest(guest)`), in the order the test got them; nothing is
read unless the test failed. With --syscall-irl-html the traces also ride on the report,
to the xdist controller that writes the page.

Every failed report also says whose fault it is (`failure_class`): a JUnit property
`syscall-irl failure class` and a line under the failure, read by report/junit.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from ..core.errors import FailureClass, classify, tail
from ..report.junit import FAILURE_CLASS_PROPERTY, PYTEST_TIMEOUT
from .settings import valid_options

if TYPE_CHECKING:
    from ..lab.guest import Guest
    from ..machine.gdbmi import GdbSession
    from ..trace.tracer import SyscallTracer

Pairs = list[tuple[str, str]]

# Lines of each log inline: enough to show where it ended; the whole file is named beside
# them and listed in the JUnit XML (a screenful of MI would push the failure off the screen).
INLINE_LINES = 5


class _Shown(Protocol):
    """One thing a test used, as a failure report shows it."""

    leads: bool  # shown before the things that do not (the traces lead, the logs follow)

    def sections(self) -> Pairs: ...  # (title, text): below the failure

    def properties(self) -> Pairs: ...  # (name, path): JUnit XML has no room for sections, it gets the paths


def _log_tail(path: Path | None, text: str) -> str:
    """The last INLINE_LINES lines of a log, after the path of the whole of it."""
    return f"(last {INLINE_LINES} lines; all of it: {path or 'not kept'})\n" + tail(text, INLINE_LINES)


@dataclass
class _GuestLogs:
    guest: Guest
    leads: bool = False
    under_test: bool = True  # False: the baseline's guest, whose crash is not the tested kernel's

    def sections(self) -> Pairs:
        origin = "restored from snapshot, boot log not included" if self.guest.restored else "booted"
        console, commands = self.guest.machine.console_log, self.guest.transcript
        return [(f"guest {self.guest.name} commands (tail)", _log_tail(commands, _read(commands))),
                (f"guest {self.guest.name} console, {origin} (tail)", _log_tail(console, _read(console)))]

    def properties(self) -> Pairs:
        return [(f"syscall-irl {self.guest.name} logs", str(self.guest.machine.log_dir))]


@dataclass
class _Transcript:
    session: GdbSession
    leads: bool = False

    def sections(self) -> Pairs:
        return [("gdb/mi transcript (tail)",
                 _log_tail(self.session.transcript_path, self.session.transcript_tail(INLINE_LINES)))]

    def properties(self) -> Pairs:
        path = self.session.transcript_path
        return [] if path is None else [("syscall-irl gdb/mi transcript", str(path))]


@dataclass
class _Traces:
    tracer: SyscallTracer
    leads: bool = True
    title: str = "syscall trace"  # "baseline syscall trace": two kernels' traces are each numbered from 1

    def sections(self) -> Pairs:
        return [(f"{self.title} {number}", str(trace)) for number, trace in enumerate(self.tracer.traces, start=1)]

    def properties(self) -> Pairs:
        return []


@dataclass
class Evidence:
    """What one test used that explains its failure, in the order it got them."""

    shown: list[_Shown] = field(default_factory=list)
    tracers: list[SyscallTracer] = field(default_factory=list)

    def add_guest(self, guest: Guest, *, under_test: bool = True) -> None:
        self.shown.append(_GuestLogs(guest, under_test=under_test))

    def add_gdb(self, session: GdbSession) -> None:
        self.shown.append(_Transcript(session))

    def add_tracer(self, tracer: SyscallTracer, title: str = "syscall trace") -> None:
        self.shown.append(_Traces(tracer, title=title))
        self.tracers.append(tracer)

    def kernel_crash(self) -> str | None:
        """A crash line the kernel log of a guest of the kernel under test saw while this test
        used it (a panic under a trace reaches the test as GDB's "target exited", not as the
        console's GuestPanic). The baseline's guests do not count: lab/baseline.py blames
        their failures on the harness."""
        guests = (thing.guest for thing in self.shown if isinstance(thing, _GuestLogs) and thing.under_test)
        return next((line for guest in guests if (line := guest.console.kernel_crash) is not None), None)

    def in_report_order(self) -> list[_Shown]:
        """What leads (the traces), then the rest, each in the order the test got them."""
        return sorted(self.shown, key=lambda thing: not thing.leads)


EVIDENCE_KEY = pytest.StashKey[Evidence]()


def evidence(item: pytest.Item) -> Evidence:
    """The test's record of what it used (the fixtures add to it)."""
    return item.stash.setdefault(EVIDENCE_KEY, Evidence())


def attach(item: pytest.Item, report: pytest.TestReport) -> None:
    """A failed test's report gets the logs of what it used; with --syscall-irl-html, the
    test's traces ride on its call report."""
    used = item.stash.get(EVIDENCE_KEY, None)
    if used is None:
        return
    options = valid_options(item.config)
    if report.when == "call" and used.tracers and options is not None and options.html:
        from ..report.html import trace_record
        report.syscall_irl_traces = [trace_record(trace)  # type: ignore[attr-defined]
                                     for tracer in used.tracers for trace in tracer.traces]
    if report.failed:
        for thing in used.in_report_order():
            report.sections.extend(thing.sections())
            item.user_properties.extend(thing.properties())


def failure_class(report: pytest.TestReport, call: pytest.CallInfo[None],
                  used: Evidence | None = None) -> FailureClass:
    """Whose fault a failed report is. A kernel that crashed (on its log) while the test used
    its guest is a crash, whatever error reached the test. Else, in the test's body an
    assertion (or pytest.fail) is a violation; in a fixture (setup, teardown) only a crash
    blames the kernel: the rest is the harness's, assertions included. pytest-timeout's
    signal method fails the test with pytest.fail: that is the harness's deadline, not a
    verdict."""
    exc = call.excinfo.value if call.excinfo is not None else None
    if used is not None and used.kernel_crash() is not None:
        return FailureClass.CRASH
    if exc is None:
        return FailureClass.HARNESS
    if isinstance(exc, pytest.fail.Exception):
        found = FailureClass.HARNESS if PYTEST_TIMEOUT in str(exc) else FailureClass.VIOLATION
    else:
        found = classify(exc)
    if report.when != "call" and found is FailureClass.VIOLATION:
        return FailureClass.HARNESS
    return found


def record_failure_class(item: pytest.Item, report: pytest.TestReport, call: pytest.CallInfo[None]) -> None:
    """Put a failed report's class where JUnit (a property) and a reader (a section) find it."""
    if not report.failed:
        return
    used = item.stash.get(EVIDENCE_KEY, None)
    found = failure_class(report, call, used)
    crash = used.kernel_crash() if used is not None else None
    why = f"; the kernel log: {crash.strip()}" if found is FailureClass.CRASH and crash else ""
    report.sections.append(("syscall-irl failure class", f"{found.value} ({report.when}){why}"))
    prop = (FAILURE_CLASS_PROPERTY, found.value)
    item.user_properties.append(prop)  # JUnit writes the properties of the teardown report, made later...
    if report.when == "teardown":
        report.user_properties.append(prop)  # ...except for a failure of the teardown itself


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""

"""Comparing what two kernels do on the syscall roads: the sides `syscall-irl diff` takes on
each kernel (trace/survey.py), their comparison, and the report as text, JSON and HTML (side
by side); and the shipped suite's outcomes on each kernel (`suite_outcomes`), compared test by
test. A side's records hold values as they mean something (`symbol+0xoff`, `pt_regs+0xoff`,
"(direct-map pointer)"), so two builds of the same code compare equal; the raw values beside
them count the values that differ only in build-specific addresses. No pytest here.
"""

from __future__ import annotations

import html
import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import shipped
from ..core.errors import SyscallIrlError
from ..trace.survey import Side
from .junit import case_class

if TYPE_CHECKING:
    from ..kernel.artifacts import Kernel

SCHEMA_VERSION = 1
SAME, CHANGED = 0, 1  # exit statuses: nothing differs but build-specific addresses / the path or a result changed


@dataclass(frozen=True)
class Difference:
    """One thing that differs: where (a road, "facts", "suite"), what, and both sides."""

    where: str
    what: str
    base: str
    patched: str

    def line(self) -> str:
        return f"{self.where}: {self.what}: {self.base} -> {self.patched}"


def _taken(record: Mapping[str, Any]) -> list[str]:
    return [name for name, stage in record["stages"].items() if stage["taken"]]


def _stages_difference(where: str, base: list[str], patched: list[str]) -> Difference:
    """The stages one side took and the other did not (the whole lists where only their order differs)."""
    if set(base) == set(patched):
        return Difference(where, "stages taken, in order", ", ".join(base), ", ".join(patched))
    return Difference(where, "stages taken only by one side", ", ".join(n for n in base if n not in patched) or "none",
                      ", ".join(n for n in patched if n not in base) or "none")


def _compare_values(where: str, stage: str, base: Mapping[str, Any], patched: Mapping[str, Any]
                    ) -> tuple[list[Difference], int]:
    found, build_specific = [], 0
    for key in sorted(set(base["values"]) | set(patched["values"])):
        a, b = base["values"].get(key, "(absent)"), patched["values"].get(key, "(absent)")
        if a != b:
            found.append(Difference(where, f"{stage} {key}", a, b))
        elif base["raw"].get(key) != patched["raw"].get(key):
            build_specific += 1
    if base["backtrace"] != patched["backtrace"]:
        found.append(Difference(where, f"{stage} backtrace", " <- ".join(base["backtrace"]),
                                " <- ".join(patched["backtrace"])))
    return found, build_specific


ROAD_FIELDS = ("entry", "exit", "handler", "table_handler", "comm", "status", "output")


def compare_road(where: str, base: Mapping[str, Any], patched: Mapping[str, Any]) -> tuple[list[Difference], int]:
    """The differences of one road (the way in and out first, then stage by stage) and how
    many values differ only in build-specific addresses."""
    if "error" in base or "error" in patched:
        a, b = base.get("error", "traced"), patched.get("error", "traced")
        return ([Difference(where, "trace", a, b)] if a != b else []), 0
    found = [Difference(where, name, str(base[name]), str(patched[name]))
             for name in ROAD_FIELDS if base[name] != patched[name]]
    if _taken(base) != _taken(patched):
        found.append(_stages_difference(where, _taken(base), _taken(patched)))
    build_specific = 0
    for name, stage in base["stages"].items():
        other = patched["stages"].get(name)
        if stage["taken"] and other is not None and other["taken"]:
            more, specific = _compare_values(where, name, stage, other)
            found += more
            build_specific += specific
    return found, build_specific


@dataclass
class DiffReport:
    """The comparison of two sides; `status` is the command's exit status."""

    base: Side
    patched: Side
    differences: list[Difference] = field(default_factory=list)
    build_specific: int = 0

    @property
    def status(self) -> int:
        return CHANGED if self.differences else SAME

    def summary(self) -> str:
        if self.differences:
            return f"{len(self.differences)} difference(s) in the path or its results"
        return (f"no differences except build-specific addresses ({self.build_specific} value(s) equal by "
                f"meaning differ in their raw addresses: per build or per boot)")


def compare(base: Side, patched: Side) -> DiffReport:
    """Compare the facts, every road and (if both ran it) the suite's outcomes."""
    report = DiffReport(base, patched)
    for name in sorted(set(base.facts) | set(patched.facts)):
        a, b = (side.facts.get(name, {"text": "(absent)", "raw": ""}) for side in (base, patched))
        if a["text"] != b["text"]:
            report.differences.append(Difference("facts", name, a["text"], b["text"]))
        elif a["raw"] != b["raw"]:
            report.build_specific += 1
    for road in [*base.roads, *(name for name in patched.roads if name not in base.roads)]:
        absent = {"error": "(not traced)"}
        found, specific = compare_road(road, base.roads.get(road, absent), patched.roads.get(road, absent))
        report.differences += found
        report.build_specific += specific
    report.differences += changed_outcomes(base.suite, patched.suite)
    return report


# --- who each kernel is, and the suite's outcomes on it -------------------------------------


def side_identity(kernel: Kernel) -> dict[str, str]:
    """Who the kernel is, for the report's header (report/identity.py's identity, known parts)."""
    from .identity import kernel_identity
    known = {key: value for key, value in kernel_identity(kernel).as_dict().items() if value is not None}
    return {"release": str(known.pop("release")), **{key: str(value) for key, value in known.items()},
            "vmlinux": str(kernel.vmlinux.path)}


def suite_outcomes(kernel: Kernel, modules: str | None, extra: Sequence[str], directory: Path,
                   say: Callable[[str], None]) -> dict[str, str]:
    """Run the shipped suite on *kernel* (pytest in a subprocess, its output to stderr, its
    JUnit report in *directory*): test id -> outcome."""
    junit = directory / f"suite-{os.getpid()}-{time.monotonic_ns()}.xml"
    command = [sys.executable, "-m", "pytest", str(shipped.SUITES_DIR), "-p", "no:cacheprovider", "-q",
               f"--syscall-irl-kernel={kernel.bzimage.path}", f"--syscall-irl-vmlinux={kernel.vmlinux.path}",
               f"--junitxml={junit}", *extra]
    command += [f"--syscall-irl-modules={modules}"] if modules else []
    say("running " + shlex.join(command))
    status = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sys.stderr).returncode
    if status not in (0, 1):  # 1: some tests failed, an outcome to compare; anything else is no outcome
        raise SyscallIrlError(f"the suite did not run on {kernel.bzimage.path}: pytest exited {status}",
                              command=command, exit_code=status)
    return case_outcomes(junit)



def case_outcomes(junit: Path) -> dict[str, str]:
    """Test id -> passed, skipped or failed (<class>) of each testcase of a JUnit report."""
    found: dict[str, str] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure = case_class(case)
        found[name] = (f"failed ({failure.value})" if failure is not None
                       else "skipped" if case.find("skipped") is not None else "passed")
    return found


def changed_outcomes(base: Mapping[str, str], patched: Mapping[str, str]) -> list[Difference]:
    """The tests whose outcome changed (a test on one side only: "not run" on the other)."""
    return [Difference("suite", test, base.get(test, "not run"), patched.get(test, "not run"))
            for test in sorted(set(base) | set(patched)) if base.get(test, "not run") != patched.get(test, "not run")]


# --- rendering ---------------------------------------------------------------------------


def _who(side: Side) -> str:
    """The kernel in one line: release, bzImage, the short digests and git commit it has."""
    who = side.identity
    parts = [who.get("release", "?"), who.get("bzimage", who.get("bzImage", "?"))]
    parts += [f"{key.removesuffix('_sha256')} {who[key][:12]}" for key in ("bzimage_sha256", "config_sha256")
              if who.get(key)]
    parts += [f"git {who['git_commit'][:12]}" + (" (dirty)" if who.get("git_dirty") == "True" else "")
              ] if who.get("git_commit") else []
    return ", ".join(parts)


def render_text(report: DiffReport) -> str:
    """The report for a terminal: both kernels, each road in a line, the differences, what was left out."""
    lines = [f"base:    {_who(report.base)}", f"patched: {_who(report.patched)}", "roads:"]
    changed = {d.where for d in report.differences}
    for road, record in report.base.roads.items():
        other = report.patched.roads.get(road, {"error": "(not traced)"})
        lines.append(f"  {road:<15} {_road_line(record)}  |  {_road_line(other)}"
                     + ("  DIFFERS" if road in changed else ""))
    lines.append(f"facts: {len(report.base.facts)} read" + ("  DIFFER" if "facts" in changed else ", the same"))
    if report.differences:
        lines += [f"differences ({len(report.differences)}):", *(f"  {d.line()}" for d in report.differences)]
    left_out = {**report.base.left_out, **report.patched.left_out}
    if left_out:
        lines += ["left out (per boot):", *(f"  {what}: {why}" for what, why in sorted(left_out.items()))]
    lines.append(f"result: {report.summary()}")
    return "\n".join(lines)


def _road_line(record: Mapping[str, Any]) -> str:
    if "error" in record:
        return f"not traced: {record['error']}"
    return f"entry {record['entry'] or '?'}, exit {record['exit'] or '?'}"


def render_json(report: DiffReport) -> dict[str, Any]:
    """The report for machines (docs/diff.md describes the fields)."""
    return {"schema": SCHEMA_VERSION, "status": report.status, "summary": report.summary(),
            "build_specific": report.build_specific,
            "differences": [d.__dict__ for d in report.differences],
            "base": report.base.to_json(), "patched": report.patched.to_json()}


_STYLE = ("body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
          "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top;font-family:monospace;font-size:12px}"
          ".differs{background:#fdd}.untaken{color:#888}")


def _cell(stage: Mapping[str, Any] | None, other: Mapping[str, Any] | None) -> str:
    if stage is None:
        return "<td class='untaken'>(not recorded)</td>"
    if not stage["taken"]:
        return f"<td class='untaken'>not taken: {html.escape(stage['note'])}</td>"
    # Marked where the other side took the stage too and holds another value there.
    theirs = other["values"] if other is not None and other["taken"] else stage["values"]
    parts = [f"<span{' class=differs' if theirs.get(key) != value else ''}>{html.escape(key)}="
             f"{html.escape(value)}</span>" for key, value in stage["values"].items()]
    return "<td>" + "<br>".join(parts) + "</td>"


def _road_table(road: str, base: Mapping[str, Any], patched: Mapping[str, Any]) -> str:
    rows = [f"<h2>{html.escape(road)}</h2><table><tr><th>stage</th><th>base</th><th>patched</th></tr>"]
    if "error" in base or "error" in patched:
        rows += [f"<tr><td>trace</td><td>{html.escape(str(base.get('error', 'traced')))}</td>"
                 f"<td>{html.escape(str(patched.get('error', 'traced')))}</td></tr>"]
        return "".join(rows) + "</table>"
    for name in ROAD_FIELDS[:2]:
        mark = " class=differs" if base[name] != patched[name] else ""
        rows.append(f"<tr{mark}><td>{name}</td><td>{html.escape(str(base[name]))}</td>"
                    f"<td>{html.escape(str(patched[name]))}</td></tr>")
    for stage in dict.fromkeys([*base["stages"], *patched["stages"]]):
        a, b = base["stages"].get(stage), patched["stages"].get(stage)
        rows.append(f"<tr><td>{html.escape(stage)}</td>{_cell(a, b)}{_cell(b, a)}</tr>")
    return "".join(rows) + "</table>"


def render_html(report: DiffReport) -> str:
    """The report as one HTML page: the kernels, the differences, each road side by side."""
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>syscall-irl diff</title>"
            f"<style>{_STYLE}</style></head><body><h1>syscall-irl diff</h1>"
            f"<p>base: {html.escape(_who(report.base))}<br>patched: {html.escape(_who(report.patched))}</p>"
            f"<p><b>{html.escape(report.summary())}</b></p>")
    items = "".join(f"<li>{html.escape(d.line())}</li>" for d in report.differences)
    facts = ["<h2>facts</h2><table><tr><th>fact</th><th>base</th><th>patched</th></tr>"]
    for name in sorted(set(report.base.facts) | set(report.patched.facts)):
        a, b = (side.facts.get(name, {"text": "(absent)"})["text"] for side in (report.base, report.patched))
        facts.append(f"<tr{' class=differs' if a != b else ''}><td>{html.escape(name)}</td>"
                     f"<td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>")
    roads = [_road_table(road, record, report.patched.roads.get(road, {"error": "(not traced)"}))
             for road, record in report.base.roads.items()]
    return head + (f"<ul>{items}</ul>" if items else "") + "".join(facts) + "</table>" + "".join(roads) + \
        "</body></html>\n"

"""A self-contained HTML page of a run's syscall traces: each traced syscall drawn as its path
through the stages (taken ones as boxes joined by arrows, skipped ones greyed with the reason),
with a register table per trace (a column per stage), under the run's header (each kernel's
release, banner, bzImage and config hashes, git commit; QEMU, GDB). A value that changed since
the previous stage is tinted; a value the failed test's message names (the expected or actual value an
invariant compared) is outlined in red.

Rendered from the generic shape of a trace only (`trace.stages`: name, taken, note, registers,
pt_regs), so new roads, exits and stages show up without changes here. No pytest, no scripts,
no external files: the page opens anywhere, a CI artifact included.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Registers are compared and reported in hex; decimals (line numbers, counts) would be noise.
HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; } h3 { font-size: 1em; }
.test { border-top: 2px solid #ccc; padding-top: .5em; }
.trace { overflow-x: auto; }
.outcome { font-weight: bold; padding: 0 .4em; border-radius: 3px; }
.passed .outcome { background: #d4f4d4; } .failed .outcome { background: #f8d0d0; }
.message { white-space: pre-wrap; font-family: monospace; background: #fff4f4; padding: .5em; }
.path { display: flex; flex-wrap: wrap; align-items: center; gap: .3em; margin: .8em 0; }
.stage { border: 2px solid #357; border-radius: 6px; padding: .3em .6em; background: #eef4fb; }
.stage.skipped { border-style: dashed; border-color: #aaa; background: #f4f4f4; color: #888; }
.stage .note { display: block; font-size: .8em; max-width: 16em; }
.arrow { color: #357; font-size: 1.3em; }
table.regs { border-collapse: collapse; font-family: monospace; font-size: 12px; }
table.regs th, table.regs td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.regs th { background: #f0f0f0; }
td.changed { background: #fff3c4; }
td.compared { outline: 3px solid #d22; outline-offset: -3px; font-weight: bold; }
.legend span { margin-right: 1em; padding: 0 .4em; }
ul.run { font-family: monospace; font-size: 12px; list-style: none; padding: .5em; background: #f6f6f6; }
"""


@dataclass
class TracedTest:
    """One test of the run: its outcome, the failure message and the traces it took."""

    nodeid: str
    outcome: str
    message: str = ""
    traces: list[dict[str, Any]] = field(default_factory=list)


def trace_record(trace: Any) -> dict[str, Any]:
    """A trace as plain data (picklable, JSON-able: it crosses from xdist workers)."""
    stages = trace.stages.values() if isinstance(trace.stages, Mapping) else trace.stages
    return {
        "title": str(getattr(trace, "command", "")),
        "handler": str(getattr(trace, "handler", "")),
        "stages": [{
            "name": str(stage.name),
            "taken": bool(stage.taken),
            "note": str(getattr(stage, "note", "") or ""),
            "registers": {str(k): int(v) for k, v in (getattr(stage, "registers", None) or {}).items()},
            "pt_regs": {str(k): int(v) for k, v in (getattr(stage, "pt_regs", None) or {}).items()},
        } for stage in stages],
    }


def compared_values(message: str) -> set[int]:
    """The hex numbers a failure message names: the values an invariant compared."""
    return {int(text, 16) for text in HEX.findall(message)}


def _path(stages: list[dict[str, Any]]) -> str:
    boxes = []
    for stage in stages:
        kind = "stage" if stage["taken"] else "stage skipped"
        note = f'<span class="note">{html.escape(stage["note"])}</span>' if stage["note"] else ""
        boxes.append(f'<div class="{kind}" data-stage="{html.escape(stage["name"])}">'
                     f'{html.escape(stage["name"])}{note}</div>')
    return '<div class="path">' + '<span class="arrow">&rarr;</span>'.join(boxes) + "</div>"


def _table(stages: list[dict[str, Any]], key: str, compared: set[int]) -> str:
    shown = [stage for stage in stages if stage["taken"] and stage[key]]
    if not shown:
        return ""
    names: list[str] = []
    for stage in shown:
        names += [name for name in stage[key] if name not in names]
    head = "".join(f"<th>{html.escape(stage['name'])}</th>" for stage in shown)
    rows = []
    for name in names:
        cells, previous = [], None
        for stage in shown:
            value = stage[key].get(name)
            classes = [c for c, on in (("changed", previous is not None and value is not None and value != previous),
                                       ("compared", value is not None and value in compared)) if on]
            text = "" if value is None else f"{value:#x}"
            cells.append(f'<td class="{" ".join(classes)}">{text}</td>')
            previous = value if value is not None else previous
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f'<table class="regs" data-kind="{key}"><tr><th>{key}</th>{head}</tr>{"".join(rows)}</table>'


def _trace(number: int, trace: dict[str, Any], compared: set[int]) -> str:
    title = f"trace {number}: {trace['title']}" + (f" ({trace['handler']})" if trace["handler"] else "")
    return (f'<div class="trace"><h3>{html.escape(title)}</h3>{_path(trace["stages"])}'
            f'{_table(trace["stages"], "registers", compared)}{_table(trace["stages"], "pt_regs", compared)}</div>')


def _test(record: TracedTest) -> str:
    compared = compared_values(record.message) if record.outcome == "failed" else set()
    message = f'<div class="message">{html.escape(record.message)}</div>' if record.message else ""
    traces = "".join(_trace(n, trace, compared) for n, trace in enumerate(record.traces, start=1))
    return (f'<section class="test {html.escape(record.outcome)}"><h2>{html.escape(record.nodeid)} '
            f'<span class="outcome">{html.escape(record.outcome)}</span></h2>{message}{traces}</section>')


def _header(lines: Sequence[str]) -> str:
    """The run's header lines (what was tested with what), as the terminal showed them."""
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line.removeprefix('syscall-irl: '))}</li>" for line in lines)
    return f'<ul class="run">{items}</ul>'


def render(records: Iterable[TracedTest], title: str = "syscall-irl: syscall paths",
           header: Sequence[str] = ()) -> str:
    """The whole page."""
    body = "".join(_test(record) for record in records if record.traces)
    legend = ('<p class="legend"><span class="changed" style="background:#fff3c4">changed since the previous '
              'stage</span><span style="outline:3px solid #d22">a value the failure message names</span></p>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{_header(header)}{legend}"
            f"{body or '<p>No test took a syscall trace.</p>'}</body></html>")


def write(path: Path, records: Iterable[TracedTest], header: Sequence[str] = ()) -> None:
    """Write the page (creating its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(records, header=header))


class HtmlPage:
    """A pytest plugin (registered by the plugin with --syscall-irl-html, never in xdist workers):
    collects the traces each test's report carries (report.syscall_irl_traces) and writes the page,
    with the run's header lines (set by the plugin's header, plugin/header.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[TracedTest] = []
        self.header: list[str] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        traces = getattr(report, "syscall_irl_traces", None)
        if traces:
            crash = getattr(report.longrepr, "reprcrash", None)
            self.records.append(TracedTest(report.nodeid, report.outcome, str(getattr(crash, "message", "")), traces))

    def pytest_sessionfinish(self) -> None:
        write(self.path, self.records, self.header)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(f"syscall-irl: syscall paths drawn in {self.path}")

"""Reading a run's JUnit XML the way a CI or `git bisect run` acts on it.

Result classes (as KernelCI and tuxrun tell them apart):
- an invariant violated: a test *failure* whose exception is not one of the harness's own errors
  (an AssertionError naming expected and actual values; a kernel panic, GuestPanic, counts here);
- the harness or the environment broke: a test *error* (a fixture could not boot the guest or
  start GDB), or a failure raised as one of our errors (QemuError, GdbError, ConsoleError, ...).

The plugin records, for each failed test, the paths of its guest and GDB/MI logs as testcase
properties named `syscall-irl ...`; `failed_logs` reads them back for a CI to keep as artifacts.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from ..core import errors

# pytest writes `message="<qualified exception name>: <text>"` on a <failure>.
HARNESS_FAILURE = re.compile(rf"^{re.escape(errors.__name__)}\.\w+Error\b")
LOG_PROPERTY_PREFIX = "syscall-irl "


@dataclass(frozen=True)
class Outcomes:
    """How many tests of a report violated an invariant, and how many the harness could not judge."""

    violated: int
    broken: int


def _testcases(junit: Path) -> list[ElementTree.Element]:
    try:
        return list(ElementTree.parse(junit).getroot().iter("testcase"))
    except (OSError, ElementTree.ParseError):
        return []


def outcomes(junit: Path) -> Outcomes:
    """Count invariant violations and harness breakage in a JUnit report (0, 0 if unreadable)."""
    violated = broken = 0
    for case in _testcases(junit):
        for failure in case.findall("failure"):
            if HARNESS_FAILURE.match(failure.get("message", "")):
                broken += 1
            else:
                violated += 1
        broken += len(case.findall("error"))
    return Outcomes(violated, broken)


def failed_logs(junit: Path) -> dict[str, list[Path]]:
    """Test id -> the log paths the plugin recorded for each failed or erroring test."""
    found: dict[str, list[Path]] = {}
    for case in _testcases(junit):
        if case.find("failure") is None and case.find("error") is None:
            continue
        paths = [Path(prop.get("value", "")) for prop in case.iter("property")
                 if prop.get("name", "").startswith(LOG_PROPERTY_PREFIX)]
        if paths:
            found[f"{case.get('classname', '')}.{case.get('name', '')}"] = paths
    return found


def collect_failed_logs(junit: Path, destination: Path) -> int:
    """Copy each failed test's logs to destination/<test id>/; returns how many paths were copied."""
    copied = 0
    for test, paths in failed_logs(junit).items():
        target = destination / re.sub(r"[^\w.\-\[\]]+", "_", test)
        for path in paths:
            if path.is_dir():
                shutil.copytree(path, target / path.name, dirs_exist_ok=True)
            elif path.is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            else:
                continue
            copied += 1
    return copied

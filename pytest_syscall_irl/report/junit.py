"""Reading a run's JUnit XML the way a CI or `git bisect run` acts on it.

Each failed or erroring testcase says whose fault it is in a property the plugin writes,
`syscall-irl failure class`: violation (the kernel broke an invariant), crash (the kernel
panicked, or never reached the guest's agent), harness (GDB, QEMU, the console, our own
code, a deadline of ours; says nothing about the kernel) or usage (see core/errors.py,
`FailureClass`). A report written without the plugin (or a case the plugin never saw: an
xdist worker that crashed) is classified from the failure message: an assertion is a
violation, one of our errors has its class, anything else is the harness's.

The plugin also records, for each failed test, the paths of its guest and GDB/MI logs as
testcase properties named `syscall-irl ...`; `failed_logs` reads them back for a CI to
keep as artifacts.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from ..core import errors
from ..core.errors import FailureClass

LOG_PROPERTY_PREFIX = "syscall-irl "
FAILURE_CLASS_PROPERTY = "syscall-irl failure class"
# pytest writes `message="<qualified exception name>: <text>"` on a <failure>.
OUR_ERROR = re.compile(rf"^{re.escape(errors.__name__)}\.(\w+)\b")
ASSERTION = re.compile(r"^(AssertionError\b|assert )")
PYTEST_TIMEOUT = "from pytest-timeout"
# A case with several failures (a call failure and a teardown error) is judged by the worst.
WORST_FIRST = (FailureClass.CRASH, FailureClass.VIOLATION, FailureClass.USAGE, FailureClass.HARNESS)
_VALUES = {cls.value for cls in FailureClass}


@dataclass(frozen=True)
class Outcomes:
    """How many testcases of a report passed, were skipped, or failed in each failure class."""

    violated: int = 0
    crashed: int = 0
    broken: int = 0  # the harness broke
    misused: int = 0  # usage errors
    passed: int = 0
    skipped: int = 0

    @property
    def kernel_at_fault(self) -> int:
        """Testcases that blame the kernel: violations and crashes."""
        return self.violated + self.crashed


def _testcases(junit: Path) -> list[ElementTree.Element]:
    try:
        return list(ElementTree.parse(junit).getroot().iter("testcase"))
    except (OSError, ElementTree.ParseError):
        return []


def _class_of_message(element: ElementTree.Element) -> FailureClass:
    """The class of a <failure> or <error> the plugin did not classify, from its message."""
    message = element.get("message", "")
    ours = OUR_ERROR.match(message)
    if ours:
        error = getattr(errors, ours.group(1), None)
        if isinstance(error, type) and issubclass(error, errors.SyscallIrlError):
            return error.failure_class
        return FailureClass.HARNESS
    if element.tag == "failure" and (ASSERTION.match(message) or
                                     (message.startswith("Failed:") and PYTEST_TIMEOUT not in message)):
        return FailureClass.VIOLATION  # an assert, or pytest.fail() in a test's body
    return FailureClass.HARNESS


def case_class(case: ElementTree.Element) -> FailureClass | None:
    """The failure class of one testcase; None if it passed or was skipped."""
    failures = case.findall("failure") + case.findall("error")
    if not failures:
        return None
    found = {FailureClass(prop.get("value")) for prop in case.iter("property")
             if prop.get("name") == FAILURE_CLASS_PROPERTY and prop.get("value") in _VALUES}
    found = found or {_class_of_message(failure) for failure in failures}
    return next(cls for cls in WORST_FIRST if cls in found)


def outcomes(junit: Path) -> Outcomes:
    """Count a JUnit report's testcases by outcome and failure class (all 0 if unreadable)."""
    counts = dict.fromkeys(("violated", "crashed", "broken", "misused", "passed", "skipped"), 0)
    names = {FailureClass.VIOLATION: "violated", FailureClass.CRASH: "crashed", FailureClass.HARNESS: "broken",
             FailureClass.USAGE: "misused"}
    for case in _testcases(junit):
        cls = case_class(case)
        if cls is not None:
            counts[names[cls]] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return Outcomes(**counts)


def failed_logs(junit: Path) -> dict[str, list[Path]]:
    """Test id -> the log paths the plugin recorded for each failed or erroring test."""
    found: dict[str, list[Path]] = {}
    for case in _testcases(junit):
        if case.find("failure") is None and case.find("error") is None:
            continue
        paths = [Path(prop.get("value", "")) for prop in case.iter("property")
                 if prop.get("name", "").startswith(LOG_PROPERTY_PREFIX) and prop.get("name") != FAILURE_CLASS_PROPERTY]
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

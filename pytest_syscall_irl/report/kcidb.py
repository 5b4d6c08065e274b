"""A run as KCIDB I/O data, the JSON that KernelCI's results database takes (`kcidb-submit`):
one checkout and one build per kernel under test, one test per (test, kernel).

    run = KcidbRun()
    run.add(PhaseReport("t.py::test_x", "6.1.192", identity, "syscall_irl.x86_64.t.test_x", "call", "passed"))
    data = run.data(origin="my_ci", run_id="20261205-abcd")

- checkout: the kernel's git commit when its bzImage was built in a kernel git work tree
  (`KernelIdentity.git_commit`), else an id made from the bzImage's SHA-256; a dirty tree's
  checkout is the commit plus that hash (the changes are not in any commit);
- build: the bzImage, by its SHA-256 (the same bzImage tested by two CI jobs is one build),
  architecture, compiler and banner, the config's hash in `misc` (the schema has no field for a
  hash; `config_url` must be a URL);
- test: path `syscall_irl.<arch>.<file>.<test>[.<parameters>]`, status by failure class
  (violation and crash FAIL, harness and usage ERROR, skipped SKIP, passed PASS), the failure's
  message as `log_excerpt` (a crash's carries the kernel's log).

Written against schema v5.3 of the `kcidb-io` package (its patterns are copied here, and
`tests/test_kcidb.py` checks them and validates the data against the package). No pytest here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..core.errors import ConfigError, FailureClass
from ..kernel.artifacts import banner_compiler
from .identity import KernelIdentity
from .junit import WORST_FIRST

SCHEMA_VERSION = {"major": 5, "minor": 3}
DEFAULT_ORIGIN = "syscall_irl"
ORIGIN_PATTERN = re.compile(r"^[a-z0-9_]+$")
# A test path: dot-separated components of these characters.
PATH_COMPONENT_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")
LOG_EXCERPT_MAX = 16384  # characters
# KCIDB's architecture names are the kernel's ARCH values.
ARCHITECTURES = {"EM_X86_64": "x86_64", "EM_386": "i386", "EM_AARCH64": "arm64", "EM_RISCV": "riscv"}
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")  # a SHA-1 commit (the schema has no room for SHA-256 ones)


def check_origin(origin: str) -> str:
    """The origin, if KCIDB takes it; ConfigError naming the rule otherwise."""
    if not ORIGIN_PATTERN.match(origin):
        raise ConfigError(f"--syscall-irl-kcidb-origin={origin!r}: a KCIDB origin is lowercase letters, digits and "
                          f"underscores only ({ORIGIN_PATTERN.pattern}), the name KCIDB knows your CI system by: "
                          f"e.g. --syscall-irl-kcidb-origin={_origin_like(origin)}")
    return origin


def _origin_like(origin: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", origin.lower()).strip("_") or DEFAULT_ORIGIN


def kcidb_path(architecture: str, file_stem: str, scopes: Iterable[str], name: str, parameters: str = "") -> str:
    """`syscall_irl.x86_64.test_lstar.test_x[.params]`: a KCIDB test path, whose components allow
    only letters, digits, `_` and `-`; anything else in a name or a parameter id (the dots of
    `6.1`, brackets, slashes) becomes `_`."""
    parts = ["syscall_irl", architecture, file_stem, *scopes, name, *([parameters] if parameters else [])]
    return ".".join(PATH_COMPONENT_CHARS.sub("_", part) or "_" for part in parts)


def architecture_of(machine: str) -> str:
    """KCIDB's architecture name for an ELF machine ("EM_X86_64" -> "x86_64")."""
    return ARCHITECTURES.get(machine, re.sub(r"[^a-z0-9_]", "", machine.removeprefix("EM_").lower()))


def status_of(classes: Iterable[FailureClass], skipped: bool) -> str:
    """A test's KCIDB status: FAIL when the kernel is at fault (its worst failure is a violation
    or a crash), ERROR when our harness or the run's setup is, else SKIP or PASS."""
    found = set(classes)
    if found:
        worst = next(cls for cls in WORST_FIRST if cls in found)
        return "FAIL" if worst.kernel_at_fault else "ERROR"
    return "SKIP" if skipped else "PASS"


@dataclass(frozen=True)
class PhaseReport:
    """One report of one test (setup, call or teardown) on one kernel."""

    nodeid: str
    kernel: str  # the kernel's id in the run ("6.1.192", "6.1.192@2")
    identity: KernelIdentity
    path: str  # see kcidb_path
    when: str
    outcome: str  # "passed", "failed", "skipped"
    failure_class: FailureClass | None = None  # of a failed report
    message: str = ""  # of a failed report: for a crash, with the kernel's log
    start: float | None = None  # seconds since the epoch
    duration: float = 0.0
    architecture: str = "x86_64"


@dataclass
class _Test:
    first: PhaseReport
    classes: list[FailureClass] = field(default_factory=list)
    skipped: bool = False
    message: str = ""
    duration: float = 0.0

    def add(self, phase: PhaseReport) -> None:
        self.duration += phase.duration
        if phase.outcome == "skipped":
            self.skipped = True
        if phase.outcome == "failed":
            found = phase.failure_class or FailureClass.HARNESS  # unclassified: it says nothing of the kernel
            worse = not self.classes or WORST_FIRST.index(found) < min(WORST_FIRST.index(c) for c in self.classes)
            self.classes.append(found)
            self.message = phase.message if worse else self.message


class KcidbRun:
    """The tests of a run as their reports arrive, and the KCIDB data they make."""

    def __init__(self) -> None:
        self.tests: dict[str, _Test] = {}
        self.kernels: dict[str, tuple[KernelIdentity, str]] = {}  # kernel id -> identity, architecture

    def add(self, phase: PhaseReport) -> None:
        """Take one report of a test."""
        self.kernels.setdefault(phase.kernel, (phase.identity, phase.architecture))
        self.tests.setdefault(phase.nodeid, _Test(phase)).add(phase)

    def data(self, origin: str, run_id: str) -> dict[str, Any]:
        """The whole report: `{"version": ..., "checkouts": [...], "builds": [...], "tests": [...]}`."""
        check_origin(origin)
        checkouts: dict[str, dict[str, Any]] = {}
        builds: dict[str, dict[str, Any]] = {}
        for identity, architecture in self.kernels.values():
            checkout = kcidb_checkout(origin, identity)
            checkouts.setdefault(checkout["id"], checkout)
            build = kcidb_build(origin, identity, architecture, checkout["id"])
            builds.setdefault(build["id"], build)
        tests = [kcidb_test(origin, run_id, test) for test in self.tests.values()]
        return {"version": dict(SCHEMA_VERSION), "checkouts": list(checkouts.values()),
                "builds": list(builds.values()), "tests": tests}


def kcidb_checkout(origin: str, identity: KernelIdentity) -> dict[str, Any]:
    """The checkout a kernel was built from: its commit, or (outside git) its bzImage."""
    if identity.git_commit is None:
        return {"id": f"{origin}:bzimage-{identity.bzimage_sha256}", "origin": origin,
                "comment": f"{identity.release}: not built in a kernel git work tree; named by its bzImage's sha256"}
    dirty = f"+dirty-{identity.short}" if identity.git_dirty is not False else ""
    checkout: dict[str, Any] = {
        "id": f"{origin}:{identity.git_commit}{dirty}", "origin": origin,
        "comment": f"{identity.release}: {identity.git_text}",
        "misc": {"git_tree": identity.git_tree, "git_dirty": identity.git_dirty}}
    if COMMIT_HASH.match(identity.git_commit):
        checkout["git_commit_hash"] = identity.git_commit
    return _no_nulls(checkout)


def kcidb_build(origin: str, identity: KernelIdentity, architecture: str, checkout_id: str) -> dict[str, Any]:
    """The build a kernel is: its bzImage, by content."""
    build: dict[str, Any] = {
        "id": f"{origin}:{identity.bzimage_sha256}", "origin": origin, "checkout_id": checkout_id,
        "architecture": architecture, "comment": _text(identity.banner), "status": "PASS",
        "misc": {name: value for name, value in identity.as_dict().items() if value is not None}}
    compiler = banner_compiler(identity.banner)
    if compiler:
        build["compiler"] = _text(compiler)
    return build


def kcidb_test(origin: str, run_id: str, test: _Test) -> dict[str, Any]:
    """One test on one kernel."""
    first = test.first
    found: dict[str, Any] = {
        "id": f"{origin}:{run_id}:{first.nodeid}", "origin": origin,
        "build_id": f"{origin}:{first.identity.bzimage_sha256}", "path": first.path,
        "status": status_of(test.classes, test.skipped), "comment": _text(first.nodeid),
        "duration": round(test.duration, 3),
        "misc": {"nodeid": first.nodeid, "kernel": first.kernel}}
    if first.start is not None:
        found["start_time"] = datetime.fromtimestamp(first.start, timezone.utc).isoformat()
    if test.classes:
        found["misc"]["failure_classes"] = sorted({cls.value for cls in test.classes})
        found["log_excerpt"] = excerpt(test.message)
    return found


def excerpt(text: str) -> str:
    """The last LOG_EXCERPT_MAX characters of *text* (a log's end says how it ended), no NULs."""
    text = _text(text)
    return text[-LOG_EXCERPT_MAX:]


def _text(text: str) -> str:
    return text.replace("\0", "")  # the schema's strings hold no NUL


def _no_nulls(data: Mapping[str, Any]) -> dict[str, Any]:
    """KCIDB properties cannot be null: an unknown one is left out."""
    return {key: (_no_nulls(value) if isinstance(value, Mapping) else value) for key, value in data.items()
            if value is not None}

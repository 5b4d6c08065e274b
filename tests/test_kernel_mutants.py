"""Kernel mutants in CI: every check of the entry code in docs/entry-audit.md is removed or
broken by a patch under tests/kernel_mutants/, the patched reference kernel is built (cached,
~20 s each in the reference's build tree) and the suite tests the patch names must fail on it
as violations. A mutant that crashes or does not boot proves nothing and is reported as such;
the reference kernel must pass every named test, or a "caught" mutant proves nothing either.

The static checks hold the patches, the suite and the audit table to one another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import ConfigError, FailureClass, SyscallIrlError
from pytest_syscall_irl.kernel.build import KernelBuild
from pytest_syscall_irl.kernel.mutant import TEST_ID, MutantBuild, MutantPatch
from pytest_syscall_irl.report.junit import case_class

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "tests" / "kernel_mutants"
SUITE = ROOT / "test_suites" / "x86_64"
AUDIT = ROOT / "docs" / "entry-audit.md"
PATCHES = sorted(MUTANTS.glob("*.patch"))
COLUMNS = ("id", "where", "condition", "test", "mutant")
PATCH_NAME = re.compile(r"[\w.-]+\.patch")
# Per suite test and per run: a suite test takes seconds, a cold-booted guest ~2 s more.
TEST_TIMEOUT = 120
# A mutant test waits for the other worker's mutant build (the reference's tree is one), builds
# its own (~20 s; minutes for a patch to a header every file includes) and runs its tests.
BUILD_AND_RUN_TIMEOUT = 1800
# The summary line in conftest.py reads these user properties (they reach the xdist controller).
MUTANT_PROPERTY = "kernel mutant"
REFERENCE_PROPERTY = "kernel mutants reference"
CAUGHT = "caught"


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def audit_rows(text: str) -> list[list[str]]:
    """The rows of the audit tables (cells stripped of blanks and backticks), headers and
    separators left out; a row with the wrong number of cells is kept for the check to name."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip().strip("`").strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and (cells[0].strip("*").lower() == "id" or all(re.fullmatch(r":?-+:?", c) for c in cells)):
            continue
        rows.append(cells)
    return rows


@pytest.fixture(scope="session")
def audit() -> dict[str, list[str]]:
    """Audit table id -> its row (the id column first)."""
    return {row[0]: row for row in audit_rows(AUDIT.read_text())}


@pytest.fixture(scope="session")
def suite_tests() -> set[str]:
    """The suite's test ids relative to test_suites/x86_64, as pytest collects them."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", str(SUITE)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_child_env())
    assert done.returncode == 0, f"collecting the suite failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
    prefix = f"{SUITE.relative_to(ROOT)}/"
    return {line.removeprefix(prefix) for line in done.stdout.splitlines() if line.startswith(prefix)}


# -- static checks -------------------------------------------------------------------------------


def test_there_are_mutants() -> None:
    assert PATCHES, f"no *.patch under {MUTANTS}"


@pytest.mark.parametrize("path", PATCHES, ids=_ids(PATCHES))
def test_the_patch_names_existing_suite_tests(path: Path, suite_tests: set[str]) -> None:
    patch = MutantPatch.load(path)
    missing = [test for test in patch.tests if test not in suite_tests]
    assert not missing, f"{path.name} names tests the suite does not have: {missing}"


@pytest.mark.parametrize("path", PATCHES, ids=_ids(PATCHES))
def test_the_patch_has_its_audit_line(path: Path, audit: dict[str, list[str]]) -> None:
    patch = MutantPatch.load(path)
    row = audit.get(patch.table)
    assert row is not None, f"{path.name}: Table: {patch.table} is no line of {AUDIT.name}"
    assert len(row) == len(COLUMNS), f"{AUDIT.name} line {patch.table} has {len(row)} cells, not {len(COLUMNS)}"
    assert path.name in PATCH_NAME.findall(row[4]), f"{AUDIT.name} line {patch.table} names {row[4]!r} as its " \
        f"mutant, not {path.name}"
    listed = {match.group(0) for match in TEST_ID.finditer(row[3])}
    unlisted = [test for test in patch.tests if test not in listed]
    assert not unlisted, f"{AUDIT.name} line {patch.table} does not list {path.name}'s tests {unlisted}"


def test_every_audit_line_names_a_patch_or_a_reason(suite_tests: set[str]) -> None:
    rows = audit_rows(AUDIT.read_text())
    bad = [f"{row[0]}: {len(row)} cells" for row in rows if len(row) != len(COLUMNS)]
    bad += [f"{row[0]}: no suite test {match.group(0)}" for row in rows if len(row) == len(COLUMNS)
            for match in TEST_ID.finditer(row[3]) if match.group(0) not in suite_tests]
    bad += [f"{row[0]}: the mutant column is empty (name a patch, or say why there is none)"
            for row in rows if len(row) == len(COLUMNS) and not row[4]]
    bad += [f"{row[0]}: {name} is not under tests/kernel_mutants/" for row in rows if len(row) == len(COLUMNS)
            for name in PATCH_NAME.findall(row[4]) if not (MUTANTS / name).is_file()]
    tables = {patch.path.name: patch.table for patch in _parsed(PATCHES)}
    bad += [f"{row[0]}: {name} says Table: {tables[name]}" for row in rows if len(row) == len(COLUMNS)
            for name in PATCH_NAME.findall(row[4]) if tables.get(name, row[0]) != row[0]]
    ids = [row[0] for row in rows]
    bad += [f"{name}: {ids.count(name)} lines" for name in sorted(set(ids)) if ids.count(name) > 1]
    assert not bad, f"{AUDIT.name}: " + "; ".join(bad)


# -- the mutants, built and run ------------------------------------------------------------------


def _parsed(paths: list[Path]) -> list[MutantPatch]:
    """The patches that parse (the others fail their own tests)."""
    parsed = []
    for path in paths:
        try:
            parsed.append(MutantPatch.load(path))
        except ConfigError:
            pass
    return parsed


def _child_env() -> dict[str, str]:
    # A child pytest is no xdist worker, whatever this one is.
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}


def run_suite(bzimage: Path, tests: list[str], directory: Path, snapshots: bool = False) -> dict[str, str]:
    """Run the suite *tests* on *bzimage* in a pytest of its own; test id -> its outcome
    ("passed", "skipped", a failure class, or "not run")."""
    junit = directory / "junit.xml"
    # A mutant's guests boot cold: its snapshots (25 MB per guest variant) would serve no later run.
    command = [sys.executable, "-m", "pytest", *[str(SUITE / test) for test in tests], f"--kernel={bzimage}",
               "-p", "no:cacheprovider", "-o", "addopts=", "-n", "0", "-q", f"--junitxml={junit}",
               f"--timeout={TEST_TIMEOUT}", f"--basetemp={directory / 'run'}",
               *([] if snapshots else ["--syscall-irl-no-snapshots"])]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_child_env(),
                              timeout=TEST_TIMEOUT * (len(tests) + 1))
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:  # pytest killed: its QEMU and GDB die with it (PDEATHSIG)
        partial = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                   for part in (exc.stdout, exc.stderr)]  # bytes even with text=True
        output = "".join(partial) + f"\n(killed after {exc.timeout:.0f} s)"
    (directory / "pytest.out").write_text(output)
    found = _junit_outcomes(junit)
    return {test: found.get(test, "not run") for test in tests}


def _junit_outcomes(junit: Path) -> dict[str, str]:
    """Test id (relative to the suite) -> outcome, from a JUnit report."""
    try:
        cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    except (OSError, ElementTree.ParseError):
        return {}
    found = {}
    for case in cases:
        module = case.get("classname", "").rpartition(".")[2]
        cls = case_class(case)
        outcome = cls.value if cls is not None else "skipped" if case.find("skipped") is not None else "passed"
        found[f"{module}.py::{case.get('name', '')}"] = outcome
    return found


def _verdict(outcomes: dict[str, str]) -> str:
    """caught (every test a violation), crashed (the mutant proves nothing), or not caught."""
    if any(outcome == FailureClass.CRASH.value for outcome in outcomes.values()):
        return "crashed"
    return CAUGHT if all(outcome == FailureClass.VIOLATION.value for outcome in outcomes.values()) else "not caught"


def _record(record_property: Callable[[str, object], None], mutant: MutantBuild, verdict: str) -> None:
    record_property(MUTANT_PROPERTY, json.dumps({"name": mutant.patch.name, "from_cache": mutant.from_cache,
                                                 "build_s": round(mutant.seconds, 1), "verdict": verdict}))


@pytest.mark.timeout(BUILD_AND_RUN_TIMEOUT)
@pytest.mark.parametrize("path", PATCHES, ids=_ids(PATCHES))
def test_the_mutant_is_caught_by_its_tests(path: Path, tmp_path: Path,
                                           record_property: Callable[[str, object], None]) -> None:
    patch = MutantPatch.load(path)
    mutant = MutantBuild(patch)
    try:
        bzimage = mutant.build()
    except SyscallIrlError:
        _record(record_property, mutant, "failed to build")
        raise
    outcomes = run_suite(bzimage, list(patch.tests), tmp_path)
    verdict = _verdict(outcomes)
    _record(record_property, mutant, verdict)
    report = "\n".join(f"  {test}: {outcome}" for test, outcome in outcomes.items())
    assert verdict != "crashed", (
        f"mutant {patch.name} ({bzimage}) crashed or did not boot: it proves nothing (a test must fail by its "
        f"assertion on a running kernel); fix the patch.\n{report}\npytest output: {tmp_path / 'pytest.out'}")
    assert verdict == CAUGHT, (
        f"mutant {patch.name} ({patch.mutant}) is not caught: each named test must fail as a violation\n"
        f"{report}\npytest output: {tmp_path / 'pytest.out'}")


@pytest.mark.timeout(BUILD_AND_RUN_TIMEOUT)
def test_the_reference_passes_every_named_test(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    named = sorted({test for patch in _parsed(PATCHES) for test in patch.tests})
    outcomes = run_suite(KernelBuild().build(), named, tmp_path, snapshots=True)  # the suite's own, reused
    failed = {test: outcome for test, outcome in outcomes.items() if outcome != "passed"}
    record_property(REFERENCE_PROPERTY, "passed" if not failed else f"{len(failed)} of {len(named)} not passed")
    assert not failed, (f"the reference kernel does not pass tests the mutants name, so their failing on a mutant "
                        f"proves nothing: {failed}\npytest output: {tmp_path / 'pytest.out'}")

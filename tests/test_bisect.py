"""`syscall-irl bisect-run` for `git bisect run`: the verdicts, and a real bisection over
Debian's 6.1 source in a throwaway git repository, where one commit breaks the FMASK line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl.cli import bisect
from pytest_syscall_irl.cli import main as cli
from pytest_syscall_irl.core.errors import KernelError
from pytest_syscall_irl.kernel import build as kernel_build
from pytest_syscall_irl.kernel.build import KernelBuild, reference_kernel
from pytest_syscall_irl.kernel.patching import pristine

FAILURE = '<testcase classname="t" name="f{n}"><failure message="{message}">...</failure>{props}</testcase>'
ERROR = '<testcase classname="t" name="e{n}"><error message="failed on setup">...</error>{props}</testcase>'
PASSED = '<testcase classname="t" name="p{n}"/>'
SKIPPED = '<testcase classname="t" name="s{n}"><skipped message="no vDSO clocksource"/></testcase>'
ASSERTION = "AssertionError: FMASK 0x217fd5, expected 0x257fd5"
HARNESS = "pytest_syscall_irl.core.errors.GdbError: GDB exited"
GDB_TIMEOUT = "pytest_syscall_irl.machine.mi_transport.GdbTimeoutError: target did not stop within 30 s"
PANIC = "pytest_syscall_irl.core.errors.GuestPanic: Kernel panic - not syncing"


def _props(cls: str | None) -> str:
    return "" if cls is None else f'<properties><property name="syscall-irl failure class" value="{cls}"/></properties>'


def _junit(path: Path, failures: list[str], errors: int | list[str | None], passed: int = 0, skipped: int = 0,
           classes: list[str | None] | None = None) -> Path:
    """A JUnit report; *classes* gives the plugin's class of each failure (None: no property),
    *errors* a count of unclassified errors or the class of each."""
    classes = classes or [None] * len(failures)
    error_classes = [None] * errors if isinstance(errors, int) else errors
    cases = [FAILURE.format(n=n, message=message, props=_props(cls))
             for n, (message, cls) in enumerate(zip(failures, classes))]
    cases += [ERROR.format(n=n, props=_props(cls)) for n, cls in enumerate(error_classes)]
    cases += [PASSED.format(n=n) for n in range(passed)] + [SKIPPED.format(n=n) for n in range(skipped)]
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    return path


@pytest.mark.parametrize("status, failures, errors, expected", [
    (1, [ASSERTION], 0, bisect.BAD),
    (1, [PANIC], 0, bisect.BAD),             # the kernel under test panicked
    (1, [ASSERTION], 2, bisect.BAD),         # an invariant failed: an error elsewhere does not hide it
    (1, [], 2, bisect.SKIP),                 # only errors: the harness or the environment broke
    (1, [HARNESS], 0, bisect.SKIP),          # GDB died inside the test body: still not the kernel's fault
    (1, [GDB_TIMEOUT], 0, bisect.SKIP),      # a GDB timeout in the body, from a report without classes
    (2, [], 0, bisect.INTERRUPTED),          # interrupted: stop bisecting
    (3, [], 0, bisect.SKIP),                 # pytest's internal error: the harness broke
    (4, [], 0, bisect.ABORT),                # usage error (an option, no QEMU or GDB): the same on every commit
    (5, [], 0, bisect.ABORT),                # no tests collected: the selection matches nothing, on any commit
])
def test_verdicts(tmp_path: Path, status: int, failures: list[str], errors: int, expected: int) -> None:
    assert bisect.verdict(status, _junit(tmp_path / "junit.xml", failures, errors, passed=3)).status == expected


@pytest.mark.parametrize("classes, errors, expected", [
    (["violation"], [], bisect.BAD),
    (["crash"], [], bisect.BAD),
    ([], ["crash"], bisect.BAD),             # a kernel that never booted: the guest fixture errored with BootFailure
    (["harness"], ["harness"], bisect.SKIP),
    (["harness"], ["crash"], bisect.BAD),
    (["usage"], [], bisect.ABORT),
    (["usage"], ["harness"], bisect.SKIP),   # a harness failure could be this commit's: do not abort the bisection
])
def test_verdicts_follow_the_failure_class_the_plugin_recorded(tmp_path: Path, classes: list[str | None],
                                                               errors: list[str | None], expected: int) -> None:
    # The messages would say otherwise: the plugin's class wins.
    junit = _junit(tmp_path / "junit.xml", [HARNESS if cls == "violation" else ASSERTION for cls in classes], errors,
                   passed=2, classes=list(classes))
    assert bisect.verdict(1, junit).status == expected


def test_a_run_where_every_test_skipped_is_skipped_not_good(tmp_path: Path) -> None:
    found = bisect.verdict(0, _junit(tmp_path / "junit.xml", [], 0, skipped=5))
    assert found.status == bisect.SKIP and "nothing was checked" in found.reason
    found = bisect.verdict(0, _junit(tmp_path / "junit.xml", [], 0, passed=1, skipped=5))
    assert found.status == bisect.GOOD and "1 test(s) passed, 5 skipped" in found.reason


def test_git_bisect_aborts_on_the_abort_statuses() -> None:
    # git bisect run: 0 good, 1-127 but 125 bad, 125 skip, anything else aborts.
    assert bisect.ABORT > 127 and bisect.INTERRUPTED > 127 and bisect.SKIP == 125 and 0 < bisect.BAD < 125


def test_a_missing_build_tool_aborts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: ["bison"])
    monkeypatch.setattr(KernelBuild, "build", lambda self: pytest.fail("built without bison"))
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path), [], say=lambda line: None)
    assert result.status == bisect.ABORT and "apt-get install bison" in result.reason


def test_a_missing_ccache_aborts_a_ccache_bisection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: None if name == "ccache" else f"/usr/bin/{name}")
    monkeypatch.setattr(KernelBuild, "build", lambda self: pytest.fail("built without ccache"))
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path, ccache=True), [], say=lambda line: None)
    assert result.status == bisect.ABORT and "apt-get install ccache" in result.reason


def test_a_build_that_fails_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: KernelBuild) -> Path:
        raise KernelError("kernel build step failed", exit_code=2)

    monkeypatch.setattr(KernelBuild, "build", fail)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pytest ran on a kernel that did not build"))
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path), ["-k", "fmask"], say=lambda line: None)
    assert result.status == bisect.SKIP and "did not build" in result.reason


def test_a_directory_that_is_no_kernel_tree_is_skipped(tmp_path: Path) -> None:
    result = bisect.bisect_step(KernelBuild(tmp_path, cache=tmp_path), [], say=lambda line: None)
    assert result.status == bisect.SKIP and "not a Linux source tree" in result.reason


# --- a real history -----------------------------------------------------------------

COMMON_C = Path("arch/x86/kernel/cpu/common.c")
FMASK_FLAGS = "X86_EFLAGS_AC|X86_EFLAGS_ID);"


def _replace(path: Path, text: str) -> None:
    # The tree's files are hard links into the cache's extracted source: never write in place.
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def _git(tree: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _commit(tree: Path, message: str, changes: dict[Path, str]) -> str:
    for path, text in changes.items():
        _replace(tree / path, text)
    _git(tree, "add", "-f", *map(str, changes))  # Debian's .gitignore ignores the whole top level
    _git(tree, "commit", "-q", "-m", message)
    return _git(tree, "rev-parse", "HEAD").strip()


def _history(tree: Path) -> dict[str, str]:
    """Four commits over the source; the third drops AC from the SYSCALL flag mask."""
    original = (tree / COMMON_C).read_text()
    assert original.count(FMASK_FLAGS) == 1, "Debian's 6.1 syscall_init no longer has the expected FMASK line"
    _git(tree, "init", "-q")
    _git(tree, "config", "user.email", "bisect@example.invalid")
    _git(tree, "config", "user.name", "bisect test")
    notes = Path("BISECT-NOTES")
    return {
        "base": _commit(tree, "base: Debian linux-source-6.1", {COMMON_C: original, notes: "base\n"}),
        "benign": _commit(tree, "notes: an unrelated change", {notes: "base\nunrelated\n"}),
        "culprit": _commit(tree, "x86/cpu: drop AC from MSR_SYSCALL_MASK",
                           {COMMON_C: original.replace(FMASK_FLAGS, "X86_EFLAGS_ID);")}),
        "later": _commit(tree, "notes: another unrelated change", {notes: "base\nunrelated\nlater\n"}),
    }


@pytest.mark.integration
@pytest.mark.timeout(2400)  # one full tinyconfig build (~3 min on 2 free cores) and two incremental ones
def test_git_bisect_run_names_the_commit_that_breaks_fmask(tmp_path: Path) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build): its extracted source is reused")
    tree = tmp_path / "linux"
    # Hard links: seconds, no copy of 1.5 GB; git checkout and _replace write new files. The
    # tree is held meanwhile: a kernel mutant patched into it now would be copied as the base.
    source = KernelBuild().debian_tree
    with pristine(source):
        subprocess.run(["cp", "-al", str(source), str(tree)], check=True)
    commits = _history(tree)
    _git(tree, "bisect", "start", commits["later"], commits["base"])
    env = {**os.environ, "SYSCALL_IRL_CACHE": str(tmp_path / "cache")}  # this tree's builds stay out of the cache
    syscall_irl = Path(sys.executable).with_name("syscall-irl")
    run = subprocess.run(["git", "bisect", "run", str(syscall_irl), "bisect-run", "-j2", "--",
                          "--pyargs", "pytest_syscall_irl.suites", "-k", "test_fmask", "--syscall-irl-accel=tcg",
                          "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=3000)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert f"{commits['culprit']} is the first bad commit" in out, out[-4000:]
    log = _git(tree, "bisect", "log")
    assert f"# bad: [{commits['culprit']}]" in log and "# good: [" in log, log


# --- bisect-run's own arguments ---------------------------------------------------------


def _exit_status(argv: list[str]) -> int:
    """What `syscall-irl ARGV` exits with, as git bisect sees it (argparse raises SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as done:
        return int(done.code or 0)


@pytest.mark.parametrize("argv", [
    ["--no-such-option", "--", "-k", "fmask"],   # argparse: unrecognized arguments
    ["-k", "fmask"],                             # pytest's options without the -- before them
    ["--jobs", "0"],                             # argparse: a bad value
    ["--config"],                                # argparse: a missing value
    ["--base", "{tmp}/no-such.config"],          # KernelBuild's own check of --base
    ["--tree", "{tmp}/no-such-tree"],
    ["--config", "{tmp}/no-such-fragment.config"],  # outside the tree: no commit brings it
])
def test_bisect_runs_own_usage_errors_abort_the_bisection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          argv: list[str]) -> None:
    # git bisect run reads 1..127 (but 125) as "bad": argparse's 2 would blame the commit.
    (tmp_path / "linux").mkdir()
    monkeypatch.chdir(tmp_path / "linux")  # the tree being bisected; {tmp} is outside it
    monkeypatch.setattr(KernelBuild, "build", lambda self: pytest.fail("bisect-run went on after a usage error"))
    status = _exit_status(["bisect-run", *[arg.format(tmp=tmp_path) for arg in argv]])
    assert status == 128


def test_other_commands_keep_usage_status_2() -> None:
    assert _exit_status(["kernel", "build", "--jobs", "0"]) == 2
    assert _exit_status(["kernel", "build", "--no-such-option"]) == 2


def test_a_fragment_inside_the_tree_that_this_commit_lacks_skips_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Another commit may have it: the build fails (cannot read it) and the commit is skipped.
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    build = KernelBuild(tmp_path, tmp_path / "kernel" / "configs" / "gone.config", cache=tmp_path / "cache")
    assert bisect.argument_problem(build) is None
    assert bisect.bisect_step(build, [], say=lambda line: None).status == bisect.SKIP


def test_a_bug_of_bisect_run_aborts_rather_than_blames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> bisect.Verdict:
        raise RuntimeError("a bug")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bisect, "bisect_step", broken)
    assert _exit_status(["bisect-run", "--", "-k", "fmask"]) == 128


def test_base_and_config_are_those_of_kernel_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tree = _kernel_tree(tmp_path / "linux")
    base = tmp_path / "saved.config"
    base.write_text("CONFIG_64BIT=y\n")
    monkeypatch.chdir(tmp_path)  # no guest/ here: the shipped fragments are found by name
    flags = ["--tree", str(tree), "--base", str(base), "--config", "guest/kernel.config", "--config", "fred.config",
             "--ccache"]
    shipped = kernel_build.default_fragment().parent
    expected = [shipped / "kernel.config", shipped / "fred.config"]
    assert cli.main(["kernel", "build", "--dry-run", *flags]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.removeprefix("fragment: ") for line in plan if line.startswith("fragment: ")] == \
        [str(path) for path in expected]
    assert f"base: {base}" in plan
    seen: list[KernelBuild] = []
    monkeypatch.setattr(bisect, "bisect_step", lambda build, *a: seen.append(build) or bisect.Verdict(0, "fake"))
    assert cli.main(["bisect-run", *flags, "--", "-k", "fmask"]) == 0
    assert seen[0].fragments == expected and seen[0].base == str(base) and seen[0].ccache


# --- the user's --junitxml ----------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["-k", "x"], None),
    (["--junitxml=out/j.xml"], "{cwd}/out/j.xml"),
    (["--junitxml", "out/j.xml", "-k", "x"], "{cwd}/out/j.xml"),
    (["--junit-xml=/abs/j.xml"], "/abs/j.xml"),
    (["--junitxml=first.xml", "--junit-xml", "last.xml"], "{cwd}/last.xml"),  # pytest keeps the last
    (["--junitxml=$RESULTS/j.xml"], "/results/j.xml"),                    # pytest expands variables
    (["--", "--junitxml=a-file-name"], None),
])
def test_the_users_junitxml_is_found_as_pytest_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        args: list[str], expected: str | None) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESULTS", "/results")
    found = bisect.user_junit(args)
    assert found == (None if expected is None else Path(expected.format(cwd=tmp_path)))


def _kernel_tree(tree: Path) -> Path:
    """Just enough of a kernel tree for its identity (`make kernelversion`), and so a cache key."""
    (tree / "arch" / "x86").mkdir(parents=True)
    (tree / "Makefile").write_text("kernelversion:\n\t@echo 9.9.9\n")
    return tree


def _fake_pytest(monkeypatch: pytest.MonkeyPatch, writes: Path | None, status: int) -> list[list[str]]:
    """pytest as a fake: it writes a report with one violated invariant to *writes*; the commands run."""
    commands: list[list[str]] = []
    real_run = subprocess.run

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        if command[0] != sys.executable:  # make kernelversion, gcc --version: the key
            return real_run(command, **kwargs)
        commands.append(command)
        if writes is not None:
            _junit(writes, [ASSERTION], 0, passed=1, classes=["violation"])
        return subprocess.CompletedProcess(command, status)

    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    monkeypatch.setattr(KernelBuild, "build", lambda self: self.bzimage)
    monkeypatch.setattr(subprocess, "run", run)
    return commands


def test_the_users_junitxml_is_kept_and_judged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "results" / "junit.xml"
    mine.parent.mkdir()
    commands = _fake_pytest(monkeypatch, writes=mine, status=1)
    build = KernelBuild(_kernel_tree(tmp_path / "linux"), cache=tmp_path / "cache")
    result = bisect.bisect_step(build, ["-k", "fmask", f"--junitxml={mine}"], say=lambda line: None)
    assert result.status == bisect.BAD, result.reason  # judged from the report pytest wrote where the user asked
    assert [arg for arg in commands[0] if arg.startswith("--junit")] == [f"--junitxml={mine}"]
    assert mine.is_file()


def test_a_stale_report_at_the_users_path_is_not_judged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "junit.xml"
    _junit(mine, [ASSERTION], 0, classes=["violation"])  # an earlier (bad) step's
    _fake_pytest(monkeypatch, writes=None, status=1)  # this step's pytest failed and wrote nothing
    build = KernelBuild(_kernel_tree(tmp_path / "linux"), cache=tmp_path / "cache")
    assert bisect.bisect_step(build, [f"--junitxml={mine}"], say=lambda line: None).status == bisect.SKIP


def test_without_the_users_junitxml_bisect_run_writes_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = _fake_pytest(monkeypatch, writes=None, status=0)
    build = KernelBuild(_kernel_tree(tmp_path / "linux"), cache=tmp_path / "cache")
    bisect.bisect_step(build, ["-k", "fmask"], say=lambda line: None)
    assert [arg for arg in commands[0] if arg.startswith("--junit")] == \
        [f"--junitxml={build.directory / 'bisect-junit.xml'}"]

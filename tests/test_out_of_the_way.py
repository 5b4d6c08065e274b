"""The plugin stays out of the way of runs that use none of its fixtures, and its settings
come from the ini file, the environment or the command line (each later one wins)."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl.plugin import options

from pytest_syscall_irl.core import procs
from pytest_syscall_irl.core.errors import ConfigError
from pytest_syscall_irl.kernel.artifacts import Kernel
from pytest_syscall_irl.kernel.build import reference_kernel

# A fixture of the test's own that happens to share a name with one of ours.
PLAIN = "import pytest\n\n@pytest.fixture\ndef gdb():\n    return 'own'\n\n\ndef test_plain(gdb):\n    assert gdb\n"
USES_KERNEL = "def test_k(kernel):\n    assert kernel.release\n"


class _Recorder:
    """Stands in for subprocess.Popen and procs.spawn: records every program started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[Any] = []
        real_popen = subprocess.Popen

        def popen(args: Any, *rest: Any, **kwargs: Any) -> Any:
            self.started.append(args)
            return real_popen(args, *rest, **kwargs)

        monkeypatch.setattr(subprocess, "Popen", popen)
        monkeypatch.setattr(procs, "spawn", lambda command, **kw: self.started.append(command))


@pytest.fixture
def no_tools_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> _Recorder:
    """No QEMU or GDB to be found (dpkg-query and gcc are: the reference kernel's cache key needs
    them, so it stays found), and every program started recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dpkg-query", "gcc"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    for option in options.OPTIONS:
        monkeypatch.delenv(option.env, raising=False)
    monkeypatch.delenv(options.SNAPSHOTS_ENV, raising=False)
    return _Recorder(monkeypatch)


@pytest.mark.parametrize("args", [[], ["-v"], ["-k", "plain"]])
def test_unrelated_tests_start_nothing_and_need_no_qemu(pytester: pytest.Pytester, no_tools_on_path: _Recorder,
                                                        args: list[str]) -> None:
    # In-process, so the recorder sees every program the plugin would start (the header
    # used to run dpkg-query, gcc, QEMU and GDB, and failed without QEMU on PATH).
    # A kernel test deselected with -k needs no kernel either.
    pytester.makepyfile(test_plain=PLAIN, **({"test_k": USES_KERNEL} if "-k" in args else {}))
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert no_tools_on_path.started == []
    assert "syscall-irl:" not in result.stdout.str()


@pytest.mark.integration
def test_a_kernel_test_still_resolves_the_settings(pytester: pytest.Pytester, no_tools_on_path: _Recorder) -> None:
    # The other side of the test above: with a kernel fixture collected, the settings are
    # resolved, and here (no QEMU on PATH) that is the usage error naming QEMU.
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    pytester.makepyfile(test_plain=PLAIN, test_k=USES_KERNEL)
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "qemu executable 'qemu-system-x86_64' not found" in result.stderr.str()


@pytest.mark.integration
@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_header_once_a_kernel_test_is_collected(pytester: pytest.Pytester, workers: list[str]) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    pytester.makepyfile(test_plain=PLAIN)
    assert "syscall-irl:" not in pytester.runpytest_subprocess(*workers).stdout.str()
    pytester.makepyfile(test_k=USES_KERNEL)
    result = pytester.runpytest_subprocess(*workers, "--junitxml=junit.xml")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["syscall-irl: kernel 6.*", "syscall-irl: kernel vmlinux *"])
    assert result.stdout.str().count("syscall-irl: kernel vmlinux ") == 1
    # The JUnit report names the kernel: its release as the bzImage's own header gives it.
    suite = ElementTree.parse(pytester.path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    properties = {prop.get("name"): prop.get("value") for prop in suite.iter("property")}
    release = Kernel.load(reference_kernel()).release
    assert properties[f"syscall-irl kernel[{release}] release"] == release
    assert properties["syscall-irl accelerator"] in ("kvm", "tcg")
    assert properties["syscall-irl qemu"].startswith("QEMU emulator version")


# --- where a setting comes from ------------------------------------------------------

KERNEL = options.BY_NAME["kernel"]


def _pick(option: options.Option, cli: str | None = None, env: dict[str, str] | None = None,
          ini: str | None = None) -> options.Setting:
    return options.pick(option, cli=cli, env=env or {}, ini=ini, ini_file=Path("/proj/pytest.ini"),
                        cwd=Path("/cwd"), rootdir=Path("/proj"))


def test_command_line_beats_environment_beats_ini() -> None:
    env = {"SYSCALL_IRL_KERNEL": "env/bzImage"}
    assert _pick(KERNEL, cli="cli/bzImage", env=env, ini="ini/bzImage").origin == "--syscall-irl-kernel"
    assert _pick(KERNEL, env=env, ini="ini/bzImage") == options.Setting("env/bzImage", "$SYSCALL_IRL_KERNEL",
                                                                         Path("/cwd"))
    assert _pick(KERNEL, ini="ini/bzImage") == options.Setting(
        "ini/bzImage", "syscall_irl_kernel in /proj/pytest.ini", Path("/proj"))
    assert not _pick(KERNEL).given


@pytest.mark.parametrize("where, expected", [
    ({"env": {"SYSCALL_IRL_ACCEL": "fast"}}, "$SYSCALL_IRL_ACCEL = 'fast'"),
    ({"ini": "fast"}, "syscall_irl_accel = fast in /proj/pytest.ini"),
])
def test_an_invalid_value_names_where_it_came_from(where: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match="use auto, kvm, tcg") as caught:
        _pick(options.BY_NAME["accel"], **where)
    assert expected in str(caught.value)


def test_snapshots_from_the_environment() -> None:
    assert options.pick_snapshots(cli=None, env={"SYSCALL_IRL_SNAPSHOTS": "0"}, ini=True) == (False,
                                                                                             "$SYSCALL_IRL_SNAPSHOTS")
    assert options.pick_snapshots(cli=False, env={"SYSCALL_IRL_SNAPSHOTS": "yes"}, ini=True)[0] is False
    with pytest.raises(ConfigError, match=r"\$SYSCALL_IRL_SNAPSHOTS = 'maybe'"):
        options.pick_snapshots(cli=None, env={"SYSCALL_IRL_SNAPSHOTS": "maybe"}, ini=True)


def _read(cli: dict[str, Any] | None = None, env: dict[str, str] | None = None,
          ini: dict[str, Any] | None = None) -> options.ResolvedOptions:
    return options.read_options(cli=cli or {}, env=env or {}, ini=ini or {}, ini_file=Path("/proj/pytest.ini"),
                                cwd=Path("/cwd"), rootdir=Path("/proj"))


def test_options_resolve_once_into_one_value_every_hook_reads() -> None:
    resolved = _read(cli={"kernel": ["a/bzImage", "b/bzImage"], "snapshots": False, "html": "page.html"},
                     env={"SYSCALL_IRL_GDB": "/env/gdb"}, ini={"gdb": "ini-gdb", "payloads": "p q", "snapshots": True})
    assert resolved.paths("kernel") == [Path("/cwd/a/bzImage"), Path("/cwd/b/bzImage")]
    assert resolved.value("gdb") == "/env/gdb" and resolved.value("qemu") is None
    assert resolved.paths("payloads") == [Path("/proj/p"), Path("/proj/q")]  # relative to the ini file
    assert resolved.snapshots is False and resolved.explicit and resolved.html == Path("/cwd/page.html")
    assert resolved.given_origin("gdb") == "$SYSCALL_IRL_GDB = /env/gdb"
    assert resolved.given_origin("payloads") == "syscall_irl_payloads = p q in /proj/pytest.ini"
    assert resolved.given_origin("kernel") is None  # the command line names itself


def test_nothing_given_is_not_explicit_and_an_ini_snapshots_key_alone_neither() -> None:
    resolved = _read(ini={"snapshots": False})
    assert not resolved.explicit and resolved.snapshots is False and resolved.values("kernel") == ()
    # A variable left set in the environment wakes nothing: it is read once a test needs a kernel.
    assert not _read(env={"SYSCALL_IRL_SNAPSHOTS": "1", "SYSCALL_IRL_KERNEL": "k"}).explicit


def test_the_first_invalid_value_is_named_with_its_origin() -> None:
    with pytest.raises(ConfigError, match="syscall_irl_accel = fast in /proj/pytest.ini: use auto"):
        _read(ini={"accel": "fast"}, env={"SYSCALL_IRL_SNAPSHOTS": "maybe"})
    with pytest.raises(ConfigError, match=r"\$SYSCALL_IRL_SNAPSHOTS = 'maybe'"):
        _read(env={"SYSCALL_IRL_SNAPSHOTS": "maybe"})


def test_an_error_about_a_setting_names_where_it_was_set() -> None:
    resolved = _read(env={"SYSCALL_IRL_QEMU": "/no/qemu"})
    with pytest.raises(ConfigError, match=r"^\$SYSCALL_IRL_QEMU = /no/qemu: not found$"):
        with resolved.naming_origin("qemu", "gdb"):
            raise ConfigError("not found")


def test_every_option_has_a_prefixed_flag_and_an_environment_twin(pytester: pytest.Pytester) -> None:
    help_text = pytester.runpytest_subprocess("--help").stdout.str()
    for option in options.OPTIONS:
        assert option.flag.startswith("--syscall-irl-") and option.flag in help_text and option.env in help_text
    assert "--syscall-irl-no-snapshots" in help_text
    assert re.search(r"--kernel=KERNEL +same as --syscall-irl-kernel", help_text)
    # No generic name of ours that another plugin or conftest could have.
    generic = re.findall(r"(?<![\w-])--(?:vmlinux|modules|payloads|qemu|gdb|accel|boot-args|no-snapshots)\b", help_text)
    assert generic == []


@pytest.mark.parametrize("how, named", [
    (["--syscall-irl-kernel=cli/bzImage"], "cli/bzImage"),
    (["--kernel=cli/bzImage", "-n", "2"], "cli/bzImage"),
    ([], "env/bzImage"),
])
def test_environment_twin_in_a_real_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                        how: list[str], named: str) -> None:
    pytester.makeini("[pytest]\nsyscall_irl_kernel = ini/bzImage\n")
    monkeypatch.setenv("SYSCALL_IRL_KERNEL", "env/bzImage")
    pytester.makepyfile(test_x=USES_KERNEL)
    result = pytester.runpytest_subprocess(*how)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert named in result.stderr.str() and "ini/bzImage" not in result.stderr.str()


def test_invalid_environment_value_in_a_real_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSCALL_IRL_ACCEL", "fast")
    pytester.makepyfile(test_x=USES_KERNEL)
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "$SYSCALL_IRL_ACCEL = 'fast': use auto, kvm, tcg" in result.stderr.str()


# --- out of other people's runs --------------------------------------------------------

HEAVY_MODULES = ("pytest_syscall_irl.lab", "pytest_syscall_irl.machine", "pytest_syscall_irl.gdb", "pygdbmi",
                 "pexpect", "qemu.qmp")
REPORT_HEAVY = """
import sys

def pytest_sessionfinish(session):
    loaded = sorted(name for name in sys.modules if name.startswith({heavy!r}))
    print("HEAVY", loaded)
"""


def test_a_syscall_irl_variable_left_set_wakes_nothing_in_an_unrelated_run(
        pytester: pytest.Pytester, no_tools_on_path: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    # Set, and even invalid: an unrelated run starts nothing, reads nothing, says nothing.
    monkeypatch.setenv("SYSCALL_IRL_KERNEL", "/no/such/bzImage")
    monkeypatch.setenv("SYSCALL_IRL_ACCEL", "fast")
    monkeypatch.setenv("SYSCALL_IRL_SNAPSHOTS", "0")
    pytester.makeconftest(REPORT_HEAVY.format(heavy=HEAVY_MODULES))
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-s")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    assert "syscall-irl:" not in result.stdout.str() + result.stderr.str()
    assert "HEAVY []" in result.stdout.str()  # none of the modules that drive QEMU or GDB was imported
    no_tools_on_path.started.clear()  # the subprocess run above; in-process, the recorder sees ours
    in_process = pytester.runpytest_inprocess()
    assert in_process.ret == pytest.ExitCode.OK and no_tools_on_path.started == []


def test_a_variable_left_set_is_read_once_a_test_needs_a_kernel(pytester: pytest.Pytester,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSCALL_IRL_KERNEL", "/no/such/bzImage")
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n", test_k=USES_KERNEL)
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "$SYSCALL_IRL_KERNEL = /no/such/bzImage" in result.stderr.str()


# A conftest whose options have the generic names we used to take.
GENERIC_CONFTEST = """
def pytest_addoption(parser):
    for name in ("--gdb", "--qemu", "--accel", "--modules", "--payloads", "--vmlinux", "--boot-args"):
        parser.addoption(name, dest="own_" + name[2:].replace("-", "_"))
    parser.addoption("--kernel", dest="own_kernel")
"""
OWN_OPTIONS = "def test_own(request):\n    assert request.config.getoption('own_kernel') == 'theirs'\n" \
              "    assert request.config.getoption('own_gdb') == 'mine'\n"


def test_a_conftest_with_our_old_generic_options_runs_and_keeps_them(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(GENERIC_CONFTEST)
    pytester.makepyfile(test_own=OWN_OPTIONS)
    result = pytester.runpytest_subprocess("--kernel=theirs", "--gdb=mine")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    help_text = pytester.runpytest_subprocess("--help").stdout.str()
    assert "--syscall-irl-kernel" in help_text and "same as --syscall-irl-kernel" not in help_text


@pytest.mark.integration
def test_when_kernel_is_taken_the_header_says_to_use_the_prefixed_one(pytester: pytest.Pytester) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    pytester.makeconftest(GENERIC_CONFTEST)
    pytester.makepyfile(test_k=USES_KERNEL)
    result = pytester.runpytest_subprocess("--kernel=theirs", "--collect-only")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["syscall-irl: --kernel is another plugin's or conftest's option (dest 'own_kernel'), "
                                 "not ours: use --syscall-irl-kernel"])


# --- a default bound on each test of ours ---------------------------------------------

SHOW_TIMEOUTS = """
def pytest_collection_finish(session):
    for item in session.items:
        marker = item.get_closest_marker("timeout")
        print("TIMEOUT", item.name, marker.args if marker else None)
"""
TIMEOUT_TESTS = """
import pytest

def test_plain():
    pass

def test_k(kernel):
    pass

@pytest.mark.timeout(5)
def test_own_bound(kernel):
    pass

@pytest.fixture
def built_on_ours(guest):
    return guest

def test_indirect(built_on_ours):
    pass
"""


@pytest.mark.integration
@pytest.mark.parametrize("how, ini, env, bounded", [
    ([], "", {}, True),
    (["--timeout=7"], "", {}, False),
    ([], "timeout = 7\n", {}, False),
    ([], "", {"PYTEST_TIMEOUT": "7"}, False),
    (["-p", "no:timeout"], "", {}, False),
])
def test_our_tests_are_bounded_unless_the_user_set_a_timeout(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: list[str], ini: str, env: dict[str, str],
        bounded: bool) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    monkeypatch.delenv("PYTEST_TIMEOUT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makeini("[pytest]\n" + ini)
    pytester.makeconftest(SHOW_TIMEOUTS)
    pytester.makepyfile(test_t=TIMEOUT_TESTS)
    result = pytester.runpytest_subprocess("--collect-only", "-s", *how)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    ours = "(300,)" if bounded else "None"
    result.stdout.fnmatch_lines([f"TIMEOUT test_k {ours}", f"TIMEOUT test_indirect {ours}"], consecutive=False)
    result.stdout.fnmatch_lines(["TIMEOUT test_plain None", "TIMEOUT test_own_bound (5,)"], consecutive=False)
    header = [line for line in result.stdout.lines if "syscall-irl: each test" in line or "not bounded" in line]
    assert len(header) == 1
    if bounded:
        assert header[0].startswith("syscall-irl: each test bounded to 300 s (pytest-timeout), unless")
    elif how[:1] == ["-p"]:
        assert "pytest-timeout is disabled" in header[0]
    else:
        assert "bounded by your pytest-timeout setting" in header[0] and "7" in header[0]

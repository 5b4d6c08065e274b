"""The pytest layer: options, report header, fixtures. Thin by design: the work is in the
domain modules (qemu, console, gdbmi, kernel, image, guest), which import no pytest.

Fixtures: `kernel`, `guest` (shared per xdist worker), `fresh_guest` (the test's own),
`gdb` (attached to the test's guest), `syscall_trace` (one syscall through every stage),
`make_guest` (boot more guests).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..core.errors import ConfigError, SyscallIrlError, tail
from .options import BY_NAME, OPTIONS, SNAPSHOTS_ENV, Setting, given_in_env, pick, pick_snapshots, split_values

if TYPE_CHECKING:
    # Imported where first used: pytest loads this plugin in every run of its environment,
    # and a run with no kernel tests need not pay for QEMU, GDB/MI and pexpect modules.
    from ..machine.gdbmi import GdbSession
    from ..lab.guest import Guest, Lab
    from ..lab.settings import LabSettings
    from ..kernel.artifacts import Kernel
    from ..trace.tracer import SyscallTracer

log = logging.getLogger(__name__)

SETTINGS_KEY = pytest.StashKey["list[LabSettings] | None"]()
USAGE_ERROR_KEY = pytest.StashKey[str]()
USAGE_ERROR_OUTPUT = "syscall_irl_usage_error"
USED_KEY = pytest.StashKey[list[Any]]()
HEADER_SENT_KEY = pytest.StashKey[bool]()
# Every fixture of ours that needs a kernel depends on this one; a test's own fixture that
# happens to be called `gdb` or `kernel` does not.
LAB_FIXTURE = "syscall_irl_lab"
NO_KERNEL = ("no kernel to test: pass --kernel=path/to/arch/x86/boot/bzImage, or build the reference "
             "kernel once with `syscall-irl kernel build` (it is then used by default)")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("syscall-irl", "x86_64 syscall path conformance (QEMU + GDB)")
    for option in OPTIONS:
        extra: dict[str, Any] = {"choices": option.choices} if option.choices else {}
        if option.repeat:
            extra["action"] = "append"
        group.addoption(option.flag, option.long_flag, dest=option.ini, metavar=option.name.upper(),
                        help=f"{option.help} Also ${option.env}.", **extra)
        parser.addini(option.ini, f"default for {option.flag}: {option.help}")
    group.addoption("--no-snapshots", "--syscall-irl-no-snapshots", dest="syscall_irl_snapshots",
                    action="store_false", default=None,
                    help=f"cold-boot every guest instead of restoring a saved ready guest (default: restore). "
                         f"Also ${SNAPSHOTS_ENV}=0.")
    parser.addini("syscall_irl_snapshots", "default for --no-snapshots: restore guests from a saved ready "
                  "guest (true) or cold-boot each (false).", type="bool", default=True)
    group.addoption("--syscall-irl-html", dest="syscall_irl_html", metavar="PATH",
                    help="write an HTML page drawing each traced syscall's path through the stages.")


def _lookup(config: pytest.Config, name: str) -> Setting:
    """The setting *name* with its origin: command line, else environment, else ini file."""
    option = BY_NAME[name]
    cli = config.getoption(option.ini)
    if isinstance(cli, list):  # a repeatable option: see _values
        cli = " ".join(cli)
    return pick(option, cli=cli, env=os.environ, ini=config.getini(option.ini) or None,
                ini_file=config.inipath, cwd=config.invocation_params.dir, rootdir=config.rootpath)


def _setting(config: pytest.Config, name: str) -> tuple[str | None, Path]:
    """(value, base directory for relative paths) of the setting *name*."""
    setting = _lookup(config, name)
    return setting.value, setting.base


def _values(config: pytest.Config, name: str) -> list[str]:
    """A repeatable option's values (each --NAME), else those its environment twin or ini key lists."""
    return split_values(BY_NAME[name], config.getoption(BY_NAME[name].ini), _lookup(config, name))


def _paths(config: pytest.Config, name: str) -> list[Path]:
    """_values as absolute paths (relative to where they were given); "none" stays "none"."""
    base = _setting(config, name)[1]
    return [Path(value) if value == "none" else (base / os.path.expanduser(value)).resolve()
            for value in _values(config, name)]


def _given_origin(config: pytest.Config, name: str) -> str | None:
    """Where a setting not given on the command line came from ("syscall_irl_NAME = VALUE in
    FILE", "$SYSCALL_IRL_NAME = VALUE"), else None."""
    setting = _lookup(config, name)
    if not setting.given or setting.origin.startswith("--"):
        return None
    option = BY_NAME[name]
    if setting.origin.startswith("$"):
        return f"{setting.origin} = {setting.value}"
    return f"{option.ini} = {setting.value} in {config.inipath or 'the ini file'}"


@contextmanager
def _naming_origin(config: pytest.Config, *names: str) -> Iterator[None]:
    """A ConfigError about a setting says which ini file (or environment variable) set it."""
    try:
        yield
    except ConfigError as exc:
        origins = [origin for origin in (_given_origin(config, name) for name in names) if origin]
        if origins:
            raise ConfigError(f"{'; '.join(origins)}: {exc.message}") from None
        raise


def _snapshots(config: pytest.Config) -> bool:
    return pick_snapshots(cli=config.getoption("syscall_irl_snapshots"), env=os.environ,
                          ini=bool(config.getini("syscall_irl_snapshots")))[0]


def resolve_settings(config: pytest.Config) -> list[LabSettings]:
    """Turn the options into validated settings, one per kernel under test; ConfigError
    names the problem, the fix, and the ini file or variable that set it."""
    from ..lab.accel import check_accel
    from ..lab.settings import LabSettings, check_boot_args, pair_by_position
    from ..kernel.artifacts import Kernel
    from ..kernel.build import cache_dir, check_cache_dir, reference_damage, reference_kernel
    from ..kernel.modules import guest_modules
    from ..machine.programs import check_gdb, check_qemu
    cache = check_cache_dir(cache_dir())
    with _naming_origin(config, "kernel", "vmlinux", "modules"):
        bzimages: list[Path | None] = [*_paths(config, "kernel")] or [reference_kernel()]
        if None in bzimages:
            damage = reference_damage()
            raise ConfigError(NO_KERNEL if damage in (None, "not built") else str(damage))
        if len(_values(config, "vmlinux")) == 1 and len(bzimages) > 1:
            raise ConfigError("one --vmlinux for several kernels: give one --vmlinux per --kernel, in the same order")
        vmlinuxes = pair_by_position("vmlinux", _paths(config, "vmlinux"), len(bzimages))
        module_dirs = pair_by_position("modules", _paths(config, "modules"), len(bzimages))
        kernels = [Kernel.load(bzimage, vmlinux) for bzimage, vmlinux in zip(bzimages, vmlinuxes) if bzimage]
        modules = [guest_modules(kernel.release, directory) for kernel, directory in zip(kernels, module_dirs)]
    with _naming_origin(config, "qemu"):
        qemu = check_qemu(_setting(config, "qemu")[0] or "qemu-system-x86_64", cache)[0]
    with _naming_origin(config, "gdb"):
        gdb = check_gdb(_setting(config, "gdb")[0] or "gdb", cache)[0]
    with _naming_origin(config, "boot_args"):
        boot_args = _setting(config, "boot_args")[0] or ""
        try:
            check_boot_args(boot_args)
        except ConfigError as exc:
            raise ConfigError(f"--boot-args: {exc}") from None
    with _naming_origin(config, "payloads"):
        payload_dirs = _payload_dirs(config)
    settings = [LabSettings(kernel=kernel, qemu=qemu, gdb=gdb, accel=_setting(config, "accel")[0] or "auto",
                            boot_args=boot_args, cache=cache, snapshots=_snapshots(config), payload_dirs=payload_dirs,
                            modules=kernel_modules)
                for kernel, kernel_modules in zip(kernels, modules)]
    with _naming_origin(config, "accel"):
        for one in settings:
            check_accel(one)
    return settings


def _payload_dirs(config: pytest.Config) -> tuple[Path, ...]:
    """The --payloads directories (relative to where they were given); each must be a directory."""
    dirs = _paths(config, "payloads")
    for directory in dirs:
        if not directory.is_dir():
            raise ConfigError(f"--payloads: {directory} is not a directory: name a directory of guest programs "
                              f"(NAME.c, NAME.i386.c or static ELF files)")
    return tuple(dirs)


def _explicit(config: pytest.Config) -> bool:
    """True if the user gave an option of ours (command line, environment or ini file)."""
    try:
        return any(_lookup(config, option.name).given for option in OPTIONS) or \
            config.getoption("syscall_irl_snapshots") is not None or given_in_env(os.environ)
    except ConfigError:
        return True  # given, and wrong: resolving the settings reports it


def _settings(config: pytest.Config) -> list[LabSettings]:
    """The settings of this process, one per kernel, resolved on first need; a bad one is
    a usage error."""
    settings = config.stash.get(SETTINGS_KEY, None)
    if settings is None:
        try:
            for option in OPTIONS:  # a bad value anywhere is named with its origin, first
                _lookup(config, option.name)
            settings = resolve_settings(config)
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from exc
        config.stash[SETTINGS_KEY] = settings
    return settings


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SETTINGS_KEY] = None
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from ..report.identity import HeaderRelay
        config.pluginmanager.register(HeaderRelay(config), "syscall_irl_header_relay")
    if config.getoption("syscall_irl_html", None) and not hasattr(config, "workerinput"):
        from ..report.html import HtmlPage
        config.pluginmanager.register(HtmlPage(Path(config.getoption("syscall_irl_html")).resolve()),
                                      "syscall_irl_html")
    config.addinivalue_line("markers", "boot_args(args): boot the test's guests (guest, fresh_guest) with these "
                            "extra kernel arguments, e.g. boot_args(\"pti=on\"); each set has its own snapshot")
    config.addinivalue_line("markers", "cpu(model): boot the test's guests (guest, fresh_guest) with this QEMU CPU "
                            "model, e.g. cpu(\"qemu64,vendor=GenuineIntel\"); each model has its own snapshot")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # Options given explicitly are checked before anything runs, in every process.
    if _explicit(session.config):
        _settings(session.config)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a deselected kernel test needs no kernel
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # Without explicit options, the default kernel is needed only if a test asks for one.
    if not any(LAB_FIXTURE in getattr(item, "fixturenames", ()) for item in items):
        return
    if not hasattr(config, "workerinput"):
        _settings(config)
        return
    # An xdist worker cannot raise a usage error (its controller would report a crash):
    # it runs nothing and stops the session with the message, which the controller turns
    # back into a usage error (pytest_testnodedown, pytest_sessionfinish).
    try:
        _settings(config)
    except pytest.UsageError as exc:
        items[:] = []
        session.shouldstop = f"usage error: {exc}"
        config.workeroutput[USAGE_ERROR_OUTPUT] = str(exc)  # type: ignore[attr-defined]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Several kernels: every test using one runs once per kernel. The lab is a session
    # fixture parametrized by kernel, so pytest groups each kernel's tests and, when a
    # worker moves to the next kernel, tears down the last one's lab, guests and GDB.
    if LAB_FIXTURE not in metafunc.fixturenames or len(_values(metafunc.config, "kernel")) < 2:
        return
    from ..lab.settings import kernel_ids
    ids = kernel_ids(_settings(metafunc.config))
    metafunc.parametrize(LAB_FIXTURE, range(len(ids)), ids=ids, indirect=True, scope="session")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    message = getattr(node, "workeroutput", {}).get(USAGE_ERROR_OUTPUT)
    if message:
        node.config.stash[USAGE_ERROR_KEY] = message


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.stash.get(USAGE_ERROR_KEY, None):
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    # Options given: the header (and any usage error) comes before collection. Otherwise it
    # waits until a collected test needs a kernel (pytest_report_collectionfinish): a run of
    # unrelated tests in the same environment starts no program of ours and reads no kernel.
    return _announce(config) if _explicit(config) else None


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str] | None:
    if _explicit(config) or config.stash.get(SETTINGS_KEY, None) is None:
        return None
    return _announce(config)


def _announce(config: pytest.Config) -> list[str]:
    """The header lines; the same identity goes into the JUnit report's testsuite properties."""
    from ..report.identity import record_suite_properties
    lines, properties = _identity(config)
    record_suite_properties(config, properties)
    return lines


def _identity(config: pytest.Config) -> tuple[list[str], list[tuple[str, str]]]:
    from ..report.identity import describe
    return describe(_settings(config))


def _forward_header(config: pytest.Config, report: pytest.TestReport) -> None:
    """An xdist controller collects nothing, so without options it cannot know that a kernel
    is needed: a worker that resolved the settings sends the header with its first report."""
    if not hasattr(config, "workerinput") or _explicit(config) or config.stash.get(HEADER_SENT_KEY, False):
        return
    if config.stash.get(SETTINGS_KEY, None) is not None:
        config.stash[HEADER_SENT_KEY] = True
        report.syscall_irl_identity = _identity(config)  # type: ignore[attr-defined]


# --- failure artifacts ---------------------------------------------------------------

def _used(item: pytest.Item) -> list[Any]:
    return item.stash.setdefault(USED_KEY, [])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    _forward_header(item.config, report)
    _attach_traces(item, report)
    if report.failed and _used(item):
        from ..machine.gdbmi import GdbSession
        from ..lab.guest import Guest
        from ..trace.tracer import SyscallTracer

        for thing in _used(item):
            if isinstance(thing, Guest):
                origin = "restored from snapshot, boot log not included" if thing.restored else "booted"
                report.sections.append((f"guest {thing.name} console, {origin} (tail)",
                                        tail(_read(thing.machine.console_log), 60)))
                # JUnit XML has no room for report sections: it gets the logs' paths.
                item.user_properties.append((f"syscall-irl {thing.name} logs", str(thing.machine.log_dir)))
            elif isinstance(thing, GdbSession):
                report.sections.append(("gdb/mi transcript (tail)", thing.transcript_tail(40)))
                if thing.transcript_path is not None:
                    item.user_properties.append(("syscall-irl gdb/mi transcript", str(thing.transcript_path)))
            elif isinstance(thing, SyscallTracer):
                for number, trace in enumerate(thing.traces, start=1):
                    report.sections.append((f"syscall trace {number}", str(trace)))
    return report


def _attach_traces(item: pytest.Item, report: pytest.TestReport) -> None:
    """With --syscall-irl-html, the test's traces ride on its report (to the xdist controller)."""
    if report.when != "call" or not item.config.getoption("syscall_irl_html", None) or not _used(item):
        return
    from ..report.html import trace_record
    from ..trace.tracer import SyscallTracer
    report.syscall_irl_traces = [trace_record(trace) for thing in _used(item)  # type: ignore[attr-defined]
                                 if isinstance(thing, SyscallTracer) for trace in thing.traces]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# --- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def syscall_irl_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The resolved settings and guest maker of this run (one per xdist worker), for the
    kernel of the test's parameter when several are under test."""
    from ..lab.guest import Lab
    from ..lab.settings import kernel_ids
    every, log_root = _settings(request.config), tmp_path_factory.getbasetemp() / "syscall-irl"
    index: int = getattr(request, "param", 0)
    return Lab(every[index], log_root / kernel_ids(every)[index] if len(every) > 1 else log_root)


@pytest.fixture(scope="session")
def kernel(syscall_irl_lab: Lab) -> Kernel:
    """The kernel under test: its bzImage, vmlinux symbols and version.

        def test_entry_symbol(kernel):
            assert kernel.vmlinux.symbol("entry_SYSCALL_64") > 0xffffffff80000000
    """
    return syscall_irl_lab.kernel


@pytest.fixture(scope="session")
def make_guest(syscall_irl_lab: Lab) -> Iterator[Callable[[], Guest]]:
    """Boot extra guests of the kernel under test; all are shut down at the end of the session.

        def test_two(make_guest):
            a, b = make_guest(), make_guest()
    """
    guests: list[Guest] = []

    def boot() -> Guest:
        guests.append(syscall_irl_lab.boot())
        return guests[-1]

    yield boot
    for guest in guests:
        guest.shutdown()


class _SharedGuest:
    """A worker's shared guest for one set of extra boot arguments and CPU model, booted
    again if a test killed it or left it unusable."""

    def __init__(self, lab: Lab, variant: tuple[str, str | None], names: Iterator[int]) -> None:
        self.lab = lab
        self.boot_args, self.cpu = variant
        self.guest: Guest | None = None
        self._names = names  # each guest booted gets a log directory of its own

    def get(self) -> Guest:
        if self.guest is None or not self.guest.is_alive():
            if self.guest is not None:
                self.guest.shutdown()
            self.guest = self.lab.boot(name=f"shared-{os.getpid()}-{next(self._names)}", boot_args=self.boot_args,
                                       cpu=self.cpu)
        return self.guest

    def settle(self) -> None:
        """After a test: a guest that cannot take the next command is replaced."""
        if self.guest is not None and not self.guest.settle():
            self.close()

    def close(self) -> None:
        if self.guest is not None:
            self.guest.shutdown()
            self.guest = None

    @property
    def booted(self) -> bool:
        return self.guest is not None


# Shared guests a worker keeps running at once: the suite asks for seven variants (pti=on,
# clocksource=jiffies, three vsyscall modes, an Intel CPU, none), ~150 MB of QEMU each; a
# variant that comes back after two others is restored from its snapshot again (~0.3 s).
MAX_SHARED_GUESTS = 2


class _SharedGuests:
    """The worker's shared guests, one per set of extra boot arguments and CPU model, of
    which the MAX_SHARED_GUESTS used last are kept running."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.by_args: dict[tuple[str, str | None], _SharedGuest] = {}  # least recently used first
        self._names = itertools.count(1)

    def __getitem__(self, variant: tuple[str, str | None]) -> _SharedGuest:
        shared = self.by_args.pop(variant, None) or _SharedGuest(self.lab, variant, self._names)
        self.by_args[variant] = shared
        others = [other for other in self.by_args.values() if other is not shared and other.booted]
        for other in others[:max(len(others) - (MAX_SHARED_GUESTS - 1), 0)]:
            other.close()  # before this variant boots: the bound holds at the peak too
        return shared

    def close(self) -> None:
        for shared in self.by_args.values():
            shared.close()


@pytest.fixture(scope="session")
def _shared_guests(syscall_irl_lab: Lab) -> Iterator[_SharedGuests]:
    shared = _SharedGuests(syscall_irl_lab)
    yield shared
    shared.close()


def _boot_args(request: pytest.FixtureRequest) -> str:
    """The extra kernel arguments the test asks for with @pytest.mark.boot_args."""
    from ..lab.settings import check_boot_args
    marker = request.node.get_closest_marker("boot_args")
    if marker is None:
        return ""
    if len(marker.args) != 1 or not isinstance(marker.args[0], str) or marker.kwargs:
        pytest.fail(f"@pytest.mark.boot_args takes one string of kernel arguments, e.g. "
                    f"@pytest.mark.boot_args(\"pti=on\"); got {marker.args!r} {marker.kwargs!r}", pytrace=False)
    boot_args = marker.args[0].strip()  # inner spaces may be quoted: param="a  b"
    try:
        check_boot_args(boot_args)
    except ConfigError as exc:
        pytest.fail(f"@pytest.mark.boot_args({marker.args[0]!r}): {exc.message}", pytrace=False)
    return boot_args


def _cpu(request: pytest.FixtureRequest) -> str | None:
    """The QEMU CPU model the test asks for with @pytest.mark.cpu."""
    marker = request.node.get_closest_marker("cpu")
    if marker is None:
        return None
    if len(marker.args) != 1 or not isinstance(marker.args[0], str) or not marker.args[0].strip() or marker.kwargs:
        pytest.fail(f"@pytest.mark.cpu takes one QEMU CPU model, e.g. @pytest.mark.cpu(\"qemu64,vendor=GenuineIntel\")"
                    f"; got {marker.args!r} {marker.kwargs!r}", pytrace=False)
    return str(marker.args[0]).strip()


@pytest.fixture
def guest(request: pytest.FixtureRequest, _shared_guests: _SharedGuests) -> Iterator[Guest]:
    """A booted guest shared by the tests of this xdist worker (one per set of
    @pytest.mark.boot_args). A command a test leaves running is read to its end
    afterwards; a guest a test killed, or whose command does not end within 10 s, is
    replaced for the next test.

        def test_echo(guest):
            assert guest.run("echo syscall_irl").output == "syscall_irl\\n"

        @pytest.mark.boot_args("pti=on")
        def test_pti(guest):
            assert "pti" in guest.run("cat /proc/cpuinfo").output.split()
    """
    shared = _shared_guests[(_boot_args(request), _cpu(request))]
    own = shared.get()
    _used(request.node).append(own)
    yield own
    # After Ctrl-C (pytest sets INTERRUPTED before the teardowns) nothing waits on a guest:
    # the command the interrupted test left running may never end.
    if request.session.exitstatus == pytest.ExitCode.INTERRUPTED:
        shared.close()
    else:
        shared.settle()


@pytest.fixture
def fresh_guest(request: pytest.FixtureRequest, syscall_irl_lab: Lab) -> Iterator[Guest]:
    """A guest of this test's own, for tests that change guest state; shut down afterwards.
    Restored from the saved ready guest, it costs ~0.15 s (TCG), so use it freely. It
    honours @pytest.mark.boot_args like `guest`.

        def test_sysctl(fresh_guest):
            fresh_guest.run("echo 1 > /proc/sys/kernel/panic_on_oops").check()
    """
    own = syscall_irl_lab.boot(boot_args=_boot_args(request), cpu=_cpu(request))
    _used(request.node).append(own)
    yield own
    own.shutdown()


@pytest.fixture(scope="session")
def _gdb_session(syscall_irl_lab: Lab) -> Iterator[list[GdbSession]]:
    holder: list[GdbSession] = []
    yield holder
    for session in holder:
        session.close()


def _gdb_for(lab: Lab, holder: list[GdbSession]) -> GdbSession:
    from ..machine.gdbmi import GdbSession
    from ..lab.gdb_index import warm_gdb_index
    # One GDB per worker: the vmlinux symbols load once. A dead one is replaced.
    if holder and not holder[0].is_alive():
        holder.pop().close()
    if not holder:
        # The first worker to get here fills GDB's index cache; the others wait and load fast.
        warm_gdb_index(lab.settings)
        lab.log_root.mkdir(parents=True, exist_ok=True)
        transcript = lab.log_root / f"gdb-{os.getpid()}.mi.log"
        # The symbols load in the background while the caller gets its guest ready.
        holder.append(GdbSession(lab.kernel.vmlinux.path, gdb=lab.settings.gdb, transcript_path=transcript,
                                 index_cache_dir=lab.settings.gdb_index_cache, background=True))
    return holder[0]


def _target(request: pytest.FixtureRequest) -> Guest:
    """The guest a test drives: its own `fresh_guest` if it asked for one, else `guest`."""
    name = "fresh_guest" if "fresh_guest" in request.fixturenames else "guest"
    target: Guest = request.getfixturevalue(name)
    return target


@pytest.fixture
def gdb(request: pytest.FixtureRequest, syscall_irl_lab: Lab, _gdb_session: list[GdbSession]) -> Iterator[GdbSession]:
    """GDB attached to this test's guest (`fresh_guest` if the test uses it, else `guest`),
    stopped. Afterwards its breakpoints are deleted and the guest runs on.

        def test_ksys_write(guest, gdb):
            gdb.break_insert("ksys_write", condition="fd == 1")
            pending = guest.console.start("echo syscall_irl")
            stop = gdb.continue_until_stop(timeout=30)
            assert gdb.registers()["rdx"] == 12
    """
    session = _gdb_for(syscall_irl_lab, _gdb_session)  # first: it starts while the guest does
    target = _target(request)
    _used(request.node).append(session)
    session.connect(target.gdb_socket)
    target.debugger = session
    yield session
    target.debugger = None
    try:
        session.delete_breakpoints()
        session.detach()
    except SyscallIrlError:
        # A broken session must not leave the guest stopped for the next test.
        _gdb_session.remove(session)
        session.close()
        target.shutdown()


@pytest.fixture
def syscall_trace(request: pytest.FixtureRequest, kernel: Kernel, gdb: GdbSession) -> SyscallTracer:
    """Trace one syscall through every stage of the path; a failing test's report shows
    the traces it took.

        def test_lstar(kernel, syscall_trace):
            trace = syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
            assert trace["entry"]["rip"] == kernel.vmlinux.symbol("entry_SYSCALL_64")
    """
    from ..trace.tracer import SyscallTracer
    tracer = SyscallTracer(gdb, kernel, _target(request))
    _used(request.node).append(tracer)
    return tracer

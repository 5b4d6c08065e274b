"""The fixtures, each a few lines over a plain class of the lab layer: `Lab` (guests of one
kernel), `SharedGuests` (a worker's shared guests), `WorkerDebugger` (a worker's GDB),
`SyscallTracer`. Each records what it hands out, for a failing test's report (artifacts.py).

Fixtures: `kernel`, `guest` (shared per xdist worker), `fresh_guest` (the test's own),
`gdb` (attached to the test's guest), `syscall_trace` (one syscall through every stage),
`make_guest` (boot more guests), `baseline` and `baseline_syscall_trace` (the same on the
--syscall-irl-baseline kernel, to compare with; `Baseline` in lab/baseline.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from ..core.errors import ConfigError
from .artifacts import evidence
from .markers import variant_of
from .settings import baseline_of, settings_of

if TYPE_CHECKING:
    # Imported where first used: pytest loads this plugin in every run of its environment,
    # and a run with no kernel tests need not pay for QEMU, GDB/MI and pexpect modules.
    from ..arch.base import Architecture
    from ..kernel.artifacts import Kernel
    from ..lab.baseline import Baseline, BaselineUse
    from ..lab.debugger import WorkerDebugger
    from ..lab.guest import Guest, Lab
    from ..lab.pool import SharedGuests
    from ..machine.gdbmi import GdbSession
    from ..trace.tracer import SyscallTracer

# Every fixture of ours that needs a kernel depends on this one; a test's own fixture that
# happens to be called `gdb` or `kernel` does not.
LAB_FIXTURE = "syscall_irl_lab"
BASELINE_FIXTURE = "syscall_irl_baseline"
# The worker's baseline while its session fixture lives: the teardown hook stops its guest and
# GDB when the next test does not use them (`release_idle_baseline`).
BASELINE_KEY = pytest.StashKey["Baseline"]()
NO_BASELINE = ("no --syscall-irl-baseline given: this test compares the kernel under test with a baseline kernel; "
               "pass --syscall-irl-baseline=path/to/bzImage (with --syscall-irl-baseline-vmlinux and "
               "--syscall-irl-baseline-modules where the kernel's defaults do not find them), or deselect the test")


def worker_id(config: pytest.Config) -> str:
    """This process's xdist worker id (gw0), "main" without xdist: per-worker logs are named
    by it, so a person can match them to the report. Read from what xdist hands its worker,
    not from $PYTEST_XDIST_WORKER, which a pytest run started by a worker's test inherits."""
    workerinput: dict[str, object] = getattr(config, "workerinput", {})
    return str(workerinput.get("workerid", "main"))


@pytest.fixture(scope="session")
def syscall_irl_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The resolved settings and guest maker of this run (one per xdist worker), for the
    kernel of the test's parameter when several are under test."""
    from ..lab.guest import Lab
    from ..lab.settings import kernel_ids
    every, log_root = settings_of(request.config), tmp_path_factory.getbasetemp() / "syscall-irl"
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


@pytest.fixture(scope="session")
def _shared_guests(request: pytest.FixtureRequest, syscall_irl_lab: Lab) -> Iterator[SharedGuests[Guest]]:
    from ..lab.pool import SharedGuests
    shared = SharedGuests(syscall_irl_lab, worker_id(request.config))
    yield shared
    shared.close()


@pytest.fixture
def guest(request: pytest.FixtureRequest, _shared_guests: SharedGuests[Guest]) -> Iterator[Guest]:
    """A booted guest shared by the tests of this xdist worker (one per set of
    @pytest.mark.syscall_irl_boot_args). A command a test leaves running is read to its end
    afterwards; a guest a test killed, or whose command does not end within 10 s, is
    replaced for the next test.

        def test_echo(guest):
            assert guest.run("echo syscall_irl").output == "syscall_irl\\n"

        @pytest.mark.syscall_irl_boot_args("pti=on")
        def test_pti(guest):
            assert "pti" in guest.run("cat /proc/cpuinfo").output.split()
    """
    shared = _shared_guests[variant_of(request.node)]
    own = shared.get()
    evidence(request.node).add_guest(own)
    mark = own.warnings_mark()
    yield own
    # After Ctrl-C (pytest sets INTERRUPTED before the teardowns) nothing waits on a guest:
    # the command the interrupted test left running may never end.
    if request.session.exitstatus == pytest.ExitCode.INTERRUPTED:
        shared.close()
        return
    shared.settle()  # a command the test left running counts as the test's
    own.check_no_new_warnings(mark)


@pytest.fixture
def fresh_guest(request: pytest.FixtureRequest, syscall_irl_lab: Lab) -> Iterator[Guest]:
    """A guest of this test's own, for tests that change guest state; shut down afterwards.
    Restored from the saved ready guest, it costs ~0.15 s (TCG), so use it freely. It
    honours @pytest.mark.syscall_irl_boot_args like `guest`.

        def test_sysctl(fresh_guest):
            fresh_guest.run("echo 1 > /proc/sys/kernel/panic_on_oops").check()
    """
    own = syscall_irl_lab.boot(variant=variant_of(request.node))
    evidence(request.node).add_guest(own)
    mark = own.warnings_mark()  # what the boot printed is the boot's, as for the shared guest
    yield own
    try:
        own.check_no_new_warnings(mark)
    finally:
        own.shutdown()


def _target(request: pytest.FixtureRequest) -> Guest:
    """The guest a test drives: its own `fresh_guest` if it asked for one, else `guest`."""
    name = "fresh_guest" if "fresh_guest" in request.fixturenames else "guest"
    target: Guest = request.getfixturevalue(name)
    return target


@pytest.fixture(scope="session")
def syscall_irl_architecture(kernel: Kernel) -> Architecture:
    """The description of the kernel's architecture (its roads, registers and entry rules),
    chosen by its vmlinux's ELF machine: x86_64 today.

        def test_roads(syscall_irl_architecture):
            assert "syscall64" in syscall_irl_architecture.roads
    """
    from ..arch.registry import architecture_for
    return architecture_for(kernel.vmlinux.machine)


@pytest.fixture(scope="session")
def _worker_debugger(request: pytest.FixtureRequest, syscall_irl_lab: Lab,
                     syscall_irl_architecture: Architecture) -> Iterator[WorkerDebugger]:
    from ..lab.debugger import WorkerDebugger
    debugger = WorkerDebugger(syscall_irl_lab, worker_id(request.config),
                              register_file=syscall_irl_architecture.register_file)
    yield debugger
    debugger.close()


@pytest.fixture
def gdb(request: pytest.FixtureRequest, _worker_debugger: WorkerDebugger) -> Iterator[GdbSession]:
    """GDB attached to this test's guest (`fresh_guest` if the test uses it, else `guest`),
    stopped. Afterwards its breakpoints are deleted and the guest runs on.

        def test_ksys_write(guest, gdb):
            gdb.break_insert("ksys_write", condition="fd == 1")
            pending = guest.console.start("echo syscall_irl")
            stop = gdb.continue_until_stop(timeout=30)
            assert gdb.registers()["rdx"] == 12
    """
    _worker_debugger.session()  # first: GDB loads the symbols while the guest gets ready
    target = _target(request)
    evidence(request.node).add_gdb(_worker_debugger.session())  # shown even if attaching fails
    session = _worker_debugger.attach(target)
    yield session
    _worker_debugger.release(session, target)


@pytest.fixture
def syscall_trace(request: pytest.FixtureRequest, kernel: Kernel, gdb: GdbSession,
                  syscall_irl_architecture: Architecture) -> SyscallTracer:
    """Trace one syscall through every stage of the path; a failing test's report shows
    the traces it took.

        def test_lstar(kernel, syscall_trace):
            trace = syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
            assert trace["entry"]["rip"] == kernel.vmlinux.symbol("entry_SYSCALL_64")
    """
    from ..trace.tracer import SyscallTracer
    tracer = SyscallTracer(gdb, kernel, _target(request), syscall_irl_architecture)
    evidence(request.node).add_tracer(tracer)
    return tracer


@pytest.fixture(scope="session")
def syscall_irl_baseline(request: pytest.FixtureRequest,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baseline]:
    """The worker's baseline kernel, made when its first test asks (a worker that runs no
    comparison makes none); its logs go under `syscall-irl/baseline/`. Without
    --syscall-irl-baseline it raises the usage error `baseline` explains, once per worker,
    before any guest of the test boots (session fixtures are set up first)."""
    from ..arch.registry import architecture_for
    from ..lab.baseline import Baseline
    from ..lab.guest import Lab
    settings = baseline_of(request.config)
    if settings is None:
        raise ConfigError(NO_BASELINE)
    baseline = Baseline(Lab(settings, tmp_path_factory.getbasetemp() / "syscall-irl" / "baseline"),
                        worker_id(request.config), architecture_for(settings.kernel.vmlinux.machine))
    request.config.stash[BASELINE_KEY] = baseline
    yield baseline
    del request.config.stash[BASELINE_KEY]
    baseline.close()


@pytest.fixture
def baseline(request: pytest.FixtureRequest, syscall_irl_lab: Lab,
             syscall_irl_baseline: Baseline) -> Iterator[BaselineUse]:
    """The --syscall-irl-baseline kernel beside the kernel under test, to compare them in one
    test: `baseline.kernel`, and `baseline.guest` (the worker's baseline guest, of the test's
    @pytest.mark.syscall_irl_boot_args / syscall_irl_cpu variant) and `baseline.gdb` (attached
    to it), each started when the test first asks. Its guest and GDB are not the kernel under
    test's: a trace on one never stops the other. The test runs once per kernel under test,
    each time against the same baseline.

        def test_same_release_line(kernel, baseline):
            assert kernel.version_tuple[:2] == baseline.kernel.version_tuple[:2]

    Without --syscall-irl-baseline the test errors (a usage failure, not a skip): a skip says
    something about the kernel under test, and here nothing was learned about it; a gate that
    skipped its comparisons would pass a change it never compared. The rest of the run goes on.
    """
    # syscall_irl_lab: a test using the baseline is a kernel test, run once per kernel under test.
    use = syscall_irl_baseline.use(variant_of(request.node), evidence(request.node))
    yield use
    use.finish(interrupted=request.session.exitstatus == pytest.ExitCode.INTERRUPTED)


@pytest.fixture
def baseline_syscall_trace(request: pytest.FixtureRequest, baseline: BaselineUse) -> SyscallTracer:
    """`syscall_trace` on the baseline kernel's guest, through the baseline's own GDB: the
    same calls, the same `SyscallTrace`s, so a test compares the two kernels stage by stage.
    A failing test's report shows these traces as "baseline syscall trace N". What goes
    wrong on the baseline (it panics, a command fails there) fails the test as harness, never
    as the kernel under test's violation or crash (`BaselineTracer`).

        def test_the_exit_is_unchanged(syscall_trace, baseline_syscall_trace):
            write = {"nr": "write", "args": {0: 1, 2: 12}}
            trace = syscall_trace.payload("syscall_irl", **write)
            base_trace = baseline_syscall_trace.payload("syscall_irl", **write)
            assert trace.exit == base_trace.exit, f"{trace}\\n--- baseline ---\\n{base_trace}"
    """
    from ..trace.baseline import BaselineTracer
    tracer = BaselineTracer(baseline.gdb, baseline.kernel, baseline.guest, baseline.architecture)
    evidence(request.node).add_tracer(tracer, title="baseline syscall trace")
    return tracer


def release_idle_baseline(config: pytest.Config, nextitem: pytest.Item | None) -> None:
    """After a test's teardown: the worker's baseline stops its guest and GDB unless the
    worker's next test uses the baseline (xdist hands a worker its next test before it runs
    this one), so a worker holds them only through a run of comparing tests."""
    baseline = config.stash.get(BASELINE_KEY, None)
    if baseline is not None and BASELINE_FIXTURE not in getattr(nextitem, "fixturenames", ()):
        baseline.close()

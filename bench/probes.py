"""The benchmark's measurements: each returns samples (seconds, or kB for memory).

Every process started here goes through procs.spawn (it dies with us) and is stopped
before the function returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pygdbmi.IoManager import IoManager
from pygdbmi.gdbcontroller import GdbController

from pytest_syscall_irl.core import procs
from pytest_syscall_irl.machine.gdbmi import GdbSession
from pytest_syscall_irl.lab.gdb_index import warm_gdb_index
from pytest_syscall_irl.lab.guest import Guest, Lab
from pytest_syscall_irl.lab.settings import LabSettings

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SUITE_TIMEOUT = 600.0


@dataclass
class Samples:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        ordered = sorted(self.values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def peak_rss_kb(pid: int) -> int:
    """VmHWM of *pid*: the most resident memory it ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


# --- ready guests ----------------------------------------------------------------------------


@dataclass
class ReadyGuests:
    """Cold boot vs restore to a ready guest (console answers, GDB attached)."""

    cold: Samples = field(default_factory=Samples)
    restored: Samples = field(default_factory=Samples)
    cold_rss_kb: Samples = field(default_factory=Samples)
    restored_rss_kb: Samples = field(default_factory=Samples)


def _ready_guest(lab: Lab, gdb: GdbSession, restore: bool) -> tuple[float, int]:
    start = time.perf_counter()
    guest = lab.boot(restore=restore)
    try:
        gdb.connect(guest.gdb_socket)
        seconds = time.perf_counter() - start
        assert guest.restored == restore
        gdb.detach()
        # Some guest work before reading the peak: a payload run, as in a test.
        guest.run(guest.payload("syscall_irl").guest_path).check()
        assert guest.machine.pid is not None
        return seconds, peak_rss_kb(guest.machine.pid)
    finally:
        guest.shutdown()


def ready_guests(lab: Lab, gdb: GdbSession, samples: int) -> ReadyGuests:
    """Alternate cold boots and restores, so both see the same machine load."""
    result = ReadyGuests()
    lab.snapshot()  # built (or found) before any timing
    for _ in range(samples):
        seconds, rss = _ready_guest(lab, gdb, restore=False)
        result.cold.add(seconds)
        result.cold_rss_kb.add(rss)
        seconds, rss = _ready_guest(lab, gdb, restore=True)
        result.restored.add(seconds)
        result.restored_rss_kb.add(rss)
    return result


# --- MI register reads -----------------------------------------------------------------------


class _PygdbmiController(GdbController):
    """pygdbmi's GdbController as shipped (its I/O, its write() defaults), except that
    GDB is started by procs.spawn so that it dies with us."""

    def spawn_new_gdb_subprocess(self) -> int:
        pipe = subprocess.PIPE
        env = dict(os.environ, DEBUGINFOD_URLS="")
        # bufsize=0 as pygdbmi has it: its reader expects unbuffered pipes.
        process = procs.spawn(self.command, stdin=pipe, stdout=pipe, stderr=pipe, bufsize=0, env=env)
        self.gdb_process = process
        assert process.stdin is not None and process.stdout is not None
        self.io_manager = IoManager(process.stdin, process.stdout, process.stderr,
                                    self.time_to_check_for_additional_output_sec)
        return int(process.pid)


@dataclass
class RegisterReads:
    ours_registers: Samples = field(default_factory=Samples)  # GdbSession.registers()
    ours_raw: Samples = field(default_factory=Samples)  # the same MI command as pygdbmi's
    pygdbmi: Samples = field(default_factory=Samples)  # GdbController.write(), defaults


def register_reads(guest: Guest, gdb: GdbSession, settings: LabSettings, ours: int, theirs: int) -> RegisterReads:
    """One stopped guest: our session, then pygdbmi's, each attached in turn."""
    result = RegisterReads()
    gdb.connect(guest.gdb_socket)
    gdb.registers()  # the first full read learns which registers are integers
    for _ in range(ours):
        result.ours_registers.add(timed(gdb.registers))
        result.ours_raw.add(timed(gdb.raw_registers))
    gdb.detach()
    command = [settings.gdb, "--nx", "--quiet", "--interpreter=mi3", str(settings.kernel.vmlinux.path)]
    controller = _PygdbmiController(command=command)
    try:
        controller.write(f"-target-select remote {guest.gdb_socket}", timeout_sec=30)
        for _ in range(theirs):
            result.pygdbmi.add(timed(lambda: controller.write("-data-list-register-values x")))
        controller.write("-target-detach")
    finally:
        _stop_pygdbmi(controller)
    return result


def _stop_pygdbmi(controller: GdbController) -> None:
    process = controller.gdb_process
    if process is not None:
        try:
            controller.write("-gdb-exit", read_response=False)
            process.wait(5)
        except Exception:
            pass
        procs.stop(process)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


# --- vmlinux symbols -------------------------------------------------------------------------


@dataclass
class SymbolLoads:
    cold: Samples = field(default_factory=Samples)
    cached: Samples = field(default_factory=Samples)
    cold_rss_kb: Samples = field(default_factory=Samples)


def _load(settings: LabSettings, index_dir: Path) -> tuple[float, int]:
    """Load the vmlinux and use its DWARF (GDB 13 finishes indexing in the background:
    the first type lookup waits for it)."""
    with GdbSession(None, gdb=settings.gdb, index_cache_dir=index_dir) as gdb:
        def load() -> None:
            gdb.load_symbols(settings.kernel.vmlinux.path)
            gdb.evaluate("sizeof(struct pt_regs)")

        return timed(load), peak_rss_kb(gdb.pid)


def symbol_loads(settings: LabSettings, samples: int) -> SymbolLoads:
    """Cold: an empty index cache each time; cached: one warmed once, beforehand."""
    result = SymbolLoads()
    with tempfile.TemporaryDirectory(prefix="sirl-bench-index-") as tmp:
        warm = replace(settings, cache=Path(tmp) / "warm")
        warm_gdb_index(warm)
        for number in range(samples):
            seconds, rss = _load(settings, Path(tmp) / f"cold-{number}")
            result.cold.add(seconds)
            result.cold_rss_kb.add(rss)
            result.cached.add(_load(settings, warm.gdb_index_cache)[0])
    return result


# --- the conformance suite -------------------------------------------------------------------


@dataclass
class SuiteRuns:
    one_worker: Samples = field(default_factory=Samples)  # -n 1, shared guest
    two_workers: Samples = field(default_factory=Samples)  # -n 2, shared guest
    fresh_guests: Samples = field(default_factory=Samples)  # -n 2, a fresh guest per test
    qemu_rss_kb: Samples = field(default_factory=Samples)  # every guest of every run
    gdb_rss_kb: Samples = field(default_factory=Samples)  # every worker's GDB of every run


class SuiteFailed(RuntimeError):
    pass


def run_suite(workers: int, fresh: bool, basetemp: Path, rss_file: Path, options: Sequence[str] = (),
              env_extra: Mapping[str, str] | None = None) -> float:
    """Wall time of `pytest test_suites -n WORKERS [OPTIONS]` in a subprocess; SuiteFailed
    unless it passes. Peak RSS lines go to *rss_file* (bench/peak_rss.py)."""
    command = [sys.executable, "-m", "pytest", "test_suites", "-n", str(workers), "-q", "-p", "no:cacheprovider",
               f"--basetemp={basetemp}", "-p", "peak_rss", *(["-p", "fresh_guests"] if fresh else []),
               "-p", "first_result", *options]
    env = dict(os.environ, SIRL_BENCH_RSS_FILE=str(rss_file), **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    log = basetemp.parent / f"{basetemp.name}.log"
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = procs.spawn(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(SUITE_TIMEOUT)
        finally:
            procs.stop(proc)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SuiteFailed(f"{' '.join(command)} exited {code}:\n{tail}")
    return seconds


def suite_runs(samples: int) -> SuiteRuns:
    """Rounds of (-n 1, -n 2, -n 2 with fresh guests), after one untimed warm-up run."""
    result = SuiteRuns()
    with tempfile.TemporaryDirectory(prefix="sirl-bench-suite-") as tmp:
        rss = Path(tmp) / "rss"
        runs = iter(range(10**6))

        def run(workers: int, fresh: bool = False) -> float:
            return run_suite(workers, fresh, Path(tmp) / f"run{next(runs)}", rss)

        run(2)
        for _ in range(samples):
            result.one_worker.add(run(1))
            result.two_workers.add(run(2))
            result.fresh_guests.add(run(2, fresh=True))
        for line in rss.read_text().splitlines():
            what, kb = line.split()
            (result.qemu_rss_kb if what == "qemu" else result.gdb_rss_kb).add(float(kb))
    return result

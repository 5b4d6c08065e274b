"""Benchmark of pytest-syscall-irl's speed work, in one run and side by side:

    .venv/bin/python bench/run.py [--samples 9] [--suite-samples 7]

- ready guest (console answers, GDB attached): cold boot vs restore from the snapshot
- MI register read: ours vs pygdbmi's GdbController.write() with its defaults
- vmlinux symbols: cold (empty GDB index cache) vs cached (warmed index cache)
- the conformance suite (`pytest test_suites`, a subprocess): -n 1 vs -n 2, and a shared
  guest per worker vs a fresh guest per test (bench/fresh_guests.py, `-p fresh_guests`)
- peak RSS (VmHWM) of QEMU per guest and of GDB
- command output throughput: the agent's own port (10 MB, 1 MB) vs the shared console line
  (200 KB, with and without pexpect's search window) (bench/channel.py)
- a distribution kernel with its 590 MB -dbg vmlinux (bench/distro.py): first run with an
  empty cache, warm suite beside the reference kernel's, a second kernel in one run, GDB RSS
- what the installed plugin adds to a run of unrelated tests (bench/overhead.py);
  `--overhead-only` measures just that (no kernel needed)

Medians of repeated samples (machines are shared and noisy), then each target with
MET or MISSED. Exit status 0 unless the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import channel  # noqa: E402
import distro  # noqa: E402
import overhead  # noqa: E402
import probes  # noqa: E402
from probes import Samples  # noqa: E402

from pytest_syscall_irl.arch.x86_64 import X86_64  # noqa: E402
from pytest_syscall_irl.machine.gdbmi import GdbSession  # noqa: E402
from pytest_syscall_irl.lab.gdb_index import warm_gdb_index  # noqa: E402
from pytest_syscall_irl.lab.guest import Lab  # noqa: E402
from pytest_syscall_irl.lab.settings import LabSettings  # noqa: E402
from pytest_syscall_irl.report.identity import version_line as version  # noqa: E402
from pytest_syscall_irl.kernel.artifacts import Kernel  # noqa: E402
from pytest_syscall_irl.kernel.build import cache_dir, reference_kernel  # noqa: E402


@dataclass(frozen=True)
class Target:
    text: str
    met: bool
    value: str


def settings() -> LabSettings:
    """The settings the plugin resolves with no options: reference kernel, user cache."""
    bzimage = reference_kernel()
    if bzimage is None:
        raise SystemExit("no reference kernel: build it once with `syscall-irl kernel build`")
    qemu, gdb = shutil.which("qemu-system-x86_64"), shutil.which("gdb")
    if qemu is None or gdb is None:
        raise SystemExit("qemu-system-x86_64 and gdb are needed: apt-get install qemu-system-x86 gdb")
    return LabSettings(kernel=Kernel.load(bzimage), qemu=qemu, gdb=gdb, accel="auto", boot_args="",
                       cache=cache_dir())


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def sec(seconds: float) -> str:
    return f"{seconds:.3f} s"


def mb(kb: float) -> str:
    return f"{kb / 1024:.0f} MB"


Format = Callable[[float], str]


def spread(samples: Samples, fmt: Format = sec) -> str:
    """median [min..max] n=count"""
    return f"{fmt(samples.median)} [{fmt(min(samples.values))}..{fmt(max(samples.values))}] n={len(samples.values)}"


def row(title: str, a_name: str, a: Samples, b_name: str, b: Samples, fmt: Format = sec) -> None:
    print(f"\n{title}")
    print(f"  {a_name:<38} {spread(a, fmt=fmt)}")
    print(f"  {b_name:<38} {spread(b, fmt=fmt)}")
    print(f"  {'ratio (median A / median B)':<38} {a.median / b.median:.1f}x")


def snapshot_build(base: LabSettings, accel: str) -> tuple[float, int]:
    """A snapshot built from scratch in a temporary cache: (seconds, bytes)."""
    with tempfile.TemporaryDirectory(prefix="sirl-bench-snap-") as tmp:
        lab = Lab(replace(base, cache=Path(tmp), accel=accel), Path(tmp) / "logs")
        lab.build_image()  # the image is not part of the snapshot's cost
        start = time.perf_counter()
        snapshot = lab.snapshot()
        return time.perf_counter() - start, snapshot.state.stat().st_size


def guests_and_gdb(lab: Lab, samples: int) -> tuple[probes.ReadyGuests, probes.RegisterReads, int]:
    """Ready guests and register reads with one worker-like GDB; its peak RSS in kB."""
    base = lab.settings
    # With the register file the plugin's gdb fixture has: registers() derives the views.
    with GdbSession(base.kernel.vmlinux.path, gdb=base.gdb, index_cache_dir=base.gdb_index_cache,
                    register_file=X86_64.register_file) as gdb:
        ready = probes.ready_guests(lab, gdb, samples)
        guest = lab.boot()
        try:
            reads = probes.register_reads(guest, gdb, base, ours=200, theirs=samples)
        finally:
            guest.shutdown()
        return ready, reads, probes.peak_rss_kb(gdb.pid)


def targets(ready: probes.ReadyGuests, reads: probes.RegisterReads, loads: probes.SymbolLoads,
            suite: probes.SuiteRuns | None, gdb_rss_kb: int) -> list[Target]:
    restore, cold = ready.restored.median, ready.cold.median
    ours, raw, theirs = reads.ours_registers.median, reads.ours_raw.median, reads.pygdbmi.median
    suite_qemu = suite.qemu_rss_kb.values if suite is not None else []
    suite_gdb = suite.gdb_rss_kb.values if suite is not None else []
    qemu_peak = max(ready.cold_rss_kb.values + ready.restored_rss_kb.values + suite_qemu)
    # Per worker: GDB with the warmed index cache. The cold index build (one per run and
    # vmlinux, in warm_gdb_index) is reported beside it, not counted here.
    gdb_peak = max([gdb_rss_kb, *suite_gdb])
    found = [
        Target("ready guest from snapshot, median <= 0.35 s", restore <= 0.35, sec(restore)),
        Target("restore >= 4x faster than cold boot", cold / restore >= 4, f"{cold / restore:.1f}x"),
        Target("MI register read (registers()), median <= 1 ms", ours <= 0.001, ms(ours)),
        Target("MI register read >= 100x faster than pygdbmi write() (same MI command)", theirs / raw >= 100,
               f"{theirs / raw:.0f}x"),
        Target("cached vmlinux load <= 20% of cold load", loads.cached.median <= 0.2 * loads.cold.median,
               f"{100 * loads.cached.median / loads.cold.median:.0f}%"),
    ]
    if suite is not None:
        n1, n2 = suite.one_worker.median, suite.two_workers.median
        found += [Target("suite -n 2 >= 1.6x faster than -n 1", n1 / n2 >= 1.6, f"{n1 / n2:.2f}x"),
                  Target("whole suite < 30 s at -n 2", n2 < 30, sec(n2))]
    found += [Target("QEMU peak RSS per 256 MB guest (all guests) <= 200 MB", qemu_peak <= 200 * 1024, mb(qemu_peak)),
              Target("GDB peak RSS per worker with the reference vmlinux <= 150 MB", gdb_peak <= 150 * 1024,
                     mb(gdb_peak))]
    return found


def report_header(base: LabSettings, lab: Lab, build: tuple[float, int]) -> None:
    print("pytest-syscall-irl benchmark")
    print(f"  kernel {base.kernel.release} ({base.kernel.bzimage.path}), accelerator {lab.accel}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"  {version(base.qemu)}; {version(base.gdb)}")
    print(f"  snapshot: built once in {build[0]:.2f} s (cold boot + save), {build[1] / 2**20:.0f} MB, "
          f"key {lab.snapshot_key()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=9, help="samples per measurement (default 9)")
    parser.add_argument("--suite-samples", type=int, default=7,
                        help="runs of each suite configuration (default 7; 0 skips the suite)")
    parser.add_argument("--distro", metavar="BZIMAGE:VMLINUX",
                        help="distribution kernel and its -dbg vmlinux (default: the newest /boot/vmlinuz-R with "
                             "/usr/lib/debug/boot/vmlinux-R, else Debian's 6.12 cloud kernel fetched into the cache)")
    parser.add_argument("--distro-samples", type=int, default=3,
                        help="rounds of (distro, reference, both) suite runs (default 3; 0 skips the distro kernel)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="measure only what the plugin adds to a run of unrelated tests")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.overhead_only:
        print_overhead(overhead.plugin_overhead(max(args.samples, 15)))
        return 0
    base = settings()
    with tempfile.TemporaryDirectory(prefix="sirl-bench-") as tmp:
        lab = Lab(base, Path(tmp) / "logs")
        warm_gdb_index(base)
        report_header(base, lab, snapshot_build(base, lab.accel))
        ready, reads, gdb_rss = guests_and_gdb(lab, args.samples)
        throughput = channel.measure(lab)
    loads = probes.symbol_loads(base, args.samples)
    suite = probes.suite_runs(args.suite_samples) if args.suite_samples > 0 else None
    print_results(ready, reads, loads, suite, gdb_rss)
    found = targets(ready, reads, loads, suite, gdb_rss)
    print("\n" + "\n".join(channel.report(throughput)))
    found.append(Target("10 MB of command output read in <= 30 s (command channel)", throughput.channel_10mb <= 30,
                        sec(throughput.channel_10mb)))
    pair = distro_kernel(args.distro) if args.distro_samples > 0 else None
    if pair is not None:
        runs = distro.distro_runs(base.kernel.bzimage.path, pair, args.distro_samples)
        print_distro(runs)
        found += distro_targets(runs)
    print_overhead(overhead.plugin_overhead(max(args.samples, 15)))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews every number)")
    print("\ntargets (TCG, 2 cores):")
    for target in found:
        print(f"  {'MET' if target.met else 'MISSED':<7} {target.text}: {target.value}")
    return 0


def distro_kernel(given: str | None) -> tuple[Path, ...] | None:
    if given:
        bzimage, _, vmlinux = given.partition(":")
        return Path(bzimage), Path(vmlinux)
    found = distro.find_distro_kernel()
    if found is None:
        print("\nno distribution kernel with a -dbg vmlinux: skipping its figures "
              "(apt-get install linux-image-cloud-amd64 linux-image-cloud-amd64-dbg)")
    return found


def print_distro(runs: distro.DistroRuns) -> None:
    print(f"\ndistribution kernel {runs.kernel[0]} + {runs.kernel[1]} (-n 2)")
    print(f"  {'first run, empty cache: first result':<38} {sec(runs.first_result)}")
    print(f"  {'first run, empty cache: whole suite':<38} {sec(runs.first_total)}")
    row("warm suite wall time", "A: distribution kernel", runs.warm, "B: reference kernel", runs.reference)
    print(f"  {'both kernels in one run':<38} {spread(runs.both)}")
    print(f"  {'marginal cost of the second kernel':<38} {sec(runs.marginal)} (both - reference alone)")
    print(f"  {'GDB peak RSS per worker, index cached':<38} {spread(runs.gdb_rss_kb, fmt=mb)}")


def distro_targets(runs: distro.DistroRuns) -> list[Target]:
    ratio, gdb_peak = runs.warm.median / runs.reference.median, max(runs.gdb_rss_kb.values)
    return [Target("warm suite on a distro kernel within 1.5x of the reference kernel's", ratio <= 1.5,
                   f"{ratio:.2f}x"),
            Target("GDB peak RSS per worker with a 590 MB vmlinux, index cached, < 600 MB", gdb_peak < 600 * 1024,
                   mb(gdb_peak))]


OVERHEAD_TARGET = 0.03  # seconds: the plugin's own import (-X importtime), all its hooks do without kernel tests


def print_overhead(cost: overhead.PluginOverhead) -> None:
    row("pytest run of 20 unrelated tests (fresh interpreter)", "A: plugin installed", cost.with_plugin,
        "B: -p no:syscall_irl", cost.without_plugin)
    print(f"  {'added by the plugin (median A - B)':<38} {ms(cost.added)}")
    row("import", "A: pytest + pytest_syscall_irl.plugin", cost.import_plugin, "B: pytest", cost.import_pytest)
    print(f"  {'pytest_syscall_irl.plugin alone':<38} {spread(cost.plugin_import_own, fmt=ms)} (-X importtime)")
    own = cost.plugin_import_own.median
    print(f"  {'MET' if own <= OVERHEAD_TARGET else 'MISSED':<7} the plugin's import (what a run without kernel "
          f"tests pays; its hooks start nothing) <= {ms(OVERHEAD_TARGET)}: {ms(own)}")


def print_results(ready: probes.ReadyGuests, reads: probes.RegisterReads, loads: probes.SymbolLoads,
                  suite: probes.SuiteRuns | None, gdb_rss_kb: int) -> None:
    row("ready guest (console answers, GDB attached)", "A: cold boot", ready.cold, "B: restore from snapshot",
        ready.restored)
    row("MI register read, one stopped guest", "A: pygdbmi write() defaults", reads.pygdbmi,
        "B: ours, same MI command", reads.ours_raw, fmt=ms)
    print(f"  {'ours, registers() (integer regs)':<38} {spread(reads.ours_registers, fmt=ms)}")
    row("vmlinux symbols ready (load + first DWARF lookup)", "A: cold (empty index cache)", loads.cold,
        "B: cached (warmed index cache)", loads.cached)
    if suite is not None:
        row("conformance suite wall time (pytest test_suites)", "A: -n 1, shared guest", suite.one_worker,
            "B: -n 2, shared guest", suite.two_workers)
        row("conformance suite, guest per test (-n 2)", "A: fresh guest per test", suite.fresh_guests,
            "B: shared guest per worker", suite.two_workers)
    print("\npeak RSS (VmHWM)")
    print(f"  {'QEMU, cold-booted guest':<38} {spread(ready.cold_rss_kb, fmt=mb)}")
    print(f"  {'QEMU, restored guest':<38} {spread(ready.restored_rss_kb, fmt=mb)}")
    if suite is not None:
        print(f"  {'QEMU, every guest of the suite runs':<38} {spread(suite.qemu_rss_kb, fmt=mb)}")
        print(f"  {'GDB, every worker of the suite runs':<38} {spread(suite.gdb_rss_kb, fmt=mb)}")
    print(f"  {'GDB, this benchmark (all above)':<38} {mb(gdb_rss_kb)}")
    print(f"  {'GDB, cold load (index build, once)':<38} {spread(loads.cold_rss_kb, fmt=mb)}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print("benchmark failed", file=sys.stderr)
        sys.exit(1)

"""What `syscall-irl diff` costs beside the work it cannot avoid: the traces and one boot per kernel.

    .venv/bin/python bench/diff.py [BZIMAGE]   (default: the reference kernel, compared with itself)

Measured side by side, each the median of 3 runs in a fresh process:
- diff: `syscall-irl diff K K` (Kernel checks, identities, GDB, the guests, facts, traces, report);
- floor: for each of the two kernels, the guest `diff` starts (restored from the snapshot
  cache), GDB, and the same five traces, nothing else (this script run with --floor).
The ratio diff / floor is the figure: the done-when asks for at most the traces plus one boot per kernel.
The floor takes the two kernels one after the other; the diff takes them at once (a QEMU and a GDB
each), so on two free cores it costs about one side's time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 3


def floor(bzimage: str) -> None:
    """One kernel's guests, GDB and traces, as `diff` takes them, twice (base and patched)."""
    from pytest_syscall_irl.arch.registry import architecture_for
    from pytest_syscall_irl.kernel.artifacts import Kernel
    from pytest_syscall_irl.kernel.build import cache_dir
    from pytest_syscall_irl.lab.debugger import WorkerDebugger
    from pytest_syscall_irl.lab.guest import Lab
    from pytest_syscall_irl.lab.settings import LabSettings
    from pytest_syscall_irl.lab.variant import GuestVariant
    from pytest_syscall_irl.trace.survey import NO_ASLR, trace_road
    from pytest_syscall_irl.trace.tracer import SyscallTracer
    for side in ("base", "patched"):
        kernel = Kernel.load(bzimage)
        architecture = architecture_for(kernel.vmlinux.machine)
        survey = architecture.survey
        with tempfile.TemporaryDirectory(prefix="sirl-bench-") as logs:
            lab = Lab(LabSettings(kernel=kernel, qemu="qemu-system-x86_64", gdb="gdb", accel="auto", boot_args="",
                                  cache=cache_dir()), Path(logs) / side)
            debugger = WorkerDebugger(lab, "bench", register_file=architecture.register_file)
            debugger.session()
            for cpu in survey.cpus():
                guest = lab.boot(variant=GuestVariant.of(cpu=cpu))
                guest.run(NO_ASLR).check()
                gdb = debugger.attach(guest)
                tracer = SyscallTracer(gdb, kernel, guest, architecture)
                for road in (road for road in survey.roads if road.cpu == cpu):
                    trace_road(tracer, kernel.vmlinux, road)
                debugger.release(gdb, guest)
                guest.shutdown()
            debugger.close()


def timed(command: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)
    return time.monotonic() - start


def main() -> None:
    if sys.argv[1:2] == ["--floor"]:
        floor(sys.argv[2])
        return
    from pytest_syscall_irl.kernel.build import reference_kernel
    bzimage = sys.argv[1] if len(sys.argv) > 1 else str(reference_kernel())
    cli = Path(sys.executable).with_name("syscall-irl")
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "diff.json"
        diff_command = [str(cli), "diff", "-q", bzimage, bzimage, "--json", str(report)]
        timed(diff_command)  # warm: snapshots, GDB's index cache, page cache
        diffs, floors = [], []
        for _ in range(RUNS):  # interleaved, so that a busy moment hits both alike
            diffs.append(timed(diff_command))
            floors.append(timed([sys.executable, __file__, "--floor", bzimage]))
        seconds = json.loads(report.read_text())["base"]["seconds"]
    diff_s, floor_s = statistics.median(diffs), statistics.median(floors)
    print(f"kernel: {bzimage} (compared with itself)")
    print(f"syscall-irl diff:            median {diff_s:.2f} s of {', '.join(f'{s:.2f}' for s in diffs)}")
    print(f"boots + traces alone (x2):   median {floor_s:.2f} s of {', '.join(f'{s:.2f}' for s in floors)}")
    print(f"ratio diff / (boots + traces): {diff_s / floor_s:.2f}")
    print("one side of the last diff: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()))


if __name__ == "__main__":
    main()

"""One sample of the hot paths, for bench/hot_paths.py: run by a separate interpreter whose
PYTHONPATH puts one checkout's package first, so the same probe times two versions of the
code. It speaks both the layered package and the flat one before it (the layout change is
what hot_paths.py compares); prints one JSON line:

    {"package": PATH, "restore": [s...], "mi": [s...], "trace": [s...]}

- restore: a guest restored from its snapshot to a ready console with GDB attached;
- mi: one cached 3-register read (`registers(["rip", "rsp", "rax"])`), one MI round trip;
- trace: `syscall_trace.payload("syscall_irl", nr="write", args={0: 1, 2: 12})`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest_syscall_irl

WRITE_ARGS = {0: 1, 2: 12}


def _api() -> dict[str, Any]:
    """The classes and functions the probe needs, wherever this version keeps them."""
    try:
        from pytest_syscall_irl.arch.x86_64 import X86_64
        from pytest_syscall_irl.kernel.artifacts import Kernel
        from pytest_syscall_irl.kernel.build import cache_dir, reference_kernel
        from pytest_syscall_irl.lab.gdb_index import warm_gdb_index
        from pytest_syscall_irl.lab.guest import Lab
        from pytest_syscall_irl.lab.settings import LabSettings
        from pytest_syscall_irl.machine.gdbmi import GdbSession
        from pytest_syscall_irl.trace.tracer import SyscallTracer
        return dict(Kernel=Kernel, cache_dir=cache_dir, reference_kernel=reference_kernel, Lab=Lab,
                    LabSettings=LabSettings, warm_gdb_index=warm_gdb_index,
                    gdb=lambda path, **kw: GdbSession(path, register_file=X86_64.register_file, **kw),
                    tracer=lambda gdb, kernel, guest: SyscallTracer(gdb, kernel, guest, X86_64))
    except ImportError:  # the flat package before the layers
        from pytest_syscall_irl.gdbmi import GdbSession as FlatGdb  # type: ignore[import-not-found]
        from pytest_syscall_irl.guest import Lab as FlatLab  # type: ignore[import-not-found]
        from pytest_syscall_irl.guest import LabSettings as FlatSettings
        from pytest_syscall_irl.guest import warm_gdb_index as flat_warm
        from pytest_syscall_irl.kernel import Kernel as FlatKernel  # type: ignore[attr-defined]
        from pytest_syscall_irl.kernel_build import cache_dir as flat_cache  # type: ignore[import-not-found]
        from pytest_syscall_irl.kernel_build import reference_kernel as flat_reference
        from pytest_syscall_irl.tracer import SyscallTracer as FlatTracer  # type: ignore[import-not-found]
        return dict(Kernel=FlatKernel, cache_dir=flat_cache, reference_kernel=flat_reference, Lab=FlatLab,
                    LabSettings=FlatSettings, warm_gdb_index=flat_warm,
                    gdb=lambda path, **kw: FlatGdb(path, **kw),
                    tracer=lambda gdb, kernel, guest: FlatTracer(gdb, kernel, guest))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mi-reads", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    api = _api()
    bzimage = api["reference_kernel"]()
    if bzimage is None:
        raise SystemExit("no reference kernel: build it once with `syscall-irl kernel build`")
    settings = api["LabSettings"](kernel=api["Kernel"].load(bzimage), qemu=shutil.which("qemu-system-x86_64"),
                                  gdb=shutil.which("gdb"), accel="auto", boot_args="", cache=api["cache_dir"]())
    api["warm_gdb_index"](settings)
    result: dict[str, Any] = {"package": str(Path(pytest_syscall_irl.__file__).parent), "restore": [], "mi": [],
                              "trace": []}
    with tempfile.TemporaryDirectory(prefix="sirl-hot-") as logs:
        lab = api["Lab"](settings, Path(logs))
        lab.boot().shutdown()  # the image and the snapshot exist before any timing
        with api["gdb"](settings.kernel.vmlinux.path, gdb=settings.gdb,
                        index_cache_dir=settings.gdb_index_cache) as gdb:
            for _ in range(args.rounds):
                start = time.perf_counter()
                guest = lab.boot()
                try:
                    gdb.connect(guest.gdb_socket)
                    result["restore"].append(time.perf_counter() - start)
                    guest.debugger = gdb
                    gdb.registers()  # the first full read learns the register file
                    for _ in range(args.mi_reads):
                        start = time.perf_counter()
                        gdb.registers(["rip", "rsp", "rax"])
                        result["mi"].append(time.perf_counter() - start)
                    tracer = api["tracer"](gdb, settings.kernel, guest)
                    start = time.perf_counter()
                    trace = tracer.payload("syscall_irl", nr="write", args=WRITE_ARGS)
                    result["trace"].append(time.perf_counter() - start)
                    assert trace.exit == "sysretq", trace
                    guest.debugger = None
                    gdb.detach()
                finally:
                    guest.shutdown()
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The benchmark's distribution-kernel figures: a Debian kernel with its -dbg vmlinux
(590 MB with DWARF) against the reference kernel, and both in one run.

- first run with an empty cache (payloads, guest image, GDB index, cold boot, snapshot):
  time to the first test result and to the end
- warm suite on the distro kernel vs the reference kernel (same cache, -n 2)
- both kernels in one run: the marginal cost of the second kernel
- each worker's GDB peak RSS with the distro vmlinux, its index cached
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from probes import Samples, run_suite

from pytest_syscall_irl.kernel.debian import DebianKernel
from pytest_syscall_irl.core.errors import SyscallIrlError
from pytest_syscall_irl.kernel.artifacts import find_vmlinux
from pytest_syscall_irl.kernel.build import cache_dir

DEBUG_BOOT = Path("/usr/lib/debug/boot")
FETCHED = "linux-image-6.12-cloud-amd64"  # without an installed one: `syscall-irl kernel fetch` it


@dataclass
class DistroRuns:
    kernel: tuple[Path, ...]  # bzImage, vmlinux[, modules]
    first_result: float = 0.0  # seconds from start to the first test result, empty cache
    first_total: float = 0.0
    warm: Samples = field(default_factory=Samples)  # the distro kernel, -n 2
    reference: Samples = field(default_factory=Samples)  # the reference kernel, -n 2
    both: Samples = field(default_factory=Samples)  # both kernels in one run, -n 2
    gdb_rss_kb: Samples = field(default_factory=Samples)  # every worker's GDB, warm distro runs

    @property
    def marginal(self) -> float:
        """What adding the distro kernel to a run of the reference kernel costs (median)."""
        return self.both.median - self.reference.median


def _release_key(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path.name)]


def find_distro_kernel() -> tuple[Path, ...] | None:
    """The newest /boot/vmlinuz-R whose -dbg vmlinux (/usr/lib/debug/boot/vmlinux-R) is installed,
    else Debian's 6.12 cloud kernel fetched into the cache (bzImage, vmlinux, modules)."""
    pairs = [(bz, DEBUG_BOOT / bz.name.replace("vmlinuz-", "vmlinux-", 1)) for bz in Path("/boot").glob("vmlinuz-*")]
    found = sorted((pair for pair in pairs if pair[1].is_file()), key=lambda pair: _release_key(pair[0]))
    if found:
        return found[-1]
    try:
        fetched = DebianKernel(FETCHED, cache_dir()).fetch()
    except SyscallIrlError as exc:
        print(f"\nno distribution kernel installed and {FETCHED} could not be fetched: {exc}")
        return None
    return fetched.bzimage, fetched.vmlinux, fetched.modules


def distro_runs(reference: Path, distro: tuple[Path, ...], samples: int) -> DistroRuns:
    """The first run in an empty cache, then *samples* rounds of (distro, reference, both)."""
    result = DistroRuns(distro)
    with tempfile.TemporaryDirectory(prefix="sirl-bench-distro-") as tmp:
        root, runs = Path(tmp), iter(range(10**6))
        env = {"SYSCALL_IRL_CACHE": str(root / "cache"), "SIRL_BENCH_FIRST_FILE": str(root / "first")}
        modules = [f"--syscall-irl-modules={distro[2]}"] if len(distro) > 2 else []
        own = [f"--kernel={distro[0]}", f"--syscall-irl-vmlinux={distro[1]}", *modules]
        ref = [f"--kernel={reference}"]
        # --syscall-irl-vmlinux and --syscall-irl-modules pair with the kernels by position.
        both = [*ref, own[0], f"--syscall-irl-vmlinux={find_vmlinux(reference)}", own[1]]
        if modules:
            both += ["--syscall-irl-modules=none", *modules]

        def run(options: list[str], rss: str = "rss") -> float:
            return run_suite(2, False, root / f"run{next(runs)}", root / rss, options, env)

        start = time.time()
        result.first_total = run(own, "first-rss")
        result.first_result = float((root / "first").read_text()) - start
        run(ref)  # untimed: the reference kernel's image and snapshot in this cache
        for _ in range(samples):
            result.warm.add(run(own, "distro-rss"))
            result.reference.add(run(ref))
            result.both.add(run(both))
        for line in (root / "distro-rss").read_text().splitlines():
            what, kb = line.split()
            if what == "gdb":
                result.gdb_rss_kb.add(float(kb))
    return result

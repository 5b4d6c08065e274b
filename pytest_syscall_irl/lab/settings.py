"""What a lab is asked for: the resolved, validated settings of one kernel under test, the
boot arguments the lab cannot honour, and how several kernels are named and paired with
their options. No pytest here: the plugin resolves its options into a `LabSettings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..core.errors import ConfigError
from ..kernel.artifacts import Kernel, split_cmdline
from ..kernel.modules import GuestModules


@dataclass(frozen=True)
class LabSettings:
    """Resolved, validated settings: what the plugin's options mean."""

    kernel: Kernel
    qemu: str
    gdb: str
    accel: str  # "auto", "kvm" or "tcg"
    boot_args: str
    cache: Path
    snapshots: bool = True  # start guests from a saved ready state (see snapshot.py)
    payload_dirs: tuple[Path, ...] = ()  # the user's guest programs, beside guest/payloads/
    modules: GuestModules = GuestModules()  # inserted by the guest's init (drivers built as modules)

    @property
    def payloads_on_iso(self) -> bool:
        """True if the guest can mount the payload ISO: its drivers are built in or among the modules."""
        return self.kernel.payloads_on_iso or self.modules.covers(self.kernel.missing_for_iso)

    def describe(self) -> dict[str, str]:
        """What a report says of this kernel under test and the options it runs with."""
        kernel = self.kernel
        return {"release": kernel.release, "bzImage": str(kernel.bzimage.path),
                "vmlinux": f"{kernel.vmlinux.path} ({'DWARF' if kernel.dwarf else 'no DWARF'})",
                "modules": str(self.modules),
                "payloads": "ISO9660 image" if self.payloads_on_iso else "initramfs (kernel cannot mount the ISO)",
                "boot_args": self.boot_args, "accel": self.accel, "snapshots": "on" if self.snapshots else "off"}

    @property
    def gdb_index_cache(self) -> Path:
        """GDB's index cache directory (a vmlinux's symbols load in a fraction of the time)."""
        return self.cache / "gdb-index-cache"



# Parameters that would undo what the lab's own command line sets up (kernel's spelling:
# dashes and underscores are the same), with why.
_LAB_PARAMS = {
    "kaslr": "guests boot with nokaslr, so that breakpoints sit at the vmlinux addresses (on x86 nokaslr wins): "
             "drop it",
    "rdinit": "the lab's agent must be the guest's /init: drop it",
}


def kernel_ids(settings: Sequence[LabSettings]) -> list[str]:
    """One test id per kernel under test: its release, numbered @1, @2... where two
    kernels share one (a patched kernel and its base)."""
    releases = [one.kernel.release for one in settings]
    seen: dict[str, int] = {}
    ids = []
    for release in releases:
        seen[release] = seen.get(release, 0) + 1
        ids.append(release if releases.count(release) == 1 else f"{release}@{seen[release]}")
    return ids


_T = TypeVar("_T")


def pair_by_position(option: str, values: Sequence[_T], kernels: int) -> list[_T | None]:
    """One value of *option* per kernel, by position: given once per kernel, once for all
    of them, or not at all (None: each kernel's default)."""
    if len(values) == 1:
        return [values[0]] * kernels
    if values and len(values) != kernels:
        raise ConfigError(f"--syscall-irl-{option} given {len(values)} times for {kernels} kernels: give one "
                          f"--syscall-irl-{option} per --syscall-irl-kernel, in the same order, or none")
    return [*values] if values else [None] * kernels


def check_boot_args(boot_args: str) -> None:
    """ConfigError for kernel arguments the lab cannot honour, read as the kernel reads
    them (quotes group; an unbalanced quote is an error)."""
    for param, value in split_cmdline(boot_args):
        name = param.replace("-", "_")
        if name in _LAB_PARAMS:
            raise ConfigError(f"boot arguments: {param}: {_LAB_PARAMS[name]}")
        if name == "console" and not (value or "").startswith("ttyS0"):
            raise ConfigError(f"boot arguments: console={value}: the lab drives the guest on ttyS0, and the last "
                              "console= becomes the agent's /dev/console: drop it")



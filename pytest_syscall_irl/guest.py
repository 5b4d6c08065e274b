"""A booted guest (QEMU machine + console) and the Lab that makes guests for one kernel.

No pytest here: the plugin resolves its options into a `LabSettings`, and a user can
drive the same objects from a script.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection
from filelock import FileLock

from .console import CommandResult, GuestConsole
from .gdbmi import GdbSession
from .errors import ConfigError, ConsoleError, ImageError, QemuError, StateLoadError, SyscallIrlError, SyscallIrlWarning
from .image import GuestImage, Payload, build_guest_image
from .integrity import atomic_write, manifest_problem, write_manifest
from .kernel import Kernel, split_cmdline
from .modules import GuestModules
from .qemu import DEFAULT_APPEND, MachineConfig, QemuMachine, kvm_probe
from .snapshot import Snapshot, SnapshotInfo, discard_unloadable, load_or_build, qemu_identity, snapshot_key

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 90.0
# A cold boot prints its first console line ~1.5 s after QEMU starts (TCG, a 14 MB
# distro kernel, load average 4 on 2 cores); ten times that and it is not booting at all.
FIRST_OUTPUT_TIMEOUT = 15.0
# A restored guest answers in well under a second; a longer wait means it is broken.
RESTORE_TIMEOUT = 20.0
SETTLE_TIMEOUT = 10.0  # for a command a test left running to end
INDEX_LOCK_TIMEOUT = 600.0


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


@dataclass
class Guest:
    """A running guest: its QEMU machine and its serial console."""

    name: str
    machine: QemuMachine
    console: GuestConsole
    image: GuestImage
    boot_seconds: float = 0.0
    debugger: GdbSession | None = None  # set while a GDB session is attached
    restored: bool = False  # started from the lab's snapshot rather than booted

    @property
    def config(self) -> MachineConfig:
        """The QEMU configuration the guest runs with."""
        return self.machine.config

    @property
    def gdb_socket(self) -> Path:
        """QEMU's gdbstub, a unix socket (GDB: `target remote PATH`)."""
        return self.machine.sockets.gdb

    @property
    def delivery(self) -> str:
        """Where this guest found its payloads: "iso" or "initramfs"."""
        return self.console.delivery or "unknown"

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run a shell command in the guest; its output and exit status.

        A command needs running vCPUs: when an attached debugger holds the guest
        stopped, the guest runs for the command and is stopped again afterwards.
        """
        with self.running():
            return self.console.run(command, timeout)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Let the vCPUs run for the block if an attached debugger holds them stopped,
        and stop them again after it; without a stopped debugger, nothing to do."""
        debugger = self.debugger
        if debugger is None or debugger.state != "stopped":
            yield
            return
        debugger.resume()
        try:
            yield
        except ConsoleError as exc:
            if debugger.state == "stopped":
                exc.message += " (the guest hit a breakpoint meanwhile)"
            raise
        finally:
            if debugger.is_alive() and debugger.state != "stopped":
                debugger.interrupt()

    def settle(self, timeout: float | None = None) -> bool:
        """Make the guest ready for another test: read to the end a command the last one
        left running (its output is dropped). False if the guest is dead, or if the
        command did not end within *timeout* (default SETTLE_TIMEOUT): the guest is then
        of no further use."""
        if not self.is_alive():
            return False
        pending = self.console.pending
        if pending is None:
            return True
        try:
            with self.running():
                result = pending.wait(SETTLE_TIMEOUT if timeout is None else timeout)
        except SyscallIrlError as exc:
            log.warning("%s: command %r left running did not end: %s", self.name, pending.command, exc)
            return False
        log.info("%s: command %r left running ended with status %d", self.name, pending.command, result.status)
        return True

    def payload(self, name: str) -> Payload:
        """A guest program of guest/payloads/ (in the guest: payload.guest_path)."""
        return self.image.payload(name)

    def is_alive(self) -> bool:
        return self.machine.is_running()

    def shutdown(self) -> None:
        """Stop the guest; idempotent."""
        self.console.close()
        self.machine.shutdown()


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


def kernel_lines(settings: Sequence[LabSettings]) -> list[str]:
    """What a report header says of each kernel under test (named by its id when there are several)."""
    lines = []
    for kernel_id, one in zip(kernel_ids(settings), settings):
        about = one.describe()
        name = f"kernel[{kernel_id}]" if len(settings) > 1 else "kernel"
        lines += [f"{name} {about['release']} ({about['bzImage']})",
                  f"{name} vmlinux {about['vmlinux']}; modules {about['modules']}; payloads via {about['payloads']}"]
    return lines


def kernel_properties(settings: Sequence[LabSettings]) -> list[tuple[str, str]]:
    """Each kernel under test and its options as (name, value) pairs, for JUnit's testsuite properties."""
    return [(f"syscall-irl kernel[{kernel_id}] {name}", value)
            for kernel_id, one in zip(kernel_ids(settings), settings) for name, value in one.describe().items()]


_T = TypeVar("_T")


def pair_by_position(option: str, values: Sequence[_T], kernels: int) -> list[_T | None]:
    """One value of *option* per kernel, by position: given once per kernel, once for all
    of them, or not at all (None: each kernel's default)."""
    if len(values) == 1:
        return [values[0]] * kernels
    if values and len(values) != kernels:
        raise ConfigError(f"--{option} given {len(values)} times for {kernels} kernels: give one --{option} per "
                          f"--kernel, in the same order, or none")
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


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


KVM_VERDICTS = ("kvm", "tcg")


def kvm_verdict(settings: LabSettings) -> tuple[bool, str]:
    """(usable, finding) of the KVM probe: run once per host boot and QEMU, shared by every
    process through a marker file; a marker that does not parse is probed again."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    # The probe costs seconds where KVM hangs: once per host boot, shared by all workers.
    marker = settings.cache / "kvm-probe" / f"{_boot_id()}-{Path(settings.qemu).name}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(marker) + ".lock"):
        verdict, _, why = (marker.read_text() if marker.exists() else "").partition("\n")
        if verdict not in KVM_VERDICTS or not why.strip():
            if marker.exists():
                log.warning("KVM probe marker %s is damaged: probing again", marker)
            usable, why = kvm_probe(settings.qemu, settings.kernel.bzimage.path)
            verdict = "kvm" if usable else "tcg"
            atomic_write(marker, f"{verdict}\n{why}")
    return verdict == "kvm", why.strip()


def decide_accel(settings: LabSettings) -> tuple[str, str]:
    """(accelerator, why) for *settings*: "auto" probes KVM once per host boot."""
    if settings.accel != "auto":
        return settings.accel, "requested"
    usable, why = kvm_verdict(settings)
    return ("kvm" if usable else "tcg"), f"auto: {why}"


def check_accel(settings: LabSettings) -> None:
    """ConfigError for an accelerator that is not one, or KVM where the probe saw it fail."""
    if settings.accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"accelerator {settings.accel!r}: use auto, kvm or tcg")
    if settings.accel != "kvm":
        return
    usable, why = kvm_verdict(settings)
    if not usable:
        raise ConfigError(f"--accel=kvm, but KVM does not work here: {why}; use --accel=tcg (or auto, which "
                          "takes KVM only where a KVM guest really boots)")


_Ready = Callable[[QemuMachine, GuestConsole], None]


@dataclass
class Lab:
    """Makes guests of one kernel and one guest image; logs go under *log_root*.

    Guests start from the lab's snapshot (a saved ready guest, built on first need)
    unless `settings.snapshots` is off or `boot(restore=False)` asks for a cold boot.
    """

    settings: LabSettings
    log_root: Path
    _image: GuestImage | None = field(default=None, init=False)
    _accel: tuple[str, str] | None = field(default=None, init=False)
    # By (extra boot arguments, CPU model).
    _snapshots: dict[tuple[str, str | None], Snapshot] = field(default_factory=dict, init=False)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False)

    @property
    def kernel(self) -> Kernel:
        return self.settings.kernel

    @property
    def image(self) -> GuestImage:
        """The guest image for this kernel (built once, cached by content)."""
        if self._image is None:
            self._image = build_guest_image(self.settings.cache, payloads_on_iso=self.settings.payloads_on_iso,
                                            payload_dirs=self.settings.payload_dirs, modules=self.settings.modules)
        return self._image

    @property
    def accel(self) -> str:
        """The accelerator guests use: "kvm" only where a KVM guest really boots."""
        if self._accel is None:
            self._accel = decide_accel(self.settings)
        return self._accel[0]

    def machine_config(self, boot_args: str = "", cpu: str | None = None) -> MachineConfig:
        """The QEMU configuration of this lab's guests; *boot_args* are appended to the
        kernel command line after the defaults and `settings.boot_args`; *cpu* is QEMU's
        CPU model (default: QEMU's)."""
        check_boot_args(boot_args)
        append = " ".join(filter(None, [DEFAULT_APPEND, self.settings.boot_args, boot_args.strip()]))
        return MachineConfig(kernel=self.kernel.bzimage.path, initrd=self.image.initramfs, iso=self.image.iso,
                             append=append, accel=self.accel, qemu=self.settings.qemu, cpu=cpu or None)

    def snapshot_key(self, boot_args: str = "", cpu: str | None = None) -> str:
        """The cache key of a snapshot (kernel, image, QEMU, machine arguments)."""
        config = self.machine_config(boot_args, cpu)
        return snapshot_key(config, qemu_identity(config.qemu))

    def snapshot(self, boot_args: str = "", cpu: str | None = None) -> Snapshot:
        """The saved ready guest for *boot_args* and *cpu*: from the cache, else booted
        and saved once (one build even when several processes ask at the same time)."""
        variant = (boot_args, cpu or None)
        if variant not in self._snapshots:
            key = self.snapshot_key(boot_args, cpu)
            self._snapshots[variant] = load_or_build(
                self.settings.cache, key, lambda state: self._save_ready_guest(key, state, boot_args, cpu))
        return self._snapshots[variant]

    def _save_ready_guest(self, key: str, state: Path, boot_args: str, cpu: str | None) -> SnapshotInfo:
        # Each attempt logs to its own directory: a retry must not overwrite the failure's logs.
        guest = self._cold_boot(f"snapshot-{key}-{os.getpid()}-{next(self._names)}", BOOT_TIMEOUT, boot_args, cpu)
        try:
            # Saved idle: the agent blocked reading its next command, no debugger attached.
            guest.run("true", RESTORE_TIMEOUT).check()
            start = time.monotonic()
            guest.machine.save_state(state)
            log.info("saved %s to %s in %.2f s (%d MB)", guest.name, state, time.monotonic() - start,
                     state.stat().st_size >> 20)
            return SnapshotInfo(guest.delivery, guest.console.release or "", guest.boot_seconds)
        finally:
            guest.shutdown()

    def boot(self, name: str | None = None, timeout: float = BOOT_TIMEOUT, restore: bool | None = None,
             boot_args: str = "", cpu: str | None = None) -> Guest:
        """A guest at its ready console; on failure nothing is left running.

        *boot_args* are extra kernel arguments (``pti=on``), *cpu* a QEMU CPU model
        (``qemu64,vendor=GenuineIntel``); guests of other arguments or CPU start from a
        snapshot of their own. *restore* (default: `settings.snapshots`) starts the
        guest from its snapshot, else the kernel boots; `Guest.restored` tells which.
        """
        name = name or f"guest-{os.getpid()}-{next(self._names)}"
        if self.settings.snapshots if restore is None else restore:
            return self._restore_or_rebuild(name, timeout, boot_args, cpu)
        return self._cold_boot(name, timeout, boot_args, cpu)

    def _restore_or_rebuild(self, name: str, timeout: float, boot_args: str, cpu: str | None) -> Guest:
        """Restore from the snapshot; one QEMU cannot load is discarded and built again, once."""
        snapshot = self.snapshot(boot_args, cpu)
        try:
            return self._restore(name, snapshot, timeout, boot_args, cpu)
        except StateLoadError as exc:
            warnings.warn(SyscallIrlWarning(f"QEMU could not load the guest snapshot {snapshot.directory} "
                                            f"(damaged?): building it again. {exc.message}"), stacklevel=2)
            self._snapshots.pop((boot_args, cpu or None), None)
            discard_unloadable(snapshot)
        snapshot = self.snapshot(boot_args, cpu)
        try:
            return self._restore(f"{name}-rebuilt", snapshot, timeout, boot_args, cpu)
        except StateLoadError as exc:
            raise QemuError(f"QEMU cannot load the guest snapshot {snapshot.directory} even after it was built "
                            f"again: cold-boot every guest with --no-snapshots, and report it (logs: "
                            f"{self.log_root / (name + '-rebuilt')})", command=exc.command, exit_code=exc.exit_code,
                            log_tail=exc.log_tail) from exc

    def _cold_boot(self, name: str, timeout: float, boot_args: str = "", cpu: str | None = None) -> Guest:
        def ready(machine: QemuMachine, console: GuestConsole) -> None:
            machine.resume()
            delivery = console.wait_ready(timeout, silence=FIRST_OUTPUT_TIMEOUT)
            if delivery != self.image.delivery:
                raise ImageError(f"the guest found its payloads via {delivery!r}, expected "
                                 f"{self.image.delivery!r}: see the console log {machine.console_log}")

        return self._start(name, self.machine_config(boot_args, cpu), ready)

    def _restore(self, name: str, snapshot: Snapshot, timeout: float, boot_args: str = "",
                 cpu: str | None = None) -> Guest:
        def ready(machine: QemuMachine, console: GuestConsole) -> None:
            machine.resume()
            # No READY line after a restore (the agent is waiting for a command): a no-op
            # command proves the console works, the snapshot tells what READY said.
            console.run("true", min(timeout, RESTORE_TIMEOUT)).check()
            console.delivery, console.release = snapshot.info.delivery, snapshot.info.release

        return self._start(name, replace(self.machine_config(boot_args, cpu), incoming=snapshot.state), ready)

    def _start(self, name: str, config: MachineConfig, ready: _Ready) -> Guest:
        log_dir = self.log_root / name
        machine = QemuMachine(config, log_dir)
        start = time.monotonic()
        machine.launch()
        console = GuestConsole(machine.sockets.console, log_dir / "console.transcript")
        try:
            console.connect()
            ready(machine, console)
        except BaseException as exc:
            console.close()
            machine.shutdown()
            if not isinstance(exc, SyscallIrlError):
                raise
            if not exc.log_tail:
                exc.log_tail = machine.log_tail()
            failure = machine.load_failure(exc)  # QEMU may exit on a bad state before the console connects
            if failure is exc:
                raise
            raise failure from exc
        restored = config.incoming is not None
        guest = Guest(name, machine, console, self.image, time.monotonic() - start, restored=restored)
        log.info("%s %s in %.2f s (%s, payloads via %s)", name, "restored" if restored else "booted",
                 guest.boot_seconds, self.accel, guest.delivery)
        return guest


# --- GDB's index cache ---------------------------------------------------------------


def gnu_build_id(path: Path) -> str | None:
    """The GNU build id of the ELF file *path* in hex (GDB names index cache files by it)."""
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if not isinstance(section, NoteSection):
                continue
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return None


def warm_gdb_index(settings: LabSettings) -> bool:
    """Fill GDB's index cache for the kernel's vmlinux, so every later GDB loads its
    symbols fast. Idempotent, and one process does it when several ask at once.
    True if this call filled it."""
    vmlinux = settings.kernel.vmlinux.path
    build_id = gnu_build_id(vmlinux)
    if build_id is None:
        log.info("%s has no build id: GDB's index cache cannot hold it", vmlinux)
        return False
    directory = settings.gdb_index_cache
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / f"{build_id}.sirl-manifest"
    with FileLock(str(directory) + ".lock", timeout=INDEX_LOCK_TIMEOUT):
        index = sorted(p for p in directory.glob(f"{build_id}.*") if p != manifest)
        if index:
            problem = manifest_problem(manifest)
            if problem is None:
                return False
            # GDB would load a damaged index as it is: drop it, GDB writes a new one.
            warnings.warn(SyscallIrlWarning(f"GDB index cache of {vmlinux} in {directory} is damaged ({problem}): "
                                            "building it again"), stacklevel=2)
            for path in index:
                path.unlink()
        start = time.monotonic()
        GdbSession(vmlinux, gdb=settings.gdb, index_cache_dir=directory).close()
        write_manifest(manifest, sorted(p for p in directory.glob(f"{build_id}.*") if p != manifest))
        log.info("GDB index of %s cached in %.1f s", vmlinux, time.monotonic() - start)
    return True

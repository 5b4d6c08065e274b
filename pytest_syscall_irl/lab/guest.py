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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core.errors import (ConsoleError, ImageError, KernelWarning, QemuError, StateLoadError, SyscallIrlError,
                           SyscallIrlWarning)
from ..kernel.artifacts import Kernel
from ..kernel.check import command_channel
from ..machine.console import CommandResult, GuestConsole
from ..machine.gdbmi import GdbSession
from ..machine.qemu import DEFAULT_APPEND, MachineConfig, QemuMachine
from .accel import decide_accel
from .boot_failures import BootFailures
from .image import GuestImage, Payload, build_guest_image
from .settings import LabSettings
from .snapshot import Snapshot, SnapshotInfo, discard_unloadable, load_or_build, qemu_identity, snapshot_key
from .variant import PLAIN, GuestVariant

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 90.0
# A cold boot prints its first console line ~1.5 s after QEMU starts (TCG, a 14 MB
# distro kernel, load average 4 on 2 cores); ten times that and it is not booting at all.
FIRST_OUTPUT_TIMEOUT = 15.0
# A restored guest answers in well under a second; a longer wait means it is broken.
RESTORE_TIMEOUT = 20.0
SETTLE_TIMEOUT = 10.0  # for a command a test left running to end
# The clocksource the kernel runs on; "tsc-early" (and any "-early" one) is provisional:
# the TSC refinement work replaces it about a second after it is registered (tsc.c).
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
# How long a booted kernel may take to leave its early clocksource (measured: ~1-3 s under TCG).
CLOCKSOURCE_TIMEOUT = 30.0
CLOCKSOURCE_POLL = 0.1
TRANSCRIPT = "console.transcript"


@dataclass
class Guest:
    """A running guest: its QEMU machine and its console (the agent's command channel, on a
    serial port of its own where the kernel has one, and the kernel's messages)."""

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
    def transcript(self) -> Path:
        """What the host read on the console at boot, then (command channel) each command
        with its output (cut at 4 KB) and exit status."""
        return self.machine.log_dir / TRANSCRIPT

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

    def warnings_mark(self) -> int:
        """A mark to pass to `check_no_new_warnings` later: how many kernel WARNINGs so far."""
        return len(self.console.kernel_warnings)

    def check_no_new_warnings(self, mark: int) -> None:
        """KernelWarning if the kernel printed a WARNING since *mark* (`warnings_mark`): a
        WARN_ON that fires is the kernel reporting a bug in itself."""
        new = self.console.kernel_warnings[mark:]
        if new:
            raise KernelWarning(f"the kernel printed {len(new)} WARNING(s) on its log while {self.name} was in use: "
                                + "; ".join(new[:3]), log_tail=self.console.kernel_log_tail())

    def payload(self, name: str) -> Payload:
        """A guest program of guest/payloads/ (in the guest: payload.guest_path)."""
        return self.image.payload(name)

    def is_alive(self) -> bool:
        return self.machine.is_running()

    def shutdown(self) -> None:
        """Stop the guest; idempotent."""
        self.console.close()
        self.machine.shutdown()

_Ready = Callable[[QemuMachine, GuestConsole], None]


@dataclass
class Lab:
    """Makes guests of one kernel and one guest image; logs go under *log_root*.

    Guests start from the lab's snapshot of their variant (a saved ready guest, built on
    first need) unless `settings.snapshots` is off or `boot(restore=False)` asks for a
    cold boot.

        lab = Lab(settings, Path("logs"))
        guest = lab.boot(variant=GuestVariant.of("pti=on"))
    """

    settings: LabSettings
    log_root: Path
    _image: GuestImage | None = field(default=None, init=False)
    _accel: tuple[str, str] | None = field(default=None, init=False)
    _snapshots: dict[GuestVariant, Snapshot] = field(default_factory=dict, init=False)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False)
    # A kernel that does not boot is booted once per variant (boot_failures.py).
    _boot_failures: BootFailures = field(default_factory=BootFailures, init=False)

    @property
    def kernel(self) -> Kernel:
        return self.settings.kernel

    def build_image(self) -> GuestImage:
        """Build the guest image for this kernel (or find it in the cache: it is cached by
        content); later calls return the same image."""
        if self._image is None:
            self._image = build_guest_image(self.settings.cache, payloads_on_iso=self.settings.payloads_on_iso,
                                            payload_dirs=self.settings.payload_dirs, modules=self.settings.modules)
        return self._image

    @property
    def image(self) -> GuestImage:
        """The guest image `build_image` built (`boot`, `snapshot` and `machine_config` build it)."""
        if self._image is None:
            raise RuntimeError("the lab's guest image is not built yet: call Lab.build_image() first")
        return self._image

    @property
    def accel(self) -> str:
        """The accelerator guests use: "kvm" only where a KVM guest really boots."""
        if self._accel is None:
            self._accel = decide_accel(self.settings)
        return self._accel[0]

    def machine_config(self, variant: GuestVariant = PLAIN) -> MachineConfig:
        """The QEMU configuration of this lab's guests of *variant*: its boot arguments follow
        the defaults and `settings.boot_args` on the kernel command line, its CPU model is
        QEMU's -cpu. The configuration names the image's files: the image is built first."""
        image = self.build_image()
        append = " ".join(filter(None, [DEFAULT_APPEND, self.settings.boot_args, variant.boot_args]))
        return MachineConfig(kernel=self.kernel.bzimage.path, initrd=image.initramfs, iso=image.iso,
                             append=append, accel=self.accel, qemu=self.settings.qemu, cpu=variant.cpu,
                             channel=command_channel(self.kernel) == "ttyS1")

    def snapshot_key(self, variant: GuestVariant = PLAIN) -> str:
        """The cache key of a snapshot (kernel, image, QEMU, machine arguments)."""
        return _key(self.machine_config(variant))

    def snapshot(self, variant: GuestVariant = PLAIN) -> Snapshot:
        """The saved ready guest of *variant*: from the cache, else booted and saved once
        (one build even when several processes ask at the same time)."""
        if variant in self._snapshots:
            return self._snapshots[variant]
        return self._snapshot_of(variant, self.machine_config(variant))

    def _snapshot_of(self, variant: GuestVariant, config: MachineConfig) -> Snapshot:
        """`snapshot` for a configuration already made (a boot makes it once)."""
        if variant not in self._snapshots:
            key = _key(config)
            self._snapshots[variant] = load_or_build(
                self.settings.cache, key, lambda state: self._save_ready_guest(key, state, config))
        return self._snapshots[variant]

    def _save_ready_guest(self, key: str, state: Path, config: MachineConfig) -> SnapshotInfo:
        # Each attempt logs to its own directory: a retry must not overwrite the failure's logs.
        guest = self._cold_boot(f"snapshot-{key}-{os.getpid()}-{next(self._names)}", BOOT_TIMEOUT, config)
        try:
            # Saved idle: the agent blocked reading its next command, no debugger attached.
            guest.run("true", RESTORE_TIMEOUT).check()
            start = time.monotonic()
            guest.machine.save_state(state)
            log.info("saved %s to %s in %.2f s (%d MB)", guest.name, state, time.monotonic() - start,
                     state.stat().st_size >> 20)
            return SnapshotInfo(guest.delivery, guest.console.release or "", guest.boot_seconds,
                                guest.console.channel)
        finally:
            guest.shutdown()

    def boot(self, name: str | None = None, timeout: float = BOOT_TIMEOUT, restore: bool | None = None,
             variant: GuestVariant = PLAIN) -> Guest:
        """A guest at its ready console; on failure nothing is left running.

        *variant* holds extra kernel arguments (``pti=on``) and a QEMU CPU model
        (``qemu64,vendor=GenuineIntel``); each variant's guests start from a snapshot of
        their own. *restore* (default: `settings.snapshots`) starts the guest from its
        snapshot, else the kernel boots; `Guest.restored` tells which.

        A kernel that dies while it boots (a panic; QEMU exiting by itself) raises
        BootFailure, and every later boot of the variant raises it again at once.
        """
        self._boot_failures.check(variant)
        name = name or f"guest-{os.getpid()}-{next(self._names)}"
        config = self.machine_config(variant)
        try:
            if self.settings.snapshots if restore is None else restore:
                return self._restore_or_rebuild(name, timeout, variant, config)
            return self._cold_boot(name, timeout, config)
        except SyscallIrlError as exc:
            failure = self._boot_failures.judge(variant, exc)
            if failure is exc:
                raise
            raise failure from exc

    def _restore_or_rebuild(self, name: str, timeout: float, variant: GuestVariant, config: MachineConfig) -> Guest:
        """Restore from the snapshot; one QEMU cannot load is discarded and built again, once."""
        snapshot = self._snapshot_of(variant, config)
        try:
            return self._restore(name, snapshot, timeout, config)
        except StateLoadError as exc:
            warnings.warn(SyscallIrlWarning(f"QEMU could not load the guest snapshot {snapshot.directory} "
                                            f"(damaged?): building it again. {exc.message}"), stacklevel=2)
            self._snapshots.pop(variant, None)
            discard_unloadable(snapshot)
        snapshot = self._snapshot_of(variant, config)
        try:
            return self._restore(f"{name}-rebuilt", snapshot, timeout, config)
        except StateLoadError as exc:
            raise QemuError(f"QEMU cannot load the guest snapshot {snapshot.directory} even after it was built "
                            f"again: cold-boot every guest with --syscall-irl-no-snapshots, and report it (logs: "
                            f"{self.log_root / (name + '-rebuilt')})", command=exc.command, exit_code=exc.exit_code,
                            log_tail=exc.log_tail) from exc

    def _cold_boot(self, name: str, timeout: float, config: MachineConfig) -> Guest:
        def ready(machine: QemuMachine, console: GuestConsole) -> None:
            machine.resume()
            delivery = console.wait_ready(timeout, silence=FIRST_OUTPUT_TIMEOUT)
            if delivery != self.image.delivery:
                raise ImageError(f"the guest found its payloads via {delivery!r}, expected "
                                 f"{self.image.delivery!r}: see the console log {machine.console_log}")
            wait_for_final_clocksource(console, name)

        return self._start(name, config, ready)

    def _restore(self, name: str, snapshot: Snapshot, timeout: float, config: MachineConfig) -> Guest:
        def ready(machine: QemuMachine, console: GuestConsole) -> None:
            machine.resume()
            # No READY line after a restore (the agent is waiting for a command): the snapshot
            # tells what READY said, and a no-op command proves the console works.
            console.use_channel(snapshot.info.channel)
            console.run("true", min(timeout, RESTORE_TIMEOUT)).check()
            console.delivery, console.release = snapshot.info.delivery, snapshot.info.release

        return self._start(name, replace(config, incoming=snapshot.state), ready)

    def _start(self, name: str, config: MachineConfig, ready: _Ready) -> Guest:
        log_dir = self.log_root / name
        machine = QemuMachine(config, log_dir)
        start = time.monotonic()
        machine.launch()
        console = GuestConsole(machine.sockets.console, log_dir / TRANSCRIPT,
                               channel_path=machine.sockets.channel if config.channel else None)
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


def _key(config: MachineConfig) -> str:
    """The snapshot key of a configuration (see snapshot.snapshot_key)."""
    return snapshot_key(config, qemu_identity(config.qemu))


def wait_for_final_clocksource(console: GuestConsole, name: str, timeout: float = CLOCKSOURCE_TIMEOUT) -> str:
    """Wait until the booted kernel has left its early clocksource, and return the one it
    runs on ("" if it tells none). A guest is handed out, and a ready guest saved, only then:
    a snapshot saved on tsc-early switched to tsc ~3 s after every restore, so tests in the
    first seconds of a guest (the vDSO's, which depend on the clocksource) ran across the
    switch, and what they saw depended on timing. A kernel that keeps an early clocksource
    past *timeout* is left as it is, with a warning in the log."""
    deadline = time.monotonic() + timeout
    while True:
        result = console.run(f"cat {CLOCKSOURCE}", RESTORE_TIMEOUT)
        source = result.output.strip() if result.status == 0 else ""
        if not source.endswith("-early"):
            return source
        if time.monotonic() > deadline:
            log.warning("%s: still on the clocksource %s %.0f s after boot", name, source, timeout)
            return source
        time.sleep(CLOCKSOURCE_POLL)

"""A booted guest (QEMU machine + console) and the Lab that makes guests for one kernel.

No pytest here: the plugin resolves its options into a `LabSettings`, and a user can
drive the same objects from a script.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from .console import CommandResult, GuestConsole
from .gdbmi import GdbSession
from .errors import ConsoleError, ImageError, SyscallIrlError
from .image import GuestImage, Payload, build_guest_image
from .kernel import Kernel
from .qemu import DEFAULT_APPEND, MachineConfig, QemuMachine, kvm_probe

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 90.0


@dataclass(frozen=True)
class LabSettings:
    """Resolved, validated settings: what the plugin's options mean."""

    kernel: Kernel
    qemu: str
    gdb: str
    accel: str  # "auto", "kvm" or "tcg"
    boot_args: str
    cache: Path


@dataclass
class Guest:
    """A running guest: its QEMU machine and its serial console."""

    name: str
    machine: QemuMachine
    console: GuestConsole
    image: GuestImage
    boot_seconds: float = 0.0
    debugger: GdbSession | None = None  # set while a GDB session is attached

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
        debugger = self.debugger
        if debugger is None or debugger.state != "stopped":
            return self.console.run(command, timeout)
        debugger.resume()
        try:
            return self.console.run(command, timeout)
        except ConsoleError as exc:
            if debugger.state == "stopped":
                exc.message += " (the guest hit a breakpoint while running it)"
            raise
        finally:
            if debugger.is_alive() and debugger.state != "stopped":
                debugger.interrupt()

    def payload(self, name: str) -> Payload:
        """A guest program of guest/payloads/ (in the guest: payload.guest_path)."""
        return self.image.payload(name)

    def is_alive(self) -> bool:
        return self.machine.is_running()

    def shutdown(self) -> None:
        """Stop the guest; idempotent."""
        self.console.close()
        self.machine.shutdown()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def decide_accel(settings: LabSettings) -> tuple[str, str]:
    """(accelerator, why) for *settings*: "auto" probes KVM once per host boot."""
    if settings.accel != "auto":
        return settings.accel, "requested"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "auto: no usable /dev/kvm"
    # The probe costs seconds where KVM hangs: once per host boot, shared by all workers.
    marker = settings.cache / "kvm-probe" / f"{_boot_id()}-{Path(settings.qemu).name}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(marker) + ".lock"):
        if not marker.exists():
            usable, why = kvm_probe(settings.qemu, settings.kernel.bzimage.path)
            marker.write_text(("kvm" if usable else "tcg") + "\n" + why)
        accel, why = marker.read_text().split("\n", 1)
    return accel, f"auto: {why}"


@dataclass
class Lab:
    """Makes guests of one kernel and one guest image; logs go under *log_root*."""

    settings: LabSettings
    log_root: Path
    _image: GuestImage | None = field(default=None, init=False)
    _accel: tuple[str, str] | None = field(default=None, init=False)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False)

    @property
    def kernel(self) -> Kernel:
        return self.settings.kernel

    @property
    def image(self) -> GuestImage:
        """The guest image for this kernel (built once, cached by content)."""
        if self._image is None:
            self._image = build_guest_image(self.settings.cache, payloads_on_iso=self.kernel.payloads_on_iso)
        return self._image

    @property
    def accel(self) -> str:
        """The accelerator guests use: "kvm" only where a KVM guest really boots."""
        if self._accel is None:
            self._accel = decide_accel(self.settings)
        return self._accel[0]

    def machine_config(self) -> MachineConfig:
        """The QEMU configuration of every guest of this lab."""
        append = " ".join(filter(None, [DEFAULT_APPEND, self.settings.boot_args]))
        return MachineConfig(kernel=self.kernel.bzimage.path, initrd=self.image.initramfs, iso=self.image.iso,
                             append=append, accel=self.accel, qemu=self.settings.qemu)

    def boot(self, name: str | None = None, timeout: float = BOOT_TIMEOUT) -> Guest:
        """Boot a guest to its ready console; on failure nothing is left running."""
        name = name or f"guest-{os.getpid()}-{next(self._names)}"
        log_dir = self.log_root / name
        machine = QemuMachine(self.machine_config(), log_dir)
        start = time.monotonic()
        machine.launch()
        console = GuestConsole(machine.sockets.console, log_dir / "console.transcript")
        try:
            console.connect()
            machine.resume()
            delivery = console.wait_ready(timeout)
            if delivery != self.image.delivery:
                raise ImageError(f"the guest found its payloads via {delivery!r}, expected "
                                 f"{self.image.delivery!r}: see the console log {machine.console_log}")
        except BaseException as exc:
            console.close()
            machine.shutdown()
            if isinstance(exc, SyscallIrlError) and not exc.log_tail:
                exc.log_tail = machine.log_tail()
            raise
        guest = Guest(name, machine, console, self.image, time.monotonic() - start)
        log.info("%s ready in %.2f s (%s, payloads via %s)", name, guest.boot_seconds, self.accel, guest.delivery)
        return guest

"""Which accelerator guests use: KVM only where a KVM guest really boots (a dead KVM is
detected by a probe, once per host boot and QEMU, not waited on), else TCG."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..core.cache import CacheEntry
from ..core.errors import ConfigError, QemuError
from ..machine.qemu import kvm_probe
from .settings import LabSettings

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


KVM_VERDICTS = ("kvm", "tcg")


def _marker_problem(marker: Path) -> str | None:
    verdict, _, why = marker.read_text().partition("\n")
    return None if verdict in KVM_VERDICTS and why.strip() else "it does not read VERDICT, newline, finding"


def kvm_verdict(settings: LabSettings) -> tuple[bool, str]:
    """(usable, finding) of the KVM probe: run once per host boot and QEMU, shared by every
    process through a marker file in the cache; a marker that does not parse is probed again."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    # The probe costs seconds where KVM hangs: once per host boot, shared by all workers.
    marker = settings.cache / "kvm-probe" / f"{_boot_id()}-{Path(settings.qemu).name}"

    def probe(staging: Path) -> None:
        usable, why = kvm_probe(settings.qemu, settings.kernel.bzimage.path)
        staging.write_text(f"{'kvm' if usable else 'tcg'}\n{why}")

    CacheEntry.file(marker, "KVM probe marker", _marker_problem, QemuError).ensure(probe)
    verdict, _, why = marker.read_text().partition("\n")
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
        raise ConfigError(f"--syscall-irl-accel=kvm, but KVM does not work here: {why}; use "
                          "--syscall-irl-accel=tcg (or auto, which takes KVM only where a KVM guest really boots)")

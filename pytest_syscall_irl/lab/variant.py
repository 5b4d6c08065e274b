"""What sets some guests of a lab apart from its plain ones: extra kernel arguments and a QEMU
CPU model. A variant is checked once, where it is made, and then travels as one value: the
lab's snapshots and a worker's shared guests are kept by it. No pytest here: the plugin reads
a test's markers into a variant, a script makes one itself.

    variant = GuestVariant.of("pti=on", cpu="qemu64,vendor=GenuineIntel")
    guest = lab.boot(variant=variant)
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import check_boot_args


@dataclass(frozen=True)
class GuestVariant:
    """Extra kernel arguments (appended after the lab's own) and a QEMU CPU model (None:
    QEMU's default). Frozen and hashable; made valid or not at all (ConfigError)."""

    boot_args: str = ""
    cpu: str | None = None

    def __post_init__(self) -> None:
        # Two spellings of one variant would be two snapshots and two shared guests: the
        # stored form is the stripped one, and an empty CPU model is QEMU's default.
        object.__setattr__(self, "boot_args", self.boot_args.strip())
        object.__setattr__(self, "cpu", (self.cpu or "").strip() or None)
        check_boot_args(self.boot_args)

    @classmethod
    def of(cls, boot_args: str = "", cpu: str | None = None) -> GuestVariant:
        """The variant of these extra kernel arguments (read as the kernel reads them) and
        CPU model; ConfigError for arguments the lab cannot honour (`kaslr`, `rdinit=`)."""
        return cls(boot_args, cpu)

    def __str__(self) -> str:
        parts = [f"boot arguments {self.boot_args!r}" if self.boot_args else "",
                 f"CPU {self.cpu}" if self.cpu else ""]
        return ", ".join(filter(None, parts)) or "plain"


# The lab's own guests: no extra arguments, QEMU's CPU model.
PLAIN = GuestVariant()

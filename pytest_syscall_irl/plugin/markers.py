"""The markers a test asks for guests of its own kind with, read into one `GuestVariant`:

    @pytest.mark.boot_args("pti=on")
    @pytest.mark.cpu("qemu64,vendor=GenuineIntel")
    def test_pti_on_intel(guest): ...

A misused marker fails the test with the fix, without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ..core.errors import ConfigError

if TYPE_CHECKING:
    from ..lab.variant import GuestVariant

BOOT_ARGS_USAGE = "@pytest.mark.boot_args takes one string of kernel arguments, e.g. @pytest.mark.boot_args(\"pti=on\")"
CPU_USAGE = "@pytest.mark.cpu takes one QEMU CPU model, e.g. @pytest.mark.cpu(\"qemu64,vendor=GenuineIntel\")"


def register_markers(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "boot_args(args): boot the test's guests (guest, fresh_guest) with these "
                            "extra kernel arguments, e.g. boot_args(\"pti=on\"); each set has its own snapshot")
    config.addinivalue_line("markers", "cpu(model): boot the test's guests (guest, fresh_guest) with this QEMU CPU "
                            "model, e.g. cpu(\"qemu64,vendor=GenuineIntel\"); each model has its own snapshot")


def variant_of(node: pytest.Item) -> GuestVariant:
    """The guest variant the test asks for with @pytest.mark.boot_args and @pytest.mark.cpu."""
    from ..lab.variant import GuestVariant
    boot_args = _one_string(node, "boot_args", BOOT_ARGS_USAGE, allow_blank=True)
    cpu = _one_string(node, "cpu", CPU_USAGE, allow_blank=False)
    try:
        return GuestVariant.of(boot_args or "", cpu)  # inner spaces may be quoted: param="a  b"
    except ConfigError as exc:
        pytest.fail(f"@pytest.mark.boot_args({boot_args!r}): {exc.message}", pytrace=False)


def _one_string(node: pytest.Item, name: str, usage: str, *, allow_blank: bool) -> str | None:
    """The one string argument of the marker *name* closest to the test, None without one."""
    marker = node.get_closest_marker(name)
    if marker is None:
        return None
    args, kwargs = marker.args, marker.kwargs
    if len(args) != 1 or not isinstance(args[0], str) or kwargs or not (allow_blank or args[0].strip()):
        pytest.fail(f"{usage}; got {args!r} {kwargs!r}", pytrace=False)
    return str(args[0])

"""The markers a test asks for guests of its own kind with, read into one `GuestVariant`:

    @pytest.mark.syscall_irl_boot_args("pti=on")
    @pytest.mark.syscall_irl_cpu("qemu64,vendor=GenuineIntel")
    def test_pti_on_intel(guest): ...

The old names `boot_args` and `cpu` still work for one release, with a deprecation warning.
A misused marker fails the test with the fix, without a traceback. Also here: the default
pytest-timeout bound of the tests that use our fixtures (`apply_default_timeout`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from ..core.errors import ConfigError, SyscallIrlWarning

if TYPE_CHECKING:
    from ..lab.variant import GuestVariant


class SyscallIrlDeprecationWarning(SyscallIrlWarning, DeprecationWarning):
    """A spelling of ours that goes in the next release."""


BOOT_ARGS = "syscall_irl_boot_args"
CPU = "syscall_irl_cpu"
DEPRECATED = {"boot_args": BOOT_ARGS, "cpu": CPU}  # old name -> new name; removed in the next release
BOOT_ARGS_USAGE = (f"@pytest.mark.{BOOT_ARGS} takes one string of kernel arguments, "
                   f"e.g. @pytest.mark.{BOOT_ARGS}(\"pti=on\")")
CPU_USAGE = f"@pytest.mark.{CPU} takes one QEMU CPU model, e.g. @pytest.mark.{CPU}(\"qemu64,vendor=GenuineIntel\")"
DEFAULT_TIMEOUT = 300  # s: longer than every internal deadline (a cold boot under TCG is bounded to 90 s)


def register_markers(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{BOOT_ARGS}(args): boot the test's guests (guest, fresh_guest) with these "
                            f"extra kernel arguments, e.g. {BOOT_ARGS}(\"pti=on\"); each set has its own snapshot")
    config.addinivalue_line("markers", f"{CPU}(model): boot the test's guests (guest, fresh_guest) with this QEMU CPU "
                            f"model, e.g. {CPU}(\"qemu64,vendor=GenuineIntel\"); each model has its own snapshot")
    # Still registered, so a suite under --strict-markers keeps running for one release.
    for old, new in DEPRECATED.items():
        config.addinivalue_line("markers", f"{old}: deprecated spelling of {new} (pytest-syscall-irl), "
                                           f"removed in the next release")


def warn_deprecated_markers(item: pytest.Item) -> None:
    """A deprecation warning for each old marker name a test of ours uses."""
    for old, new in DEPRECATED.items():
        if item.get_closest_marker(old) is not None and item.get_closest_marker(new) is None:
            item.warn(SyscallIrlDeprecationWarning(f"@pytest.mark.{old} is deprecated and goes in the next release: "
                                        f"use @pytest.mark.{new}"))


def variant_of(node: pytest.Item) -> GuestVariant:
    """The guest variant the test asks for with @pytest.mark.syscall_irl_boot_args and
    @pytest.mark.syscall_irl_cpu (or their old names)."""
    from ..lab.variant import GuestVariant
    boot_args = _one_string(node, BOOT_ARGS, BOOT_ARGS_USAGE, allow_blank=True)
    cpu = _one_string(node, CPU, CPU_USAGE, allow_blank=False)
    try:
        return GuestVariant.of(boot_args or "", cpu)  # inner spaces may be quoted: param="a  b"
    except ConfigError as exc:
        pytest.fail(f"@pytest.mark.{BOOT_ARGS}({boot_args!r}): {exc.message}", pytrace=False)


def _one_string(node: pytest.Item, name: str, usage: str, *, allow_blank: bool) -> str | None:
    """The one string argument of the marker *name* (else its old name) closest to the test,
    None without one."""
    marker = node.get_closest_marker(name)
    if marker is None:
        old = next(old for old, new in DEPRECATED.items() if new == name)
        marker = node.get_closest_marker(old)
    if marker is None:
        return None
    args, kwargs = marker.args, marker.kwargs
    if len(args) != 1 or not isinstance(args[0], str) or kwargs or not (allow_blank or args[0].strip()):
        pytest.fail(f"{usage}; got {args!r} {kwargs!r}", pytrace=False)
    return str(args[0])


def user_timeout(config: pytest.Config) -> str | None:
    """Where the user set pytest-timeout's timeout for the run (--timeout, $PYTEST_TIMEOUT, the ini
    key `timeout`, read as pytest-timeout reads them), else None."""
    if config.getoption("timeout", None) is not None:
        return f"--timeout={config.getoption('timeout')}"
    if os.environ.get("PYTEST_TIMEOUT"):
        return f"$PYTEST_TIMEOUT={os.environ['PYTEST_TIMEOUT']}"
    ini = config.getini("timeout")
    return f"timeout = {ini} in {config.inipath or 'the ini file'}" if ini else None


def default_timeout(config: pytest.Config) -> int | None:
    """The bound our tests get from us: DEFAULT_TIMEOUT unless the user set one, or pytest-timeout
    is not active (`-p no:timeout`)."""
    if not config.pluginmanager.hasplugin("timeout") or user_timeout(config) is not None:
        return None
    return DEFAULT_TIMEOUT


def timeout_line(config: pytest.Config) -> str | None:
    """The header line that says how each test is bounded."""
    if not config.pluginmanager.hasplugin("timeout"):
        return "syscall-irl: tests are not bounded (pytest-timeout is disabled: -p no:timeout)"
    given = user_timeout(config)
    if given:
        return f"syscall-irl: each test bounded by your pytest-timeout setting ({given}), unless it has a marker"
    return (f"syscall-irl: each test bounded to {DEFAULT_TIMEOUT} s (pytest-timeout), unless it has a timeout "
            f"marker or you set --timeout, $PYTEST_TIMEOUT or the ini key timeout")


def apply_default_timeout(config: pytest.Config, ours: list[pytest.Item]) -> None:
    """Bound each of *ours* (the tests that use our lab, directly or through another fixture) that
    has no timeout marker: a hung guest or GDB must not hang an installed suite forever.
    pytest-timeout's own precedence stays whole: its marker is the last word, and a user's setting
    means no default."""
    seconds = default_timeout(config)
    if seconds is None:
        return
    for item in ours:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds))

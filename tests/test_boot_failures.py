"""A kernel that does not boot is booted once per variant: `Lab.boot` remembers the first
boot failure that is the kernel's (a panic, QEMU exiting by itself) and raises it again at
once for every later guest of that variant; a harness failure (a timeout) is not remembered."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_syscall_irl.core.errors import (BootFailure, ConsoleClosed, ConsoleError, ConsoleTimeout, FailureClass,
                                            GuestPanic, SyscallIrlError, classify)
from pytest_syscall_irl.lab.boot_failures import BootFailures, kernel_died
from pytest_syscall_irl.lab.guest import Guest, Lab
from pytest_syscall_irl.lab.pool import SharedGuests
from pytest_syscall_irl.lab.settings import LabSettings
from pytest_syscall_irl.lab.variant import PLAIN, GuestVariant

PANIC = "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
PTI = GuestVariant.of("pti=on")


@dataclass
class FakeSettings:
    snapshots: bool = False


class CountingLab(Lab):
    """A Lab whose boots raise the errors it is given, in turn (then succeed), and count."""

    def __init__(self, tmp_path: Path, *errors: SyscallIrlError) -> None:
        super().__init__(cast(LabSettings, FakeSettings()), tmp_path)
        self.errors = list(errors)
        self.attempts = 0

    def machine_config(self, variant: GuestVariant = PLAIN) -> Any:
        return variant

    def _cold_boot(self, name: str, timeout: float, config: Any) -> Guest:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return cast(Guest, FakeGuest())


class FakeGuest:
    def is_alive(self) -> bool:
        return True

    def settle(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def test_a_kernel_that_panics_at_boot_is_booted_once(tmp_path: Path) -> None:
    lab = CountingLab(tmp_path, GuestPanic("guest kernel crashed", log_tail=PANIC))
    with pytest.raises(BootFailure) as first:
        lab.boot()
    assert isinstance(first.value.__cause__, GuestPanic) and first.value.log_tail == PANIC
    assert first.value.message.endswith(": " + PANIC)  # the kernel's last words, in one line
    for _ in range(3):
        with pytest.raises(BootFailure, match="not booted again, it did not boot earlier") as again:
            lab.boot()
        assert again.value.log_tail == PANIC and again.value.__cause__ is first.value  # the same cause
        assert classify(again.value) is FailureClass.CRASH
    assert lab.attempts == 1


def test_each_variant_gets_its_own_chance(tmp_path: Path) -> None:
    lab = CountingLab(tmp_path, GuestPanic("guest kernel crashed"))
    with pytest.raises(BootFailure):
        lab.boot(variant=PTI)
    assert lab.boot(variant=PLAIN) is not None  # pti=on broke it; the plain kernel boots
    with pytest.raises(BootFailure, match="boot arguments 'pti=on'"):
        lab.boot(variant=PTI)
    assert lab.attempts == 2


def test_qemu_exiting_during_boot_is_the_kernels_crash(tmp_path: Path) -> None:
    lab = CountingLab(tmp_path, ConsoleClosed("guest console closed before the guest printed anything (QEMU exited?)"))
    with pytest.raises(BootFailure, match="did not reach the guest's agent"):
        lab.boot()
    with pytest.raises(BootFailure):
        lab.boot()
    assert lab.attempts == 1


def test_a_harness_failure_at_boot_is_not_remembered(tmp_path: Path) -> None:
    lab = CountingLab(tmp_path, ConsoleTimeout("guest console: no READY within 90 s"))
    with pytest.raises(ConsoleTimeout):  # as raised: a slow machine may boot the next one
        lab.boot()
    assert lab.boot() is not None and lab.attempts == 2


def test_every_test_of_a_pool_fails_at_once_with_the_same_cause(tmp_path: Path) -> None:
    lab = CountingLab(tmp_path, GuestPanic("guest kernel crashed", log_tail=PANIC))
    pool = SharedGuests(lab, worker="gw0")
    messages = []
    for _ in range(5):  # five tests asking for the shared guest
        with pytest.raises(BootFailure) as raised:
            pool[PLAIN].get()
        messages.append(raised.value.log_tail)
    assert lab.attempts == 1 and messages == [PANIC] * 5


@pytest.mark.parametrize("exc, died", [
    (GuestPanic("guest kernel crashed"), True),
    (ConsoleClosed("guest console closed (QEMU exited?)"), True),
    (ConsoleError("the console is closed to visitors"), False),  # a class, not a word, says it
    (ConsoleTimeout("guest console: no READY within 90 s"), False),
    (ConsoleError("cannot connect to the guest console /tmp/sirl-x/console"), False),
    (SyscallIrlError("QEMU exited at once"), False),
])
def test_which_boot_errors_say_the_kernel_died(exc: SyscallIrlError, died: bool) -> None:
    assert kernel_died(exc) is died
    failures = BootFailures()
    judged = failures.judge(PLAIN, exc)
    assert (judged is not exc) is died and (PLAIN in failures) is died

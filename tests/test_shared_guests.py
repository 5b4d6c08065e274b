"""A worker's shared guests: one per guest variant, at most MAX_SHARED_GUESTS running, named
by the worker; and the variant that keys them, checked once where it is made."""

from __future__ import annotations

import pytest

from pytest_syscall_irl.core.errors import ConfigError
from pytest_syscall_irl.lab.pool import MAX_SHARED_GUESTS, SharedGuests
from pytest_syscall_irl.lab.variant import PLAIN, GuestVariant


class FakeGuest:
    def __init__(self, name: str, variant: GuestVariant) -> None:
        self.name, self.variant, self.alive, self.ready = name, variant, True, True

    def is_alive(self) -> bool:
        return self.alive

    def settle(self) -> bool:
        return self.alive and self.ready

    def shutdown(self) -> None:
        self.alive = False


class FakeLab:
    def __init__(self) -> None:
        self.booted: list[FakeGuest] = []

    def boot(self, name: str, *, variant: GuestVariant) -> FakeGuest:
        self.booted.append(FakeGuest(name, variant))
        return self.booted[-1]

    def running(self) -> list[GuestVariant]:
        return [guest.variant for guest in self.booted if guest.alive]


INTEL = GuestVariant.of(cpu="qemu64,vendor=GenuineIntel")


def test_the_variants_used_last_keep_running_and_the_others_are_shut_down() -> None:
    lab = FakeLab()
    shared = SharedGuests(lab, worker="gw0")
    variants = [PLAIN, GuestVariant.of("pti=on"), PLAIN, GuestVariant.of("vsyscall=none"), INTEL, PLAIN]
    for variant in variants:
        guest = shared[variant].get()
        assert guest.variant == variant and guest.alive
        assert len(lab.running()) <= MAX_SHARED_GUESTS
    assert MAX_SHARED_GUESTS == 2
    assert lab.running() == [INTEL, PLAIN]
    # PLAIN was used 3 times and booted twice: kept while one other variant came between
    # (pti=on), booted again after two (vsyscall=none, the Intel CPU).
    assert [guest.variant for guest in lab.booted].count(PLAIN) == 2
    shared.close()
    assert lab.running() == []


def test_shared_guests_are_named_by_the_worker_and_numbered_apart() -> None:
    lab = FakeLab()
    shared = SharedGuests(lab, worker="gw1")
    shared[PLAIN].get()
    shared[INTEL].get()
    assert [guest.name for guest in lab.booted] == ["shared-gw1-1", "shared-gw1-2"]


def test_a_dead_or_unsettled_guest_is_replaced() -> None:
    lab = FakeLab()
    shared = SharedGuests(lab, worker="gw0")[PLAIN]
    first = shared.get()
    first.alive = False  # a test killed it
    second = shared.get()
    assert second is not first and len(lab.booted) == 2
    second.ready = False  # a command it left running never ended
    shared.settle()
    assert not second.alive and shared.get() is not second


# --- the variant: extra boot arguments and a CPU model, one value --------------------------


def test_a_variant_is_stored_in_one_spelling_and_keys_a_dict() -> None:
    assert GuestVariant.of("  pti=on ") == GuestVariant.of("pti=on")
    assert GuestVariant.of("", " ") == GuestVariant.of() == PLAIN
    assert PLAIN.cpu is None and INTEL.cpu == "qemu64,vendor=GenuineIntel"
    assert {GuestVariant.of("pti=on"): 1}[GuestVariant("pti=on")] == 1


@pytest.mark.parametrize("args, says", [("kaslr", "kaslr"), ('foo="bar', "unbalanced"), ("console=tty0", "ttyS0")])
def test_a_variant_the_lab_cannot_honour_is_never_made(args: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        GuestVariant.of(args)


def test_a_variant_is_frozen() -> None:
    with pytest.raises(AttributeError):
        PLAIN.cpu = "max"  # type: ignore[misc]

"""A worker's shared guests: one per boot-argument/CPU variant, at most MAX_SHARED_GUESTS running."""

from __future__ import annotations

from typing import Any

from pytest_syscall_irl.plugin import MAX_SHARED_GUESTS, _SharedGuests


class FakeGuest:
    def __init__(self, variant: tuple[str, str | None]) -> None:
        self.variant, self.alive = variant, True

    def is_alive(self) -> bool:
        return self.alive

    def shutdown(self) -> None:
        self.alive = False


class FakeLab:
    def __init__(self) -> None:
        self.booted: list[FakeGuest] = []

    def boot(self, name: str, boot_args: str, cpu: str | None) -> FakeGuest:
        self.booted.append(FakeGuest((boot_args, cpu)))
        return self.booted[-1]

    def running(self) -> list[tuple[str, str | None]]:
        return [guest.variant for guest in self.booted if guest.alive]


def test_the_variants_used_last_keep_running_and_the_others_are_shut_down() -> None:
    lab = FakeLab()
    shared = _SharedGuests(lab)  # type: ignore[arg-type]
    variants: list[tuple[str, Any]] = [("", None), ("pti=on", None), ("", None), ("vsyscall=none", None),
                                       ("", "qemu64,vendor=GenuineIntel"), ("", None)]
    for variant in variants:
        guest = shared[variant].get()
        assert guest.variant == variant and guest.alive
        assert len(lab.running()) <= MAX_SHARED_GUESTS
    assert MAX_SHARED_GUESTS == 2
    assert lab.running() == [("", "qemu64,vendor=GenuineIntel"), ("", None)]
    # ("", None) was used 3 times and booted twice: kept while one other variant came between
    # (pti=on), booted again after two (vsyscall=none, the Intel CPU).
    assert [guest.variant for guest in lab.booted].count(("", None)) == 2
    shared.close()
    assert lab.running() == []

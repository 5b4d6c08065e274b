"""A worker's shared guests: one per guest variant, of which the MAX_SHARED_GUESTS used last
keep running. A guest a test killed or left unusable is replaced. No pytest here: the
plugin's `guest` fixture is a few lines over this pool, and a script can keep one too.

    pool = SharedGuests(lab, worker="gw0")
    shared = pool[GuestVariant.of("pti=on")]
    guest = shared.get()          # booted (restored) on first use, replaced if dead
    ...                           # the test
    shared.settle()               # a guest that cannot take the next command is shut down
    pool.close()
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from .variant import GuestVariant

# Shared guests a worker keeps running at once: the suite asks for seven variants (pti=on,
# clocksource=jiffies, three vsyscall modes, an Intel CPU, none), ~150 MB of QEMU each; a
# variant that comes back after two others is restored from its snapshot again (~0.3 s).
MAX_SHARED_GUESTS = 2


class PooledGuest(Protocol):
    """What the pool needs of a guest (`Guest` is one)."""

    def is_alive(self) -> bool: ...

    def settle(self) -> bool: ...

    def shutdown(self) -> None: ...


_G = TypeVar("_G", bound=PooledGuest)
_G_co = TypeVar("_G_co", bound=PooledGuest, covariant=True)


class GuestMaker(Protocol[_G_co]):
    """What the pool needs of a lab (`Lab` is one): a named guest of a variant."""

    def boot(self, name: str, *, variant: GuestVariant) -> _G_co: ...


class SharedGuest(Generic[_G]):
    """A worker's shared guest of one variant, booted again if a test killed it or left it
    unusable; each guest booted is named (and logs) apart: `shared-gw0-3` (`baseline-gw0-1`
    for the baseline kernel's pool: the report's reader tells the two kernels' guests apart)."""

    def __init__(self, lab: GuestMaker[_G], variant: GuestVariant, worker: str, numbers: Iterator[int],
                 prefix: str = "shared") -> None:
        self.lab = lab
        self.variant = variant
        self.guest: _G | None = None
        self._worker = worker
        self._numbers = numbers  # shared by the pool: no two guests of a worker share a name
        self._prefix = prefix

    def get(self) -> _G:
        """The running guest of this variant, booted now if there is none or it died."""
        if self.guest is None or not self.guest.is_alive():
            if self.guest is not None:
                self.guest.shutdown()
            self.guest = self.lab.boot(f"{self._prefix}-{self._worker}-{next(self._numbers)}", variant=self.variant)
        return self.guest

    def settle(self) -> None:
        """After a test: a guest that cannot take the next command is replaced."""
        if self.guest is not None and not self.guest.settle():
            self.close()

    def close(self) -> None:
        """Shut the guest down (the next `get` boots another); idempotent."""
        if self.guest is not None:
            self.guest.shutdown()
            self.guest = None

    @property
    def booted(self) -> bool:
        return self.guest is not None


class SharedGuests(Generic[_G]):
    """The worker's shared guests, one per variant, of which the *keep* used last are kept
    running (the others are shut down before another boots, so the bound holds at the peak)."""

    def __init__(self, lab: GuestMaker[_G], worker: str, keep: int = MAX_SHARED_GUESTS,
                 prefix: str = "shared") -> None:
        self.lab = lab
        self.worker = worker  # the xdist worker id (gw0), or "main": names a person can match to the report
        self.keep = keep
        self.prefix = prefix  # of each guest's name
        self.by_variant: dict[GuestVariant, SharedGuest[_G]] = {}  # least recently used first
        self._numbers = itertools.count(1)

    def __getitem__(self, variant: GuestVariant) -> SharedGuest[_G]:
        shared = (self.by_variant.pop(variant, None)
                  or SharedGuest(self.lab, variant, self.worker, self._numbers, self.prefix))
        self.by_variant[variant] = shared
        others = [other for other in self.by_variant.values() if other is not shared and other.booted]
        for other in others[:max(len(others) - (self.keep - 1), 0)]:
            other.close()  # before this variant boots: the bound holds at the peak too
        return shared

    def close(self) -> None:
        """Shut every shared guest down (a later `get` boots again)."""
        for shared in self.by_variant.values():
            shared.close()

    @property
    def running(self) -> int:
        """How many shared guests are booted now."""
        return sum(shared.booted for shared in self.by_variant.values())

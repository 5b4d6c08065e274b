"""What every architecture describes of its register file: the registers a debugger
names that are only bits of another one (x86's eax is bits 0..31 of rax).

A debugger session (machine.gdbmi.GdbSession) is handed one of these by the face that
chose the architecture: it reads the base registers and computes the views itself,
which costs no round trip and spares the debugger formatting them. An architecture
fills one in beside its other facts (x86_64/registers.py). Nothing here knows a
register name. No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RegisterView:
    """A register that is a bit field of another: *width* bits from bit *offset* of *base*."""

    name: str  # as the debugger names it: "eax"
    base: str  # the register it is read from: "rax"
    offset: int  # its lowest bit, counted from bit 0 of the base
    width: int  # in bits

    def __post_init__(self) -> None:
        if self.offset < 0 or self.width <= 0:
            raise ValueError(f"register view {self.name}: offset {self.offset}, width {self.width}")
        if self.name == self.base:
            raise ValueError(f"register view {self.name} is a view of itself")

    @property
    def mask(self) -> int:
        """The view's bits, once shifted down by *offset*."""
        return (1 << self.width) - 1

    def value(self, base_value: int) -> int:
        """The view's value when its base register holds *base_value*."""
        return (base_value >> self.offset) & self.mask


@dataclass(frozen=True)
class RegisterFile:
    """An architecture's register views, by the names its debugger uses.

    A register file with no views is valid: the session then reads every register
    from the debugger, as it names them.
    """

    name: str  # the architecture: "x86_64"
    views: tuple[RegisterView, ...] = ()
    _by_name: Mapping[str, RegisterView] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {view.name: view for view in self.views}
        if len(by_name) != len(self.views):
            raise ValueError(f"register file {self.name}: a view is described twice")
        # A view of a view would need its base derived first: none of the known
        # architectures' debuggers name one, so the description stays one level deep.
        nested = sorted(view.name for view in self.views if view.base in by_name)
        if nested:
            raise ValueError(f"register file {self.name}: views of views ({', '.join(nested)})")
        object.__setattr__(self, "_by_name", by_name)

    def view(self, name: str) -> RegisterView | None:
        """The view called *name*, or None when *name* is a register of its own."""
        return self._by_name.get(name)

    def derivable(self, names: Sequence[str]) -> list[RegisterView]:
        """The views among *names* whose base register is among *names* too, in the
        order of *names*: what a read of the others can compute instead of asking."""
        present = set(names)
        found = (self._by_name.get(name) for name in names)
        return [view for view in found if view is not None and view.base in present]


"""What every architecture describes: its syscall ABIs, its roads into the kernel and its
exits, as plain data a walker follows (trace/walk.py), and what it reads of a kernel's
symbol table (`SymbolTable`, which kernel.artifacts.Vmlinux is).

An architecture is one folder beside this module (x86_64/ today) that fills these in;
nothing here knows an instruction, a register name or a symbol of one. No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..core.errors import SyscallIrlError


class RoadError(SyscallIrlError):
    """The kernel under test has no such road, syscall or symbol."""


class SymbolTable(Protocol):
    """What the architecture layer reads of a kernel image (kernel.artifacts.Vmlinux)."""

    @property
    def path(self) -> Path: ...
    @property
    def release(self) -> str: ...
    def has_symbol(self, name: str) -> bool: ...
    def symbol(self, name: str) -> int: ...
    def symbol_size(self, name: str) -> int: ...
    def names_at(self, address: int) -> list[str]: ...
    def read(self, address: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class Abi:
    """How a syscall names its number and arguments, and its handlers."""

    name: str  # "x86_64" or "ia32"
    bits: int  # width of the number and argument registers
    number_register: str
    arg_registers: tuple[str, ...]  # user registers, argument 0..5
    pt_regs_args: tuple[str, ...]  # struct pt_regs fields, argument 0..5
    handler_prefixes: tuple[str, ...]  # the handler of NAME is PREFIX + NAME
    table: str  # the kernel's pointer table (kept for ftrace; not always what dispatches)
    # Numbers by name from the ABI's own table, for kernels that build no pointer table
    # (the numbers of an ABI never change: see x86_64/abi_i386.py).
    fallback_numbers: Mapping[str, int] = field(default_factory=dict, compare=False, hash=False)


# The stages every road has, whatever the architecture: the user instruction and the
# return to it; the handler, the function it calls (ksys_<name>), its return and the C
# entry's return. The rest of a road's stages come from its description (Road.stages).
USER_STAGES = ("user", "user_return")
HANDLER_STAGES = ("handler", "ksys", "handler_return", "dispatch_return")


@dataclass(frozen=True)
class Exit:
    """A way back to user mode and the stages a trace records on it, the last of which is
    its return instruction. A walker finds an exit one of two ways:

    - *in_code*: the return instruction lies in this entry function, found by disassembling
      it (x86's SYSRET); a first stage, if there are two, is the instruction that switches
      back to user state just before it (x86's exit `swapgs`);
    - *path*: a common return path from pt_regs begins at this symbol (the first stage) and
      ends at the return instruction at the symbol *instruction* (x86's IRET path).
    """

    name: str  # "sysretq", "sysretl", "iret"
    stages: tuple[str, ...]
    in_code: str = ""
    path: str = ""
    instruction: str = ""


@dataclass(frozen=True)
class Road:
    """One way into the kernel for a syscall, and the exits it may leave by."""

    name: str
    mnemonic: str  # the user instruction
    opcode: bytes
    user_bits: int  # the mode of the calling code: 64 or 32; 0: either
    abi: Abi
    found_by: str  # where the CPU finds the entry
    entry_symbols: tuple[str, ...]  # candidates, in the order of preference
    dispatch_symbols: tuple[str, ...]  # the C function taking pt_regs, candidates
    exits: tuple[Exit, ...]
    # "entry" (where the CPU entered), then the stage after the entry code's switch to
    # kernel state where the architecture has one (x86: "after_swapgs").
    entry_stages: tuple[str, ...] = ("entry",)

    @property
    def stages(self) -> tuple[str, ...]:
        """Every stage a trace of this road may record, in the order of the road."""
        exits = tuple(dict.fromkeys(stage for way in self.exits for stage in way.stages))
        return (USER_STAGES[0], *self.entry_stages, *self.dispatch_symbols, *HANDLER_STAGES, *exits,
                USER_STAGES[1])

    def entry_symbol(self, vmlinux: SymbolTable) -> str:
        """The entry this kernel has for the road (only one candidate exists in a kernel)."""
        return first_symbol(vmlinux, self.entry_symbols, f"the {self.name} entry ({self.found_by})")

    def dispatch_symbol(self, vmlinux: SymbolTable) -> str:
        """The C function this kernel's entry calls with the pt_regs."""
        return first_symbol(vmlinux, self.dispatch_symbols, f"the {self.name} C entry")


def first_symbol(vmlinux: SymbolTable, names: tuple[str, ...], what: str) -> str:
    """The first of *names* the kernel has; RoadError naming *what* if it has none."""
    for name in names:
        if vmlinux.has_symbol(name):
            return name
    raise RoadError(f"{vmlinux.path} has no {what}: none of {', '.join(names)} (is the road's kernel support off?)")


def road_of(roads: Mapping[str, Road], instruction: bytes, bits: int) -> Road:
    """The road a user instruction takes, from its bytes and the mode of its program."""
    for road in roads.values():
        if instruction.startswith(road.opcode) and road.user_bits in (0, bits):
            return road
    known = ", ".join(f"{r.mnemonic} {r.opcode.hex(' ')}" for r in roads.values())
    raise RoadError(f"{instruction[:2].hex(' ')} in a {bits}-bit program is no syscall instruction ({known})")


def road_named(roads: Mapping[str, Road], name: str) -> Road:
    """A road by name."""
    try:
        return roads[name]
    except KeyError:
        raise RoadError(f"no road {name!r}: one of {', '.join(roads)}") from None


class SyscallNames:
    """Syscall numbers by name and handler names by number, for one ABI of one kernel.

    The numbers come from the kernel's pointer table (read from the vmlinux image: slot N
    points at PREFIX + NAME) where it has one; kernels that dispatch through a switch and
    build no table (x86's ia32 ABI since the BHI changes, 6.9 and 6.1.85) fall back to the
    ABI's own numbers (`Abi.fallback_numbers`), each only where the kernel has the handler.
    """

    def __init__(self, vmlinux: SymbolTable, abi: Abi) -> None:
        self.vmlinux = vmlinux
        self.abi = abi
        self._table: dict[int, str] | None = None
        self._numbers: dict[str, int] | None = None

    @property
    def table(self) -> dict[int, str]:
        """Number -> handler symbol, from the kernel's table; empty if it has none."""
        if self._table is None:
            self._table = self._read_table()
        return self._table

    def _read_table(self) -> dict[int, str]:
        vmlinux = self.vmlinux
        if not vmlinux.has_symbol(self.abi.table):
            return {}
        size = vmlinux.symbol_size(self.abi.table) // 8
        data = vmlinux.read(vmlinux.symbol(self.abi.table), 8 * size)
        found = {}
        for nr in range(size):
            names = [n for n in vmlinux.names_at(int.from_bytes(data[8 * nr:8 * nr + 8], "little"))
                     if n.startswith(self.abi.handler_prefixes)]
            if names:
                found[nr] = min(names, key=len)
        return found

    @property
    def numbers(self) -> dict[str, int]:
        """Name -> number."""
        if self._numbers is None:
            self._numbers = self._read_numbers()
        return self._numbers

    def _read_numbers(self) -> dict[str, int]:
        if self.table:
            numbers: dict[str, int] = {}
            for nr, handler in sorted(self.table.items()):
                numbers.setdefault(self._strip(handler), nr)
            return numbers
        if not self.abi.fallback_numbers:
            raise RoadError(f"{self.vmlinux.path} has no {self.abi.table}: cannot tell its {self.abi.name} "
                            f"syscall numbers; pass numbers instead of names")
        return {name: nr for name, nr in self.abi.fallback_numbers.items() if self._handler_of(name)}

    def _strip(self, handler: str) -> str:
        for prefix in sorted(self.abi.handler_prefixes, key=len, reverse=True):
            if handler.startswith(prefix):
                return handler[len(prefix):]
        return handler

    def _handler_of(self, name: str) -> str:
        # The longest prefix wins (x86's compat handler: where one exists, it is what the table holds).
        for prefix in sorted(self.abi.handler_prefixes, key=len, reverse=True):
            if self.vmlinux.has_symbol(prefix + name):
                return prefix + name
        return ""

    def number(self, name_or_nr: int | str) -> int:
        """The number of a syscall name (or the number given)."""
        if isinstance(name_or_nr, int):
            return name_or_nr
        try:
            return self.numbers[name_or_nr]
        except KeyError:
            raise RoadError(f"kernel {self.vmlinux.release} has no {self.abi.name} syscall {name_or_nr!r}") from None

    def handler(self, nr: int) -> str:
        """The handler the kernel's table has for *nr*, else the one its name implies;
        "" where the kernel has none (out of range, or not built in)."""
        if self.table or not self.abi.fallback_numbers:
            return self.table.get(nr, "")
        names = [name for name, number in self.numbers.items() if number == nr]
        return self._handler_of(names[0]) if names else ""

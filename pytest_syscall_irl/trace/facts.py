"""KernelFacts: what a trace needs to know of the kernel under test, read once per process.

The struct pt_regs layout (from DWARF, cross-checked against the architecture's), the
entry code as the booted kernel patched it, and where the CPU enters for a road. The
tracer makes one and hands it to each walk; the reads are cached in a `FactsCache`
(one per process by default), so a new tracer per test pays for none of them again.
No pytest here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..arch.base import Architecture, EntryCode
from ..arch.roads import Road, SymbolTable
from ..kernel.artifacts import Kernel
from ..machine.qemu import MachineConfig
from .model import TraceError
from .protocols import Debugger, TracedGuest


@dataclass
class FactsCache:
    """pt_regs offsets by vmlinux; entry code by (vmlinux, machine, symbol): alternatives
    follow the CPU model and the boot arguments, and a restored guest runs its saver's
    patched code, so the machine configuration (less -incoming) is part of the key."""

    layouts: dict[Path, dict[str, int]] = field(default_factory=dict)
    entry_codes: dict[tuple[Path, MachineConfig, str], EntryCode] = field(default_factory=dict)


# Kernel facts outlive a test: one cache for the process, as before the facts had an object.
PROCESS_CACHE = FactsCache()


class KernelFacts:
    """The kernel's facts as one architecture reads them, with a debugger on its guest."""

    def __init__(self, gdb: Debugger, kernel: Kernel, guest: TracedGuest, architecture: Architecture,
                 cache: FactsCache = PROCESS_CACHE) -> None:
        self.gdb = gdb
        self.kernel = kernel
        self.guest = guest
        self.architecture = architecture
        self.cache = cache

    @property
    def vmlinux(self) -> SymbolTable:
        return self.kernel.vmlinux

    @property
    def pt_regs_layout(self) -> dict[str, int]:
        """struct pt_regs field offsets: from DWARF when the vmlinux has it, cross-checked
        against the architecture's layout (a disagreement is an error: one of them is
        wrong); the known layout otherwise. One type lookup per vmlinux and process (16 ms)."""
        path = self.kernel.vmlinux.path
        if path not in self.cache.layouts:
            self.cache.layouts[path] = self._layout()
        return self.cache.layouts[path]

    def _layout(self) -> dict[str, int]:
        frame = self.architecture.pt_regs
        layout = dict(frame.offsets)
        if not self.kernel.dwarf:
            return layout
        members = self.gdb.member_offsets(frame.c_type)
        missing = [name for name in frame.offsets if name not in members]
        if missing:
            raise TraceError(f"{frame.c_type} in DWARF has no field {', '.join(missing)}; "
                             f"GDB printed members {sorted(members)}")
        dwarf = {name: members[name] for name in frame.offsets}
        if dwarf != layout:
            moved = {n: (layout[n], dwarf[n]) for n in dwarf if dwarf[n] != layout[n]}
            raise TraceError(f"{frame.c_type} in DWARF differs from the {self.architecture.name} layout "
                             f"(field: (known, DWARF)): {moved}")
        return layout

    def entry_code(self, symbol: str) -> EntryCode:
        """*symbol* disassembled from the guest's memory (boot-time alternatives patch it),
        once per vmlinux, machine configuration and process (~14 ms of GDB each)."""
        key = (self.kernel.vmlinux.path, replace(self.guest.config, incoming=None), symbol)
        if key not in self.cache.entry_codes:
            self.cache.entry_codes[key] = self.architecture.find_entry_code(self.kernel.vmlinux.symbol(symbol),
                                                                            self.gdb.disassemble(symbol))
        return self.cache.entry_codes[key]

    def entry_address(self, road: Road) -> int:
        """Where the CPU enters for *road* (the architecture says how it finds it)."""
        return self.architecture.entry_address(road, self.kernel.vmlinux, self.gdb)

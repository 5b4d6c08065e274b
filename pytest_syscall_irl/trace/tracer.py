"""SyscallTracer: takes a SyscallTrace of one syscall on any road, with GDB and a guest.

    tracer.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    tracer.command("echo x | cat", nr="read", args={0: 0}, comm="cat")
    hits, result = tracer.count_syscalls("/payloads/vdso", nr="clock_gettime", comm="vdso")

The API and the kernel facts a trace needs (syscall names, struct pt_regs, the entry code
as the booted kernel patched it) are here; walk.py takes the trace. No pytest here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ..arch.x86_64 import facts as x86
from ..machine.console import CommandResult
from ..kernel.artifacts import Kernel
from ..machine.qemu import MachineConfig
from ..arch.x86_64.roads import SYSCALL64, Road, SyscallNames, road_of
from ..arch.x86_64.roads import road as road_named
from .model import NO_HANDLER, STAGES, SyscallSelector, SyscallTrace, TraceError
from .walk import (CommandEnded, Debugger, EntryCode, Fault, Running, TracedGuest, Walk, clear_breakpoints,
                   process_condition, resume_watching)

__all__ = ["Debugger", "EntryCode", "Fault", "SyscallTracer", "TracedGuest"]

USER_LABEL = "sirl_syscall_insn"


# Per process: struct pt_regs offsets by vmlinux; entry code by (vmlinux, machine, symbol):
# alternatives follow the CPU model and the boot arguments, and a restored guest runs its
# saver's patched code, so the machine configuration (less -incoming) is part of the key.
_LAYOUTS: dict[Path, dict[str, int]] = {}
_ENTRY_CODES: dict[tuple[Path, MachineConfig, str], EntryCode] = {}


class SyscallTracer:
    """Takes SyscallTraces with a stopped, attached debugger and the guest it drives.

        tracer.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
        tracer.payload("compat32", "sysenter", "20", nr="getpid", at="sirl_sysenter_insn")
        tracer.command("echo x | cat", nr="read", args={0: 0}, comm="cat")
    """

    def __init__(self, gdb: Debugger, kernel: Kernel, guest: TracedGuest, timeout: float = 60.0) -> None:
        self.gdb = gdb
        self.kernel = kernel
        self.guest = guest
        self.timeout = timeout
        self.traces: list[SyscallTrace] = []
        self.faults: dict[str, list[Fault]] = {}
        self._names: dict[str, SyscallNames] = {}

    def names(self, road: Road) -> SyscallNames:
        """The syscall numbers and handlers of *road*'s ABI in the kernel under test."""
        if road.abi.name not in self._names:
            self._names[road.abi.name] = SyscallNames(self.kernel.vmlinux, road.abi)
        return self._names[road.abi.name]

    def inject(self, stage: str, fault: Fault) -> None:
        """Run *fault(gdb)* when a trace reaches *stage*, before the stage is recorded; if it
        returns a callable, that undoes the fault right after recording. This is how the
        project's own tests prove an invariant can fail: they make the kernel show a
        wrong value through the debugger."""
        if stage not in STAGES:
            raise ValueError(f"no stage {stage!r}: one of {', '.join(STAGES)}")
        self.faults.setdefault(stage, []).append(fault)

    def payload(self, name: str, *argv: str, nr: int | str, args: Mapping[int, int] | None = None,
                at: str = USER_LABEL, comm: str | None = None, timeout: float | None = None) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made at the payload's instruction labelled *at*
        (sirl_syscall_insn by default); the road follows from that instruction and the
        program's mode. *comm* also selects the process by name (payloads are non-PIE:
        another static program may run the same address with the same registers)."""
        program = self.guest.payload(name)
        address = program.symbol(at)
        road = road_of(program.read(address, 2), program.bits)
        selector = SyscallSelector(self.names(road).number(nr), dict(args or {}), comm=comm)
        return self.trace(" ".join([program.guest_path, *argv]), selector, road, user_address=address,
                          timeout=timeout)

    def command(self, command: str, *, nr: int | str, args: Mapping[int, int] | None = None,
                road: str = "syscall64", comm: str | None = None, pid: int | None = None,
                agent: bool = False, timeout: float | None = None) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made by a shell command on *road*, from the
        kernel entry on (no user stage), by the process *comm* / *pid* if given."""
        way = road_named(road)
        selector = SyscallSelector(self.names(way).number(nr), dict(args or {}), comm=comm, pid=pid, agent=agent)
        return self.trace(command, selector, way, timeout=timeout)

    def count(self, command: str, location: str | int, condition: str | None = None,
              timeout: float | None = None) -> tuple[int, CommandResult]:
        """Run *command* and count how often the kernel reaches *location* (a symbol or an
        address) with *condition* while it runs; returns the count and the command's
        result. Each hit is a stop and a resume (~10 ms under TCG)."""
        deadline = time.monotonic() + (timeout or self.timeout)

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TraceError(f"`{command}` did not end within {timeout or self.timeout:g} s")
            return remaining

        where = f"*{location:#x}" if isinstance(location, int) else f"*{self.kernel.vmlinux.symbol(location):#x}"
        self.gdb.delete_breakpoints()
        number = self.gdb.break_insert(where, condition=condition).number
        hits = 0
        try:
            pending = self.guest.console.start(command)
            while True:
                stop = resume_watching(self.gdb, pending, left)
                if stop.breakpoint != number:
                    raise TraceError(f"counting {where} in `{command}`: unexpected stop {stop}")
                hits += 1
        except CommandEnded as ended:
            clear_breakpoints(self.gdb, quietly=False)
            return hits, ended.result
        except BaseException:
            clear_breakpoints(self.gdb, quietly=True)  # never in place of the error being raised
            raise

    def count_syscalls(self, command: str, *, nr: int | str, road: str = "syscall64",
                       args: Mapping[int, int] | None = None, comm: str | None = None, pid: int | None = None,
                       timeout: float | None = None) -> tuple[int, CommandResult]:
        """How many syscalls *nr* (with *args*) the selected process made on *road* while
        *command* ran (counted at the road's kernel entry), and the command's result."""
        way = road_named(road)
        selector = SyscallSelector(self.names(way).number(nr), dict(args or {}), comm=comm, pid=pid)
        terms = [selector.register_condition(way.abi.arg_registers, way.abi.bits),
                 process_condition(self.kernel, selector, payload=False)]
        return self.count(command, self.entry_address(way), " && ".join(t for t in terms if t), timeout)

    # --- kernel facts, once per process --------------------------------------------------

    @property
    def pt_regs_layout(self) -> dict[str, int]:
        """struct pt_regs field offsets: from DWARF when the vmlinux has it, cross-checked
        against the x86_64 layout (a disagreement is an error: one of them is wrong);
        the known layout otherwise. One type lookup per vmlinux and process (16 ms)."""
        path = self.kernel.vmlinux.path
        if path not in _LAYOUTS:
            layout = dict(x86.PT_REGS_OFFSETS)
            if self.kernel.dwarf:
                members = self.gdb.member_offsets("struct pt_regs")
                missing = [name for name in x86.PT_REGS_FIELDS if name not in members]
                if missing:
                    raise TraceError(f"struct pt_regs in DWARF has no field {', '.join(missing)}; "
                                     f"GDB printed members {sorted(members)}")
                dwarf = {name: members[name] for name in x86.PT_REGS_FIELDS}
                if dwarf != layout:
                    moved = {n: (layout[n], dwarf[n]) for n in dwarf if dwarf[n] != layout[n]}
                    raise TraceError(f"struct pt_regs in DWARF differs from the x86_64 layout "
                                     f"(field: (known, DWARF)): {moved}")
            _LAYOUTS[path] = layout
        return _LAYOUTS[path]

    def entry_code(self, symbol: str = "entry_SYSCALL_64") -> EntryCode:
        """*symbol* disassembled from the guest's memory (boot-time alternatives patch it),
        once per vmlinux, machine configuration and process (~14 ms of GDB each)."""
        key = (self.kernel.vmlinux.path, replace(self.guest.config, incoming=None), symbol)
        if key not in _ENTRY_CODES:
            _ENTRY_CODES[key] = EntryCode.find(self.kernel.vmlinux.symbol(symbol), self.gdb.disassemble(symbol))
        return _ENTRY_CODES[key]

    def entry_address(self, road: Road) -> int:
        """Where the CPU enters for *road*: IDT vector 0x80 read from guest memory for
        int80, the entry symbol otherwise (GDB cannot read MSRs: the suite checks those
        in the guest)."""
        if road.found_by.startswith("IDT"):
            table = self.kernel.vmlinux.symbol("idt_table")
            gate = x86.decode_idt_gate(self.gdb.read_memory(table + x86.IDT_GATE_SIZE * x86.IA32_SYSCALL_VECTOR,
                                                            x86.IDT_GATE_SIZE))
            return gate.offset
        return self.kernel.vmlinux.symbol(road.entry_symbol(self.kernel.vmlinux))

    # --- taking a trace ------------------------------------------------------------------

    def trace(self, command: str, selector: SyscallSelector, road: Road = SYSCALL64,
              user_address: int | None = None, timeout: float | None = None) -> SyscallTrace:
        """Run *command* in the guest and trace the syscall *selector* picks on *road*.

        *user_address* is the user instruction (a payload's label); without it the trace
        starts at the kernel entry and the user stage is not taken."""
        deadline = time.monotonic() + (timeout or self.timeout)
        handler = self.names(road).handler(selector.nr) or NO_HANDLER
        result = SyscallTrace(command, selector, road, handler)
        self.traces.append(result)
        walk = Walk(self, result, deadline)
        pending: Running | None = None
        try:
            walk.arm_first(user_address)
            pending = walk.pending = self.guest.console.start(command)
            walk.walk(user_address is not None)
        except BaseException:
            walk.clean_up(quietly=True)  # never in place of the error being raised
            raise
        walk.clean_up(quietly=False)
        if pending is not None:
            with self.guest.running():
                ended = pending.wait(max(1.0, deadline - time.monotonic()))
            result.output, result.status = ended.output, ended.status
        return result

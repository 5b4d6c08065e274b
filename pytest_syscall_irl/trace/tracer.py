"""SyscallTracer: takes a SyscallTrace of one syscall on any road, with GDB and a guest.

    tracer.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    tracer.command("echo x | cat", nr="read", args={0: 0}, comm="cat")
    hits, result = tracer.count_syscalls("/payloads/vdso", nr="clock_gettime", comm="vdso")

The API is here; the kernel facts a trace needs (struct pt_regs, the entry code as the
booted kernel patched it) are facts.py's, and walk.py takes the trace. The architecture
is handed in by the face that makes the tracer (the plugin's `syscall_trace` fixture
passes x86_64's). No pytest here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..arch.base import Architecture
from ..arch.roads import Road, SyscallNames, road_named, road_of
from ..kernel.artifacts import Kernel
from ..machine.console import CommandResult
from .facts import PROCESS_CACHE, FactsCache, KernelFacts
from .model import NO_HANDLER, SyscallSelector, SyscallTrace, TraceError
from .protocols import Debugger, Fault, Running, TracedGuest
from .walk import CommandEnded, Walk, clear_breakpoints, process_condition, resume_watching

__all__ = ["Debugger", "Fault", "SyscallTracer", "TracedGuest"]

USER_LABEL = "sirl_syscall_insn"


class SyscallTracer:
    """Takes SyscallTraces with a stopped, attached debugger and the guest it drives.

        tracer.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
        tracer.payload("compat32", "sysenter", "20", nr="getpid", at="sirl_sysenter_insn")
        tracer.command("echo x | cat", nr="read", args={0: 0}, comm="cat")
    """

    def __init__(self, gdb: Debugger, kernel: Kernel, guest: TracedGuest, architecture: Architecture,
                 timeout: float = 60.0, cache: FactsCache = PROCESS_CACHE) -> None:
        self.gdb = gdb
        self.kernel = kernel
        self.guest = guest
        self.architecture = architecture
        self.timeout = timeout
        self.facts = KernelFacts(gdb, kernel, guest, architecture, cache)
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
        stages = self.architecture.stages.all
        if stage not in stages:
            raise ValueError(f"no stage {stage!r}: one of {', '.join(stages)}")
        self.faults.setdefault(stage, []).append(fault)

    def payload(self, name: str, *argv: str, nr: int | str, args: Mapping[int, int] | None = None,
                at: str = USER_LABEL, comm: str | None = None, timeout: float | None = None) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made at the payload's instruction labelled *at*
        (sirl_syscall_insn by default); the road follows from that instruction and the
        program's mode. *comm* also selects the process by name (payloads are non-PIE:
        another static program may run the same address with the same registers)."""
        program = self.guest.payload(name)
        address = program.symbol(at)
        road = road_of(self.architecture.roads, program.read(address, 2), program.bits)
        selector = SyscallSelector(self.names(road).number(nr), dict(args or {}), comm=comm)
        return self.trace(" ".join([program.guest_path, *argv]), selector, road, user_address=address,
                          timeout=timeout)

    def command(self, command: str, *, nr: int | str, args: Mapping[int, int] | None = None,
                road: str | None = None, comm: str | None = None, pid: int | None = None,
                agent: bool = False, timeout: float | None = None) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made by a shell command on *road* (the
        architecture's default road: x86_64's syscall64), from the kernel entry on (no
        user stage), by the process *comm* / *pid* if given."""
        way = self.road(road)
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

    def count_syscalls(self, command: str, *, nr: int | str, road: str | None = None,
                       args: Mapping[int, int] | None = None, comm: str | None = None, pid: int | None = None,
                       timeout: float | None = None) -> tuple[int, CommandResult]:
        """How many syscalls *nr* (with *args*) the selected process made on *road* while
        *command* ran (counted at the road's kernel entry), and the command's result."""
        way = self.road(road)
        selector = SyscallSelector(self.names(way).number(nr), dict(args or {}), comm=comm, pid=pid)
        terms = [selector.register_condition(way.abi),
                 process_condition(self.kernel, self.architecture, selector, payload=False)]
        return self.count(command, self.facts.entry_address(way), " && ".join(t for t in terms if t), timeout)

    def road(self, name: str | None) -> Road:
        """The architecture's road *name* (its default road for None)."""
        return road_named(self.architecture.roads, name or self.architecture.default_road)

    # --- taking a trace ------------------------------------------------------------------

    def trace(self, command: str, selector: SyscallSelector, road: Road | None = None,
              user_address: int | None = None, timeout: float | None = None) -> SyscallTrace:
        """Run *command* in the guest and trace the syscall *selector* picks on *road*
        (the architecture's default road for None).

        *user_address* is the user instruction (a payload's label); without it the trace
        starts at the kernel entry and the user stage is not taken."""
        deadline = time.monotonic() + (timeout or self.timeout)
        way = road or self.road(None)
        handler = self.names(way).handler(selector.nr) or NO_HANDLER
        result = SyscallTrace(command, selector, way, handler)
        self.traces.append(result)
        walk = Walk(self.gdb, self.facts, self.architecture, self.faults, result, deadline)
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

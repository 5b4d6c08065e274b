"""SyscallTracer: takes a SyscallTrace of one syscall on any road, with GDB and a guest.

    tracer.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
    tracer.command("echo x | cat", nr="read", args={0: 0}, comm="cat")
    hits, result = tracer.count_syscalls("/payloads/vdso", nr="clock_gettime", payload="vdso")

A command that ends with a status the caller did not expect (`expect_status`, 0 unless
told: a status, several, or None for any) fails the count or the trace with its status
and output (`CommandFailed`): a count of a command that never ran would otherwise say
"this never enters the kernel" without testing anything.

The API is here; the kernel facts a trace needs (struct pt_regs, the entry code as the
booted kernel patched it) are facts.py's, and walk.py takes the trace. The architecture
is handed in by the face that makes the tracer (the plugin's `syscall_trace` fixture
passes x86_64's). No pytest here.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping

from ..arch.base import Architecture
from ..arch.roads import Road, SyscallNames, road_named, road_of
from ..core.errors import FailureClass, SyscallIrlError, tail
from ..kernel.artifacts import Kernel
from ..machine.console import CommandResult
from .facts import PROCESS_CACHE, FactsCache, KernelFacts
from .model import NO_HANDLER, SyscallSelector, SyscallTrace, TraceError
from .protocols import Debugger, Fault, Running, TracedGuest
from .walk import CommandEnded, Walk, clear_breakpoints, process_condition, resume_watching

__all__ = ["CommandFailed", "Debugger", "ExpectedStatus", "Fault", "SyscallTracer", "TracedGuest"]

USER_LABEL = "sirl_syscall_insn"
# The statuses of a command that could not run as asked: the shell found no such program
# (127) or could not execute it (126), or the program (our payloads, busybox's applets) or
# the shell refused its arguments (2). Any other status is the program's answer under the
# kernel under test.
COULD_NOT_RUN = frozenset({2, 126, 127})
SIGNAL_BASE = 128  # the shell's status of a process killed by signal N is 128 + N

ExpectedStatus = int | Collection[int] | None  # one status, any of several, or None: any
MAIN = "main"
EXIT = "do_exit"  # kernel/exit.c: every task ends there (exit, exit_group, a fatal signal)
MAIN_CODE_BYTES = 64  # musl's mains share their first ten bytes (register saves) and more


class CommandFailed(SyscallIrlError):
    """The command a count or a trace ran ended with a status its caller did not expect.

    Whose fault that is depends on the status: one that says the command could not run
    (COULD_NOT_RUN: not found, not executable, refused its arguments) is the harness's;
    any other (a wrong answer, a death by signal) happened under the kernel under test and
    is a violation, as a failed assertion would be."""

    def __init__(self, result: CommandResult, expected: ExpectedStatus) -> None:
        status = result.status
        super().__init__(f"`{result.command}` exited with status {status}{_meaning(status)}, expected "
                         f"{_expected_text(expected)}", exit_code=status, log_tail=tail(result.output) or "(no output)")
        self.result = result
        self.failure_class = FailureClass.HARNESS if status in COULD_NOT_RUN else FailureClass.VIOLATION


def _meaning(status: int) -> str:
    if status == 127:
        return " (not found)"
    if status == 126:
        return " (not executable)"
    return f" (killed by signal {status - SIGNAL_BASE})" if status > SIGNAL_BASE else ""


def _expected_text(expected: ExpectedStatus) -> str:
    if isinstance(expected, int):
        return str(expected)
    return " or ".join(str(status) for status in sorted(expected or ()))


def _both(*conditions: str | None) -> str | None:
    """The GDB conditions given (None and "" are none) joined by &&; None if there are none."""
    given = [condition for condition in conditions if condition]
    return " && ".join(f"({condition})" for condition in given) if given else None


def check_status(result: CommandResult, expected: ExpectedStatus) -> CommandResult:
    """*result* if its status is one *expected* names (None: any); else CommandFailed."""
    if expected is None or result.status == expected or (not isinstance(expected, int) and result.status in expected):
        return result
    raise CommandFailed(result, expected)


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

    def payload(self, name: str, *argv: str, nr: int | str, args: Mapping[int, int | str] | None = None,
                at: str = USER_LABEL, comm: str | None = None, timeout: float | None = None,
                expect_status: ExpectedStatus = 0) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made at the payload's instruction labelled *at*
        (sirl_syscall_insn by default); the road follows from that instruction and the
        program's mode. *comm* also selects the process by name (payloads are non-PIE:
        another static program may run the same address with the same registers). The payload
        must end with *expect_status* (see `trace`)."""
        program = self.guest.payload(name)
        address = program.symbol(at)
        road = road_of(self.architecture.roads, program.read(address, 2), program.bits)
        selector = SyscallSelector(self.names(road).number(nr), dict(args or {}), comm=comm)
        return self.trace(" ".join([program.guest_path, *argv]), selector, road, user_address=address,
                          timeout=timeout, expect_status=expect_status)

    def command(self, command: str, *, nr: int | str, args: Mapping[int, int | str] | None = None,
                road: str | None = None, comm: str | None = None, pid: int | None = None,
                agent: bool = False, timeout: float | None = None, expect_status: ExpectedStatus = 0) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made by a shell command on *road* (the
        architecture's default road: x86_64's syscall64), from the kernel entry on (no
        user stage), by the process *comm* / *pid* if given; the command must end with
        *expect_status* (see `trace`)."""
        way = self.road(road)
        selector = SyscallSelector(self.names(way).number(nr), dict(args or {}), comm=comm, pid=pid, agent=agent)
        return self.trace(command, selector, way, timeout=timeout, expect_status=expect_status)

    def count(self, command: str, location: str | int, condition: str | None = None,
              timeout: float | None = None, expect_status: ExpectedStatus = 0,
              payload: str | None = None) -> tuple[int, CommandResult]:
        """Run *command* and count how often the kernel reaches *location* (a symbol or an
        address) with *condition* while it runs; returns the count and the command's
        result. Each hit is a stop and a resume (~10 ms under TCG). A command that ends
        with a status *expect_status* does not name (0 unless told; None: any) raises
        CommandFailed: a count of a command that did not run counts nothing.

        *payload* counts one process, with no DWARF: the first hit in an address space
        that holds that payload's code at its `main` names it, and the later hits are its
        own (its page-table root, or its task in kernel state; see CurrentTask.same_process)
        until it reaches do_exit, after which nothing is counted: the kernel may give its root
        or its task_struct to a later process."""
        deadline = time.monotonic() + (timeout or self.timeout)

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TraceError(f"`{command}` did not end within {timeout or self.timeout:g} s")
            return remaining

        where = f"*{location:#x}" if isinstance(location, int) else f"*{self.kernel.vmlinux.symbol(location):#x}"
        gate = self.payload_code(payload) if payload is not None else None
        self.gdb.delete_breakpoints()
        number: int | None = self.gdb.break_insert(where, condition=_both(condition, gate[2] if gate else None)).number
        hits, exit_bp = 0, None
        try:
            pending = self.guest.console.start(command)
            while True:
                stop = resume_watching(self.gdb, pending, left)
                if exit_bp is not None and stop.breakpoint == exit_bp:
                    # Gone: a later process may get its page-table root or its task's memory.
                    self.gdb.delete_breakpoints()
                    number = exit_bp = None
                    continue
                if stop.breakpoint != number:
                    raise TraceError(f"counting {where} in `{command}`: unexpected stop {stop}")
                if gate is not None and not self._holds(gate):
                    continue  # GDB stops on a condition it cannot evaluate: code unmapped there
                hits += 1
                if gate is not None:
                    (number, exit_bp), gate = self._follow_process(where, condition), None
        except CommandEnded as ended:
            clear_breakpoints(self.gdb, quietly=False)
            return hits, check_status(ended.result, expect_status)
        except BaseException:
            clear_breakpoints(self.gdb, quietly=True)  # never in place of the error being raised
            raise

    def payload_code(self, name: str) -> tuple[int, bytes, str]:
        """(address, code, condition): MAIN_CODE_BYTES of payload *name*'s code from its
        `main` on, and a condition true where they are mapped there. Static payloads share
        their addresses (musl puts every `main` at one address, busybox has its own code
        there), so the bytes tell them apart."""
        program = self.guest.payload(name)
        address = program.symbol(MAIN)
        code = program.read(address, MAIN_CODE_BYTES)
        return address, code, self.architecture.current.holds_code(address, code)

    def _holds(self, gate: tuple[int, bytes, str]) -> bool:
        """Whether the address space at this stop holds the gate's code (read, not trusted)."""
        address, code, _ = gate
        try:
            return self.gdb.read_memory(address, len(code)) == code
        except SyscallIrlError:
            return False

    def _follow_process(self, where: str, condition: str | None) -> tuple[int, int | None]:
        """The breakpoint at *where* again, for the process stopped there now only, and one
        where that process exits (None if the kernel has no EXIT symbol)."""
        vmlinux = self.kernel.vmlinux
        this = self.architecture.current.same_process(self.gdb, vmlinux)
        self.gdb.delete_breakpoints()
        number = self.gdb.break_insert(where, condition=_both(condition, this.here)).number
        if not vmlinux.has_symbol(EXIT):
            return number, None
        return number, self.gdb.break_insert(f"*{vmlinux.symbol(EXIT):#x}", condition=this.exiting).number

    def count_syscalls(self, command: str, *, nr: int | str, road: str | None = None,
                       args: Mapping[int, int | str] | None = None, comm: str | None = None, pid: int | None = None,
                       payload: str | None = None, timeout: float | None = None,
                       expect_status: ExpectedStatus = 0) -> tuple[int, CommandResult]:
        """How many syscalls *nr* (with *args*) the selected process made on *road* while
        *command* ran (counted at the road's kernel entry), and the command's result, which
        must end with *expect_status* (see `count`). *payload* selects the process running
        that payload, from its first selected syscall on, by its page-table root (no DWARF
        needed; see `count`); *comm* / *pid* read task_struct (DWARF)."""
        way = self.road(road)
        selector = SyscallSelector(self.names(way).number(nr), dict(args or {}), comm=comm, pid=pid)
        # A payload's code names its process (never the agent's): no task_struct term then.
        terms = [selector.register_condition(way.abi),
                 process_condition(self.kernel, self.architecture, selector, payload=payload is not None)]
        return self.count(command, self.facts.entry_address(way), " && ".join(t for t in terms if t), timeout,
                          expect_status, payload=payload)

    def road(self, name: str | None) -> Road:
        """The architecture's road *name* (its default road for None)."""
        return road_named(self.architecture.roads, name or self.architecture.default_road)

    # --- taking a trace ------------------------------------------------------------------

    def trace(self, command: str, selector: SyscallSelector, road: Road | None = None,
              user_address: int | None = None, timeout: float | None = None,
              expect_status: ExpectedStatus = 0) -> SyscallTrace:
        """Run *command* in the guest and trace the syscall *selector* picks on *road*
        (the architecture's default road for None).

        *user_address* is the user instruction (a payload's label); without it the trace
        starts at the kernel entry and the user stage is not taken. A command that ends
        with a status *expect_status* does not name (0 unless told; None: any, for a test
        that judges the status itself) raises CommandFailed; the trace is kept in `traces`
        for the report."""
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
            check_status(ended, expect_status)
        return result

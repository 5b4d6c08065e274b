"""The walk down one road: the stops, steps and breakpoints that take a SyscallTrace.

tracer.py's SyscallTracer is the API; this is how a trace is taken, one `Walk` per
trace, for every road of every architecture alike (arch/ describes them; the x86 words
below are x86_64's answers):
1. the first stop: at the user instruction (a payload's labelled `syscall`, `int $0x80`
   or `sysenter`), qualified by the syscall's registers and the process; or, for a
   shell command, at the road's kernel entry. It records the running task, and every
   later breakpoint is qualified by that task, by the pt_regs pointer or by the values
   pt_regs holds, so no other process and no other syscall stops there;
2. one `stepi` off the user instruction shows where the CPU enters (recorded, never
   assumed); stepping on past the entry's switch to kernel state (`swapgs`), if the
   entry code has one;
3. the C entry that takes pt_regs (decoded), the handler, `ksys_<name>`, the return;
4. every exit of the road armed at once, with pt_regs as the handler left it: an exit
   inside the entry code (SYSRET: the exit `swapgs`, `sysretq`/`sysretl`) or a return
   path (IRET: `iret_path`, `iretq` and the frame it pops); back in user mode at pt_regs->ip.
While the guest runs, the command is watched: if it ends before the selected syscall,
the trace fails at once, saying why. A walk is handed what it needs (a debugger, the
kernel's facts, the architecture, the faults, a deadline), never its tracer; it depends
on small protocols (protocols.py), not on GdbSession and Guest. No pytest here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from ..arch.base import Architecture
from ..arch.roads import Exit
from ..core.errors import SyscallIrlError, tail
from ..kernel.artifacts import Kernel
from ..machine.console import CommandResult
from ..machine.mi_records import StopEvent
from .facts import KernelFacts
from .model import NO_HANDLER, Stage, SyscallSelector, SyscallTrace, TraceError
from .protocols import Debugger, Fault, Running

log = logging.getLogger(__name__)

MAX_SWITCH_STEPS = 16
MAX_STEP_ATTEMPTS = 3
POLL_SLICE = 0.2  # how often a running guest's command is checked for its end


class CommandEnded(Exception):
    """The traced command ended while the tracer waited for a stop."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(result.command)
        self.result = result


def resume_watching(gdb: Debugger, pending: Running | None, left: Callable[[], float]) -> StopEvent:
    """Resume and wait for the next stop, watching the guest command meanwhile: if it
    ends first, the target is stopped again and CommandEnded raised. *left()* is the
    time that remains (it raises when none does)."""
    gdb.resume()
    while True:
        wait = min(POLL_SLICE, left())
        try:
            return gdb.wait_for_stop(wait)
        except SyscallIrlError:
            if gdb.state != "running":
                raise
        ended = pending.poll() if pending is not None else None
        if ended is not None:
            gdb.interrupt()
            raise CommandEnded(ended)



def clear_breakpoints(gdb: Debugger, quietly: bool) -> None:
    """Delete every breakpoint (a running target is stopped first). *quietly*: an error
    here is logged, so that it never replaces the error being raised."""
    try:
        if gdb.state == "running":
            gdb.interrupt()
        gdb.delete_breakpoints()
    except SyscallIrlError as exc:
        if not quietly:
            raise
        log.warning("cleaning up after a failed trace: %s", exc)


def process_condition(kernel: Kernel, architecture: Architecture, selector: SyscallSelector, payload: bool) -> str:
    """The selector's process terms (comm, pid, never the agent) as a condition in user
    mode or before the entry's switch to kernel state. A payload's instruction address
    already picks its program, so only a comm or pid asked for is added there: reading
    task_struct fails under PTI (user page tables map no kernel data), and GDB would stop
    on the failed condition."""
    asked = selector.comm is not None or selector.pid is not None
    if not kernel.dwarf:
        if asked:
            raise TraceError(f"selecting a process by comm or pid reads task_struct, which needs the vmlinux's "
                             f"DWARF; {kernel.vmlinux.path} has none: select by arguments (a str argument is a "
                             f"pointer to that string: execve's path), or count one payload's process with payload=")
        return ""
    if payload and not asked:
        return ""
    return architecture.current.condition(kernel.vmlinux, pid=selector.pid, comm=selector.comm,
                                          exclude_pids=() if selector.agent else (1,))


class Walk:
    """One walk down a road; each method takes one part of it."""

    def __init__(self, gdb: Debugger, facts: KernelFacts, architecture: Architecture,
                 faults: Mapping[str, list[Fault]], trace: SyscallTrace, deadline: float) -> None:
        self.gdb = gdb
        self.facts = facts
        self.arch = architecture
        self.faults = faults
        self.vmlinux = facts.vmlinux
        self.trace = trace
        self.road = trace.road
        self.deadline = deadline
        self.pending: Running | None = None
        self.task = 0  # the task_struct followed, from the first stop
        self.dispatch_registers: Mapping[str, int] = {}  # at the C entry's first instruction
        self.regs_ptr = 0
        self.pt_regs: Mapping[str, int] = {}  # as the exits will restore them
        self.armed: dict[int, tuple[str, Exit | None]] = {}  # exit breakpoint number -> (stage, exit)

    # --- plumbing --------------------------------------------------------------------------

    def left(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TraceError(f"trace did not finish in time; so far:\n{self.trace}")
        return remaining

    def stop(self) -> StopEvent:
        """Resume and wait for the next stop, watching the command meanwhile."""
        return resume_watching(self.gdb, self.pending, self.left)

    def clean_up(self, quietly: bool) -> None:
        """Delete the breakpoints; see clear_breakpoints."""
        clear_breakpoints(self.gdb, quietly)

    def record(self, name: str, note: str = "", pt_regs_at: int | None = None, backtrace: bool = False,
               frame: bool = False) -> Stage:
        undo = [fault(self.gdb) for fault in self.faults.get(name, ())]
        regs = self.gdb.registers(self.arch.trace_registers)
        pt_regs = self.read_pt_regs(pt_regs_at) if pt_regs_at is not None else None
        popped = self.arch.exit_frame(self.gdb, regs) if frame else None
        frames = tuple(f.function or f"{f.address:#x}" for f in self.gdb.backtrace()) if backtrace else ()
        for action in undo:
            if action is not None:
                action()
        stage = Stage(name, True, regs, pt_regs, note=note, backtrace=frames, frame=popped,
                      summary=self.arch.summary)
        self.trace.stages[name] = stage
        return stage

    def skip(self, name: str, note: str) -> None:
        self.trace.stages[name] = Stage(name, False, note=note)

    def read_pt_regs(self, address: int) -> dict[str, int]:
        layout, frame = self.facts.pt_regs_layout, self.arch.pt_regs
        return frame.decode(self.gdb.read_memory(address, frame.size(layout)), layout)

    def at(self, symbol: str) -> str:
        """A breakpoint location at the symbol's first instruction: argument registers and
        the return address hold there by the ABI, whatever GDB's prologue analysis says."""
        return f"*{self.vmlinux.symbol(symbol):#x}"

    def ours(self) -> str:
        """A condition true only while the task followed runs (no DWARF needed)."""
        return self.arch.current.is_running(self.vmlinux, self.task)

    # --- the walk --------------------------------------------------------------------------

    def arm_first(self, user_address: int | None) -> None:
        selector = self.trace.selector
        terms = [selector.register_condition(self.road.abi)]
        who = process_condition(self.facts.kernel, self.arch, selector, payload=user_address is not None)
        if who:
            terms.append(who)
        self.gdb.delete_breakpoints()
        if user_address is not None:
            # Hardware: under KVM a software breakpoint would patch whichever process is mapped.
            self.gdb.break_insert(f"*{user_address:#x}", condition=" && ".join(terms), hardware=True)
        else:
            self.gdb.break_insert(f"*{self.facts.entry_address(self.road):#x}", condition=" && ".join(terms))

    def walk(self, from_user: bool) -> None:
        try:
            first = self.stop()
        except CommandEnded as ended:
            raise self.never_made(ended.result) from None
        self.task = self.running_task(switched=False)
        if from_user:
            entered = self.step_off(self.record("user")[self.arch.pc]).address or 0
        else:
            self.skip("user", f"no user address given (trace started at the {self.road.name} entry)")
            entered = first.address or 0
        self.entry_stages(entered)
        self.gdb.delete_breakpoints()
        try:
            regs_ptr = self.dispatch_stage()
            self.handler_stages(regs_ptr)
            self.exit_stages(regs_ptr)
        except CommandEnded as ended:
            self.trace.output, self.trace.status = ended.result.output, ended.result.status
            self.ended_early(ended.result)

    def running_task(self, switched: bool) -> int:
        """The task_struct running now, 0 where its per-CPU slot cannot be read: with page
        table isolation, user mode and the first entry instructions run on page tables
        that map no kernel data."""
        register, slot = self.arch.current.slot(self.vmlinux, switched)
        base = self.gdb.registers([register])[register]
        try:
            return int.from_bytes(self.gdb.read_memory(base + slot, 8), "little")
        except SyscallIrlError as exc:
            log.info("the running task cannot be read here (PTI?): %s", exc)
            return 0

    def never_made(self, result: CommandResult) -> TraceError:
        return TraceError(
            f"`{result.command}` ended with status {result.status} before making the selected syscall "
            f"({self.road.abi.name} {self.trace.selector}, by {self.road.mnemonic}); its output ends:\n"
            f"{tail(result.output, 15)}")

    def ended_early(self, result: CommandResult) -> None:
        """The command ended on the way back: the stages not seen say so."""
        note = f"the command ended (status {result.status}) before this stage"
        for name in ("handler", "ksys", "handler_return", "dispatch_return", *self.exit_stage_names(), "user_return"):
            if name not in self.trace.stages:
                self.skip(name, note)

    def exit_stage_names(self) -> list[str]:
        return [name for way in self.road.exits for name in way.stages]

    def step_off(self, address: int) -> StopEvent:
        """Execute the instruction at *address* (a `syscall`, a `swapgs`, a `sysretq`: none
        stays put). Once, under load, a step from the user breakpoint came back with the PC
        unchanged and the `syscall` not executed (QEMU 7.2, GDB 13); a step that went
        nowhere is taken again, with a warning in the log."""
        for attempt in range(1, MAX_STEP_ATTEMPTS + 1):
            stop = self.gdb.stepi(timeout=self.left())
            if stop.address != address:
                return stop
            log.warning("stepi at %#x reported no progress (attempt %d): %s", address, attempt, stop)
        raise TraceError(f"the instruction at {address:#x} did not execute in {MAX_STEP_ATTEMPTS} steps; "
                         f"so far:\n{self.trace}")

    def entry_stages(self, rip: int) -> None:
        """Where the CPU entered (whatever symbol that is), and past the entry's switch to
        kernel state (the road's second entry stage, if it has one)."""
        names = self.vmlinux.names_at(rip)
        self.trace.entry = names[0] if names else f"{rip:#x}"
        self.record("entry", note=f"{', '.join(names) or 'no symbol'} (the CPU's way in: {self.road.found_by})")
        if len(self.road.entry_stages) < 2:
            return
        stage = self.road.entry_stages[1]
        code = self.facts.entry_code(names[0]) if names else None
        if code is None or code.entry_switch is None:
            self.skip(stage, f"no {self.arch.entry_switch} in {self.trace.entry} itself")
            return
        self.step_past(rip, code.entry_switch, stage)

    def step_past(self, rip: int | None, address: int, name: str) -> None:
        """Step from *rip* until the instruction at *address* has executed, then record *name*."""
        for _ in range(MAX_SWITCH_STEPS):
            if rip == address:
                self.step_off(address)
                self.record(name)
                return
            rip = self.gdb.stepi(timeout=self.left()).address
        self.skip(name, f"{self.arch.entry_switch} at {address:#x} not reached in {MAX_SWITCH_STEPS} steps")

    def dispatch_stage(self) -> int:
        """The C entry, with the pt_regs it was given (where the architecture says)."""
        symbol = self.road.dispatch_symbol(self.vmlinux)
        regs_reg = self.arch.dispatch_regs_register(symbol, self.facts.kernel.version_tuple)
        self.gdb.break_insert(self.at(symbol), condition=self.ours() if self.task else self.number_in(regs_reg))
        self.stop()
        regs_ptr = self.gdb.registers([regs_reg])[regs_reg]
        if not self.task:
            self.task = self.running_task(switched=True)
        stage = self.record(symbol, note=f"regs={regs_ptr:#x} in ${regs_reg}", pt_regs_at=regs_ptr)
        self.dispatch_registers = stage.registers
        self.gdb.delete_breakpoints()
        self.trace.table_handler = self.live_table_entry()
        if self.facts.kernel.dwarf:
            self.trace.task = self.arch.current.read(self.gdb, self.vmlinux)
        return regs_ptr

    def number_in(self, regs_reg: str) -> str:
        """A condition true when the pt_regs in *regs_reg* are the selected syscall's."""
        return self.arch.dispatch_number_condition(regs_reg, self.facts.pt_regs_layout, self.trace.selector.nr)

    def live_table_entry(self) -> str:
        """What the kernel's syscall table holds for the number in guest memory ("" if
        the kernel has no table, or the number is beyond it)."""
        table, nr = self.road.abi.table, self.trace.selector.nr
        if not self.vmlinux.has_symbol(table) or not 0 <= nr < self.vmlinux.symbol_size(table) // 8:
            return ""
        pointer = int.from_bytes(self.gdb.read_memory(self.vmlinux.symbol(table) + 8 * nr, 8), "little")
        # Aliases share an address (__do_sys_getppid, __x64_sys_getppid): the ABI's name first.
        names = sorted(self.vmlinux.names_at(pointer), key=lambda n: not n.startswith(self.road.abi.handler_prefixes))
        return names[0] if names else f"{pointer:#x}"

    def handler_stages(self, regs_ptr: int) -> None:
        handler = self.trace.handler
        if handler == NO_HANDLER:
            for name in ("handler", "ksys", "handler_return"):
                self.skip(name, f"the kernel has no {self.road.abi.name} handler for nr {self.trace.selector.nr}")
            return
        # The handler and the exit work take pt_regs as their first argument.
        takes_ours = f"${self.arch.kernel_arg_registers[0]} == {regs_ptr:#x}"
        number = self.gdb.break_insert(self.at(handler), condition=takes_ours).number
        if self.vmlinux.has_symbol("syscall_exit_to_user_mode"):
            # Leaving for user mode without the handler: the kernel dispatched elsewhere.
            self.gdb.break_insert(self.at("syscall_exit_to_user_mode"), condition=takes_ours)
        stop = self.stop()
        self.gdb.delete_breakpoints()
        if stop.breakpoint != number:
            where = self.vmlinux.names_at(stop.address or 0)
            for name in ("handler", "ksys", "handler_return"):
                self.skip(name, f"the CPU did not reach {handler} (stopped at {', '.join(where) or stop.address})")
            return
        # pt_regs again: the C entry may have completed it (the fast 32-bit entries fetch
        # argument 6 from the user stack).
        self.record("handler", backtrace=True, pt_regs_at=regs_ptr)
        self.handler_tail(handler, regs_ptr)

    def ksys_of(self, handler: str) -> str:
        """ksys_<name> for the handler PREFIX + name (the ABI's longest prefix that fits)."""
        for prefix in sorted(self.road.abi.handler_prefixes, key=len, reverse=True):
            if handler.startswith(prefix):
                return "ksys_" + handler[len(prefix):]
        return "ksys_" + handler

    def handler_tail(self, handler: str, regs_ptr: int) -> None:
        """ksys_<name> (if the handler calls it) and the handler's return."""
        ret, returned = self.arch.return_breakpoint(self.gdb, self.trace.stages["handler"].registers)
        return_bp = self.gdb.break_insert(f"*{ret:#x}", condition=returned).number
        ksys = self.ksys_of(handler)
        ksys_bp = None
        if self.vmlinux.has_symbol(ksys):
            # On the kernel stack of our pt_regs: our task, not another one in ksys_<name>.
            ksys_bp = self.gdb.break_insert(self.at(ksys), condition=self.arch.same_stack_condition(regs_ptr)).number
        stop = self.stop()
        if ksys_bp is not None and stop.breakpoint == ksys_bp:
            self.record("ksys")
            self.gdb.delete_breakpoint(ksys_bp)
            stop = self.stop()
        else:
            self.skip("ksys", f"{handler} returned without calling {ksys}" if ksys_bp is not None
                      else f"{ksys} is not a symbol of this kernel (inlined or absent)")
        if stop.breakpoint != return_bp:
            raise TraceError(f"expected the return of {handler}, stopped at {stop}; so far:\n{self.trace}")
        self.record("handler_return", note="rax = the handler's return value")
        self.gdb.delete_breakpoints()

    def exit_stages(self, regs_ptr: int) -> None:
        """Back in the entry code from the C entry (dispatch_return), where pt_regs is final
        (the handler, signal delivery and the exit work are done), then every exit of the
        road armed at once, qualified by where pt_regs says the kernel returns to."""
        self.regs_ptr = regs_ptr
        if self.dispatch_registers:
            # What the C entry returns (do_syscall_64's bool since 6.7: may it SYSRET?).
            back, returned = self.arch.return_breakpoint(self.gdb, self.dispatch_registers)
            number = self.gdb.break_insert(f"*{back:#x}", condition=returned).number
            stop = self.stop()
            if stop.breakpoint != number:
                raise TraceError(f"expected the return of {self.trace.dispatch.name}, stopped at {stop}; "
                                 f"so far:\n{self.trace}")
            self.record("dispatch_return", note=f"rax = what {self.trace.dispatch.name} returned")
            self.gdb.delete_breakpoints()
        self.pt_regs = pt = self.read_pt_regs(regs_ptr)
        ip, back_in_user = self.arch.user_return(pt)
        self.arm("user_return", f"*{ip:#x}", back_in_user, None, hardware=True)
        for way in self.road.exits:
            if way.path:
                self.arm_path(way)
            else:
                self.arm_in_code(way)
        self.follow_exit()

    def arm(self, name: str, location: str, condition: str, way: Exit | None, hardware: bool = False) -> None:
        self.armed[self.gdb.break_insert(location, condition=condition, hardware=hardware).number] = (name, way)

    def arm_in_code(self, way: Exit) -> None:
        """An exit inside the entry code: its switch back to user state, its instruction."""
        code = self.facts.entry_code(way.in_code)
        condition = self.arch.in_code_exit_condition(self.pt_regs)
        if code.exit_switch is not None and len(way.stages) > 1:
            self.arm(way.stages[0], f"*{code.exit_switch:#x}", condition, way)
        if code.exit_instruction is not None:
            self.arm(way.stages[-1], f"*{code.exit_instruction:#x}", condition, way)

    def arm_path(self, way: Exit) -> None:
        """A return path from pt_regs; straight its instruction where the kernel has no
        symbol for the path's start."""
        if self.vmlinux.has_symbol(way.path):
            self.arm(way.stages[0], self.at(way.path), self.arch.path_exit_condition(self.regs_ptr), way)
        else:
            self.arm_path_return(way)

    def arm_path_return(self, way: Exit) -> None:
        """The return path's instruction (x86: the `iretq` of the common exit), qualified
        by the frame it pops. Armed only once the path is taken: every interrupt returns
        through it, and a debug stop at each (QEMU 7.2 flushes its translations at every
        one) starves the guest; from the IRET path on, interrupts are off."""
        if self.vmlinux.has_symbol(way.instruction):
            self.arm(way.stages[-1], self.at(way.instruction), self.arch.path_return_condition(self.pt_regs), way)

    def follow_exit(self) -> None:
        while "user_return" not in self.trace.stages:
            stop = self.stop()
            name, way = self.armed.get(stop.breakpoint or -1, ("", None))
            if not name:
                raise TraceError(f"unexpected stop {stop.reason} at {stop.address:#x}; so far:\n{self.trace}")
            if way is None:
                self.record(name, note="back in user mode")
            elif name != way.stages[-1]:
                self.passing(name, way)
            elif way.path:
                self.trace.exit = way.name
                self.record(name, note=f"frame = what {name} pops", frame=True)
            else:
                self.trace.exit = way.name
                self.step_off(self.record(name)[self.arch.pc])
                self.record("user_return", note=f"one instruction after {name}")
            self.gdb.delete_breakpoint(stop.breakpoint or -1)
        for name in ["dispatch_return", *self.exit_stage_names()]:
            if name not in self.trace.stages:
                self.skip(name, f"the kernel left by {self.trace.exit or 'another way'}")

    def passing(self, name: str, way: Exit) -> None:
        """A stage on the way to an exit's instruction: a return path's start (then its
        instruction is armed), or an in-code exit's switch back to user state."""
        if way.path:
            self.record(name, note=f"pt_regs = what the {way.name.upper()} exit restores", pt_regs_at=self.regs_ptr)
            self.arm_path_return(way)
        else:
            self.record(name)

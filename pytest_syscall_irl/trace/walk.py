"""The walk down one road: the stops, steps and breakpoints that take a SyscallTrace.

tracer.py's SyscallTracer is the API; this is how a trace is taken, one `Walk` per
trace, for every road alike (roads.py describes them):
1. the first stop: at the user instruction (a payload's labelled `syscall`, `int $0x80`
   or `sysenter`), qualified by the syscall's registers and the process; or, for a
   shell command, at the road's kernel entry. It records the running task, and every
   later breakpoint is qualified by that task, by the pt_regs pointer or by the values
   pt_regs holds, so no other process and no other syscall stops there;
2. one `stepi` off the user instruction shows where the CPU enters (recorded, never
   assumed); stepping on to the entry's `swapgs`, if the entry code has one;
3. the C entry that takes pt_regs (decoded), the handler, `ksys_<name>`, the return;
4. every exit of the road armed at once, with pt_regs as the handler left it: SYSRET
   (the exit `swapgs`, `sysretq`/`sysretl`) or IRET (`iret_path`, `iretq` and the frame
   it pops); back in user mode at pt_regs->ip.
While the guest runs, the command is watched: if it ends before the selected syscall,
the trace fails at once, saying why. The walk depends on small protocols (a debugger,
a guest), not on GdbSession and Guest. No pytest here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

from ..arch.x86_64 import tasks
from ..arch.x86_64 import facts as x86
from ..machine.console import CommandResult
from ..core.errors import SyscallIrlError, tail
from ..machine.mi_records import Breakpoint, Frame, Instruction, StopEvent
from ..lab.image import Payload
from ..machine.qemu import MachineConfig
from ..arch.x86_64.roads import IRET_PATH_SYMBOL, IRETQ_SYMBOL, SYSRET_CODE
from ..kernel.artifacts import Kernel
from .model import NO_HANDLER, TRACE_REGISTERS, Stage, SyscallSelector, SyscallTrace, TraceError

if TYPE_CHECKING:
    from .tracer import SyscallTracer

log = logging.getLogger(__name__)

MAX_SWAPGS_STEPS = 16
MAX_STEP_ATTEMPTS = 3
POLL_SLICE = 0.2  # how often a running guest's command is checked for its end


class Debugger(Protocol):
    """What the tracer needs of a debugger attached to a stopped guest (GdbSession)."""

    @property
    def state(self) -> str: ...
    def registers(self, names: Sequence[str] | None = None, timeout: float = ...) -> dict[str, int]: ...
    def read_memory(self, address: int, size: int, timeout: float = ...) -> bytes: ...
    def evaluate(self, expression: str, timeout: float = ...) -> str: ...
    def break_insert(self, location: str, condition: str | None = None, hardware: bool = False,
                     temporary: bool = False, timeout: float = ...) -> Breakpoint: ...
    def delete_breakpoint(self, number: int, timeout: float = ...) -> None: ...
    def delete_breakpoints(self, timeout: float = ...) -> None: ...
    def resume(self, timeout: float = ...) -> None: ...
    def wait_for_stop(self, timeout: float = ...) -> StopEvent: ...
    def stepi(self, timeout: float = ...) -> StopEvent: ...
    def interrupt(self, timeout: float = ...) -> StopEvent: ...
    def disassemble(self, start: str | int, end: int | None = None, timeout: float = ...) -> list[Instruction]: ...
    def backtrace(self, timeout: float = ...) -> list[Frame]: ...
    def member_offsets(self, aggregate: str, timeout: float = ...) -> dict[str, int]: ...


class Running(Protocol):
    """A command started in the guest (console.PendingCommand)."""

    command: str

    def wait(self, timeout: float | None = None) -> CommandResult: ...
    def poll(self) -> CommandResult | None: ...


class Console(Protocol):
    def start(self, command: str) -> Running: ...


class TracedGuest(Protocol):
    """What the tracer needs of a guest (guest.Guest)."""

    @property
    def console(self) -> Console: ...
    @property
    def config(self) -> MachineConfig: ...
    def payload(self, name: str) -> Payload: ...
    def running(self) -> AbstractContextManager[None]: ...


Fault = Callable[[Debugger], Optional[Callable[[], None]]]


@dataclass(frozen=True)
class EntryCode:
    """Addresses in an entry function, found by disassembly (6.1 puts `verw` between the
    exit swapgs and sysretq, so no fixed label or offset is trusted)."""

    entry: int
    entry_swapgs: int | None
    exit_swapgs: int | None
    sysret: int | None

    @classmethod
    def find(cls, entry: int, instructions: list[Instruction]) -> EntryCode:
        texts = [(insn.address, insn.text.split()[0] if insn.text.split() else "") for insn in instructions]
        swapgs = [address for address, op in texts if op == "swapgs"]
        sysret = [address for address, op in texts if op in ("sysretq", "sysret", "sysretl")]
        exit_swapgs = max((a for a in swapgs if sysret and a < sysret[0]), default=None)
        return cls(entry, swapgs[0] if swapgs else None, exit_swapgs, sysret[0] if sysret else None)


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


def process_condition(kernel: Kernel, selector: SyscallSelector, payload: bool) -> str:
    """The selector's process terms (comm, pid, never the agent) as a condition in user
    mode or before the entry swapgs (kernel GS base in MSR_KERNEL_GS_BASE). A payload's
    instruction address already picks its program, so only a comm or pid asked for is
    added there: reading task_struct fails under PTI (user page tables map no kernel
    data), and GDB would stop on the failed condition."""
    asked = selector.comm is not None or selector.pid is not None
    if not kernel.dwarf:
        if asked:
            raise TraceError(f"selecting a process by comm or pid reads task_struct, which needs the vmlinux's "
                             f"DWARF; {kernel.vmlinux.path} has none: select by arguments only")
        return ""
    if payload and not asked:
        return ""
    return tasks.task_condition(kernel.vmlinux, tasks.GS_IN_USER, pid=selector.pid, comm=selector.comm,
                                exclude_pids=() if selector.agent else (1,))


class Walk:
    """One walk down a road; each method takes one part of it."""

    def __init__(self, tracer: SyscallTracer, trace: SyscallTrace, deadline: float) -> None:
        self.t = tracer
        self.gdb = tracer.gdb
        self.vmlinux = tracer.kernel.vmlinux
        self.trace = trace
        self.road = trace.road
        self.deadline = deadline
        self.pending: Running | None = None
        self.task = 0  # the task_struct followed, from the first stop
        self.dispatch_sp = 0  # RSP at the C entry's first instruction: its return address
        self.regs_ptr = 0
        self.armed: dict[int, str] = {}  # exit breakpoint number -> stage

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
        undo = [fault(self.gdb) for fault in self.t.faults.get(name, ())]
        regs = self.gdb.registers(TRACE_REGISTERS)
        pt_regs = self.read_pt_regs(pt_regs_at) if pt_regs_at is not None else None
        iret_frame = x86.decode_iret_frame(self.gdb.read_memory(regs["rsp"], 40)) if frame else None
        frames = tuple(f.function or f"{f.address:#x}" for f in self.gdb.backtrace()) if backtrace else ()
        for action in undo:
            if action is not None:
                action()
        stage = Stage(name, True, regs, pt_regs, note=note, backtrace=frames, frame=iret_frame)
        self.trace.stages[name] = stage
        return stage

    def skip(self, name: str, note: str) -> None:
        self.trace.stages[name] = Stage(name, False, note=note)

    def read_pt_regs(self, address: int) -> dict[str, int]:
        layout = self.t.pt_regs_layout
        return x86.decode_pt_regs(self.gdb.read_memory(address, max(layout.values()) + 8), layout)

    def at(self, symbol: str) -> str:
        """A breakpoint location at the symbol's first instruction: argument registers and
        the return address hold there by the ABI, whatever GDB's prologue analysis says."""
        return f"*{self.vmlinux.symbol(symbol):#x}"

    def ours(self, gs: str = tasks.GS_IN_KERNEL) -> str:
        """A condition true only while the task followed runs (no DWARF needed)."""
        return f"*(unsigned long *)({gs} + {tasks.current_task_slot(self.vmlinux):#x}) == {self.task:#x}"

    # --- the walk --------------------------------------------------------------------------

    def arm_first(self, user_address: int | None) -> None:
        selector, abi = self.trace.selector, self.road.abi
        terms = [selector.register_condition(abi.arg_registers, abi.bits)]
        who = process_condition(self.t.kernel, selector, payload=user_address is not None)
        if who:
            terms.append(who)
        self.gdb.delete_breakpoints()
        if user_address is not None:
            # Hardware: under KVM a software breakpoint would patch whichever process is mapped.
            self.gdb.break_insert(f"*{user_address:#x}", condition=" && ".join(terms), hardware=True)
        else:
            self.gdb.break_insert(f"*{self.t.entry_address(self.road):#x}", condition=" && ".join(terms))

    def walk(self, from_user: bool) -> None:
        try:
            first = self.stop()
        except CommandEnded as ended:
            raise self.never_made(ended.result) from None
        self.task = self.running_task(tasks.GS_IN_USER)
        if from_user:
            entered = self.step_off(self.record("user")["rip"]).address or 0
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

    def running_task(self, gs: str) -> int:
        """The task_struct running now, 0 where its per-CPU slot cannot be read: with page
        table isolation, user mode and the first entry instructions run on page tables
        that map no kernel data."""
        base = self.gdb.registers([gs.lstrip("$")])[gs.lstrip("$")]
        try:
            return int.from_bytes(self.gdb.read_memory(base + tasks.current_task_slot(self.vmlinux), 8), "little")
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
        """Where the CPU entered (whatever symbol that is), and past the entry's swapgs."""
        names = self.vmlinux.names_at(rip)
        self.trace.entry = names[0] if names else f"{rip:#x}"
        self.record("entry", note=f"{', '.join(names) or 'no symbol'} (the CPU's way in: {self.road.found_by})")
        code = self.t.entry_code(names[0]) if names else None
        if code is None or code.entry_swapgs is None:
            self.skip("after_swapgs", f"no swapgs in {self.trace.entry} itself")
            return
        self.step_past(rip, code.entry_swapgs, "after_swapgs")

    def step_past(self, rip: int | None, address: int, name: str) -> None:
        """Step from *rip* until the instruction at *address* has executed, then record *name*."""
        for _ in range(MAX_SWAPGS_STEPS):
            if rip == address:
                self.step_off(address)
                self.record(name)
                return
            rip = self.gdb.stepi(timeout=self.left()).address
        self.skip(name, f"swapgs at {address:#x} not reached in {MAX_SWAPGS_STEPS} steps")

    def dispatch_stage(self) -> int:
        """The C entry, with the pt_regs it was given (first argument by the x86_64 ABI;
        do_syscall_64 took (nr, regs) in 5.8-5.13)."""
        symbol = self.road.dispatch_symbol(self.vmlinux)
        regs_reg = x86.do_syscall_64_args(self.t.kernel.version_tuple)[0] if symbol == "do_syscall_64" else "rdi"
        self.gdb.break_insert(self.at(symbol), condition=self.ours() if self.task else self.number_in(regs_reg))
        self.stop()
        regs_ptr = self.gdb.registers([regs_reg])[regs_reg]
        if not self.task:
            self.task = self.running_task(tasks.GS_IN_KERNEL)
        stage = self.record(symbol, note=f"regs={regs_ptr:#x} in ${regs_reg}", pt_regs_at=regs_ptr)
        self.dispatch_sp = stage["rsp"]
        self.gdb.delete_breakpoints()
        self.trace.table_handler = self.live_table_entry()
        if self.t.kernel.dwarf:
            self.trace.task = tasks.read_current(self.gdb, self.vmlinux)
        return regs_ptr

    def number_in(self, regs_reg: str) -> str:
        """A condition true when the pt_regs in *regs_reg* are the selected syscall's: the
        number in orig_ax, or in ax where the int80 entry leaves orig_ax -1 for its C
        code to fill (do_int80_emulation)."""
        layout, nr = self.t.pt_regs_layout, self.trace.selector.nr
        orig_ax, ax = (f"*(unsigned long *)(${regs_reg} + {layout[f]})" for f in ("orig_ax", "ax"))
        return f"({orig_ax} == {nr:#x} || ({orig_ax} == -1 && {ax} == {nr:#x}))"

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
        number = self.gdb.break_insert(self.at(handler), condition=f"$rdi == {regs_ptr:#x}").number
        if self.vmlinux.has_symbol("syscall_exit_to_user_mode"):
            # Leaving for user mode without the handler: the kernel dispatched elsewhere.
            self.gdb.break_insert(self.at("syscall_exit_to_user_mode"), condition=f"$rdi == {regs_ptr:#x}")
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

    def handler_tail(self, handler: str, regs_ptr: int) -> None:
        """ksys_<name> (if the handler calls it) and the handler's return."""
        sp = self.trace.stages["handler"]["rsp"]
        ret = int.from_bytes(self.gdb.read_memory(sp, 8), "little")
        # The return lands right after the call, with the return address popped.
        return_bp = self.gdb.break_insert(f"*{ret:#x}", condition=f"$rsp == {sp + 8:#x}").number
        ksys = "ksys_" + re.sub(r"^__(x64|ia32)_(compat_)?sys_", "", handler)
        ksys_bp = None
        if self.vmlinux.has_symbol(ksys):
            # Same kernel stack as our pt_regs (kernel stacks are THREAD_SIZE aligned, >= 16 KiB).
            ksys_bp = self.gdb.break_insert(self.at(ksys), condition=f"($rsp >> 14) == ({regs_ptr:#x} >> 14)").number
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
        road armed at once, qualified by where pt_regs says the kernel returns to
        (registers and the IRET frame only: with PTI the exit runs on the user page tables,
        where the kernel's data cannot be read)."""
        self.regs_ptr = regs_ptr
        if self.dispatch_sp:
            # What the C entry returns (do_syscall_64's bool since 6.7: may it SYSRET?).
            back = int.from_bytes(self.gdb.read_memory(self.dispatch_sp, 8), "little")
            number = self.gdb.break_insert(f"*{back:#x}", condition=f"$rsp == {self.dispatch_sp + 8:#x}").number
            stop = self.stop()
            if stop.breakpoint != number:
                raise TraceError(f"expected the return of {self.trace.dispatch.name}, stopped at {stop}; "
                                 f"so far:\n{self.trace}")
            self.record("dispatch_return", note=f"rax = what {self.trace.dispatch.name} returned")
            self.gdb.delete_breakpoints()
        pt = self.read_pt_regs(regs_ptr)
        ip, sp = pt["ip"], pt["sp"]
        # Back in compatibility mode only ESP is the program's (QEMU keeps RSP's upper half zero).
        user_sp = f"$rsp == {sp:#x}" if pt["cs"] != x86.USER32_CS else f"($rsp & 0xffffffff) == {sp & 0xFFFFFFFF:#x}"
        self.arm("user_return", f"*{ip:#x}", f"$rip == {ip:#x} && {user_sp} && ($cs & 3) == 3", hardware=True)
        for way in self.road.exits:
            if way.name == "iret":
                if self.vmlinux.has_symbol(IRET_PATH_SYMBOL):
                    self.arm("iret_path", self.at(IRET_PATH_SYMBOL), f"$rsp == {regs_ptr:#x}")
                else:
                    self.arm_iretq(ip, sp)
                continue
            code = self.t.entry_code(SYSRET_CODE[way.name])
            cond = f"$rcx == {ip:#x} && $rsp == {sp:#x}"
            if code.exit_swapgs is not None:
                self.arm("exit_swapgs", f"*{code.exit_swapgs:#x}", cond)
            if code.sysret is not None:
                self.arm(way.name, f"*{code.sysret:#x}", cond)
        self.follow_exit(ip, sp)

    def arm(self, name: str, location: str, condition: str, hardware: bool = False) -> None:
        self.armed[self.gdb.break_insert(location, condition=condition, hardware=hardware).number] = name

    def arm_iretq(self, ip: int, sp: int) -> None:
        """The `iretq` of the common exit, qualified by the frame it pops. Armed only once
        the IRET path is taken: every interrupt returns through it, and a debug stop at
        each (QEMU 7.2 flushes its translations at every one) starves the guest; from
        the IRET path on, interrupts are off."""
        if self.vmlinux.has_symbol(IRETQ_SYMBOL):
            self.arm("iretq", self.at(IRETQ_SYMBOL),
                     f"*(unsigned long *)$rsp == {ip:#x} && *(unsigned long *)($rsp + 24) == {sp:#x}")

    def follow_exit(self, ip: int, sp: int) -> None:
        while "user_return" not in self.trace.stages:
            stop = self.stop()
            name = self.armed.get(stop.breakpoint or -1)
            if name is None:
                raise TraceError(f"unexpected stop {stop.reason} at {stop.address:#x}; so far:\n{self.trace}")
            if name in ("sysretq", "sysretl"):
                self.trace.exit = name
                self.step_off(self.record(name)["rip"])
                self.record("user_return", note=f"one instruction after {name}")
            elif name == "iretq":
                self.trace.exit = "iret"
                self.record(name, note="frame = what iretq pops", frame=True)
            elif name == "iret_path":
                self.record(name, note="pt_regs = what the IRET exit restores", pt_regs_at=self.regs_ptr)
                self.arm_iretq(ip, sp)
            else:
                self.record(name, note="back in user mode" if name == "user_return" else "")
            self.gdb.delete_breakpoint(stop.breakpoint or -1)
        for name in ["dispatch_return", *self.exit_stage_names()]:
            if name not in self.trace.stages:
                self.skip(name, f"the kernel left by {self.trace.exit or 'another way'}")

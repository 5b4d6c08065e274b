"""SyscallTrace: the register state of one syscall at every stage of the x86_64 path.

    user `syscall` -> entry_SYSCALL_64 -> (swapgs) -> do_syscall_64(regs, nr)
        -> __x64_sys_<name>(regs) [-> ksys_<name>] -> return -> (swapgs) -> sysretq -> user

The tracer arms breakpoints qualified so that only the selected syscall of the
selected process stops (busybox and the payloads are both non-PIE at 0x400000+, so a
user address alone is not enough), runs the guest command, and records each stage.
Stages the kernel does not take (an IRET exit instead of SYSRET) are recorded as such.
Addresses come from the vmlinux symbol table and from disassembly of the entry code,
never from fixed offsets. No pytest here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from . import x86
from .console import GuestConsole, PendingCommand
from .errors import SyscallIrlError
from .gdbmi import GdbSession, Instruction, StopEvent
from .guest import Guest
from .kernel import Kernel
from .qemu import MachineConfig

log = logging.getLogger(__name__)

STAGES = ("user", "entry", "after_swapgs", "do_syscall_64", "handler", "ksys", "handler_return",
          "exit_swapgs", "sysretq", "user_return")
USER_STAGES = ("user", "user_return")
KERNEL_STAGES = tuple(name for name in STAGES if name not in USER_STAGES)
# Registers recorded at every stage (one MI round trip).
TRACE_REGISTERS = ("rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                   "r12", "r13", "r14", "r15", "eflags", "cs", "ss", "fs_base", "gs_base", "k_gs_base", "cr3", "cr4")
MAX_SWAPGS_STEPS = 16
MAX_STEP_ATTEMPTS = 3
NO_HANDLER = "no handler"  # SyscallTrace.handler when sys_call_table has none for the number


class TraceError(SyscallIrlError):
    """The trace could not be taken (not: an invariant failed)."""


@dataclass(frozen=True)
class SyscallSelector:
    """Which syscall to trace: its number and any argument values (by index 0..5)."""

    nr: int
    args: Mapping[int, int] = field(default_factory=dict)

    def condition(self) -> str:
        """A GDB condition true only in user mode at the selected syscall's registers."""
        terms = [f"$rax == {self.nr:#x}"]
        terms += [f"${x86.SYSCALL_ARG_REGISTERS[i]} == {v & (2**64 - 1):#x}" for i, v in sorted(self.args.items())]
        return " && ".join(terms)


@dataclass(frozen=True)
class Stage:
    """One stage of the path: where the CPU was and what it held, or why it was not seen."""

    name: str
    taken: bool
    registers: Mapping[str, int] = field(default_factory=dict)
    pt_regs: Mapping[str, int] | None = None
    note: str = ""
    backtrace: tuple[str, ...] = ()

    def __getitem__(self, register: str) -> int:
        if not self.taken:
            raise KeyError(f"stage {self.name} was not taken: {self.note}")
        return self.registers[register]

    def line(self) -> str:
        if not self.taken:
            return f"{self.name:<15} not taken: {self.note}"
        r = self.registers
        text = (f"{self.name:<15} rip={r['rip']:#018x} cs={r['cs']:#04x} ss={r['ss']:#04x} "
                f"rflags={r['eflags']:#08x} rax={r['rax']:#x} rcx={r['rcx']:#x} r11={r['r11']:#x} "
                f"rsp={r['rsp']:#x} gs_base={r['gs_base']:#x} k_gs_base={r['k_gs_base']:#x} cr3={r['cr3']:#x}")
        return text + (f"  [{self.note}]" if self.note else "")


@dataclass
class SyscallTrace:
    """Every stage of one syscall, printable as a whole so a failure shows the path."""

    command: str
    selector: SyscallSelector
    handler: str
    stages: dict[str, Stage] = field(default_factory=dict)
    output: str | None = None

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def taken(self, names: tuple[str, ...] = STAGES) -> list[Stage]:
        """The stages among *names* the kernel took (an IRET exit skips the SYSRET ones)."""
        return [self.stages[name] for name in names if name in self.stages and self.stages[name].taken]

    def __str__(self) -> str:
        head = f"syscall trace of nr={self.selector.nr} ({self.handler}) in `{self.command}`"
        body = [self.stages[name].line() for name in STAGES if name in self.stages]
        regs = self.stages.get("do_syscall_64")
        if regs is not None and regs.pt_regs:
            body.append("pt_regs at do_syscall_64: " + " ".join(f"{k}={v:#x}" for k, v in regs.pt_regs.items()))
        handler = self.stages.get("handler")
        if handler is not None and handler.backtrace:
            body.append("backtrace at the handler: " + " <- ".join(handler.backtrace))
        return "\n".join([head, *("  " + line for line in body)])


@dataclass(frozen=True)
class EntryCode:
    """Addresses in entry_SYSCALL_64, found by disassembly (6.1 puts verw between the
    exit swapgs and sysretq, so no fixed label or offset is trusted)."""

    entry: int
    entry_swapgs: int
    exit_swapgs: int | None
    sysretq: int | None

    @classmethod
    def find(cls, entry: int, instructions: list[Instruction]) -> EntryCode:
        texts = [(insn.address, insn.text.split()[0] if insn.text.split() else "") for insn in instructions]
        swapgs = [address for address, op in texts if op == "swapgs"]
        sysret = [address for address, op in texts if op in ("sysretq", "sysret", "sysretl")]
        if not swapgs:
            raise TraceError("no swapgs in entry_SYSCALL_64: is this an x86_64 kernel without FRED?")
        exit_swapgs = max((a for a in swapgs if sysret and a < sysret[0]), default=None)
        return cls(entry, swapgs[0], exit_swapgs, sysret[0] if sysret else None)


Fault = Callable[[GdbSession], Optional[Callable[[], None]]]
_LAYOUTS: dict[Path, dict[str, int]] = {}  # vmlinux -> struct pt_regs offsets
# (vmlinux, machine) -> the entry code as the booted kernel patched it (alternatives
# follow the CPU model and the boot arguments; a restored guest has its saver's memory).
_ENTRY_CODES: dict[tuple[Path, MachineConfig], EntryCode] = {}


def syscall_number(name_or_nr: int | str) -> int:
    """A syscall number from the x86_64 ABI table (x86.SYSCALL_NUMBERS) or as given."""
    if isinstance(name_or_nr, int):
        return name_or_nr
    try:
        return x86.SYSCALL_NUMBERS[name_or_nr]
    except KeyError:
        raise TraceError(f"unknown syscall {name_or_nr!r}: pass its number (syscall_64.tbl)") from None


class SyscallTracer:
    """Takes SyscallTraces with a stopped, attached GDB session and the guest it drives.

        tracer.payload("syscall_irl", nr="write", args={0: 1, 2: 12})
        tracer.command("echo syscall_irl", nr="write", args={0: 1, 2: 12})
    """

    def __init__(self, gdb: GdbSession, kernel: Kernel, guest: Guest, timeout: float = 60.0) -> None:
        self.gdb = gdb
        self.kernel = kernel
        self.guest = guest
        self.console: GuestConsole = guest.console
        self.timeout = timeout
        self.traces: list[SyscallTrace] = []
        self.faults: dict[str, list[Fault]] = {}

    @property
    def pt_regs_layout(self) -> dict[str, int]:
        """struct pt_regs field offsets: from DWARF when the vmlinux has it, cross-checked
        against the x86_64 layout (a disagreement is an error: one of them is wrong);
        the known layout otherwise. Looked up once per vmlinux and process, in one type
        lookup (``ptype/o``: 16 ms, where an expression per field took 14 ms each)."""
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

    def inject(self, stage: str, fault: Fault) -> None:
        """Run *fault(gdb)* when a trace reaches *stage*, before the stage is recorded; if it
        returns a callable, that undoes the fault right after recording. This is how the
        project's own tests prove an invariant can fail: they make the kernel show a
        wrong value through the debugger."""
        if stage not in STAGES:
            raise ValueError(f"no stage {stage!r}: one of {', '.join(STAGES)}")
        self.faults.setdefault(stage, []).append(fault)

    def payload(self, name: str, *argv: str, nr: int | str, args: Mapping[int, int] | None = None,
                timeout: float | None = None) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made at the payload's `sirl_syscall_insn`."""
        program = self.guest.payload(name)
        command = " ".join([program.guest_path, *argv])
        return self.trace(command, SyscallSelector(syscall_number(nr), dict(args or {})),
                          user_address=program.symbol("sirl_syscall_insn"), timeout=timeout)

    def command(self, command: str, *, nr: int | str, args: Mapping[int, int] | None = None,
                timeout: float | None = None) -> SyscallTrace:
        """Trace syscall *nr* (with *args*) made by a shell command; starts at entry_SYSCALL_64."""
        return self.trace(command, SyscallSelector(syscall_number(nr), dict(args or {})), timeout=timeout)

    @property
    def entry_code(self) -> EntryCode:
        """entry_SYSCALL_64 disassembled from the guest's memory (boot-time alternatives
        patch it), once per vmlinux and machine configuration in this process: the
        disassembly costs GDB about 14 ms, and every guest of one configuration runs the
        same patched code (tests patch data, never kernel text)."""
        key = (self.kernel.vmlinux.path, replace(self.guest.machine.config, incoming=None))
        if key not in _ENTRY_CODES:
            entry = self.kernel.vmlinux.symbol("entry_SYSCALL_64")
            _ENTRY_CODES[key] = EntryCode.find(entry, self.gdb.disassemble("entry_SYSCALL_64"))
        return _ENTRY_CODES[key]

    def handler_for(self, nr: int) -> str:
        """The handler symbol sys_call_table[nr] points at in the vmlinux image, or "" if nr
        is beyond the table (its ELF size) or its slot holds no __x64_sys_ handler."""
        vmlinux = self.kernel.vmlinux
        if not 0 <= nr < vmlinux.symbol_size("sys_call_table") // 8:
            return ""
        pointer = int.from_bytes(vmlinux.read(vmlinux.symbol("sys_call_table") + 8 * nr, 8), "little")
        names = [name for name in vmlinux.names_at(pointer) if name.startswith("__x64_sys_")]
        return names[0] if names else ""

    def trace(self, command: str, selector: SyscallSelector, user_address: int | None = None,
              timeout: float | None = None) -> SyscallTrace:
        """Run *command* in the guest and trace the syscall *selector* picks.

        *user_address* is the user `syscall` instruction (a payload's `sirl_syscall_insn`);
        without it the trace starts at entry_SYSCALL_64 and the user stage is not taken.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        result = SyscallTrace(command, selector, self.handler_for(selector.nr) or NO_HANDLER)
        self.traces.append(result)
        pending: PendingCommand | None = None
        try:
            self._arm_first(selector, user_address)
            pending = self.console.start(command)
            _Run(self, result, deadline).walk(user_address is not None)
        finally:
            self.gdb.delete_breakpoints()
        if pending is not None:
            with self.guest.running():
                result.output = pending.wait(max(1.0, deadline - time.monotonic())).output
        return result

    def _arm_first(self, selector: SyscallSelector, user_address: int | None) -> None:
        self.gdb.delete_breakpoints()
        if user_address is not None:
            # Hardware: under KVM a software breakpoint would patch whichever process is mapped.
            self.gdb.break_insert(f"*{user_address:#x}", condition=selector.condition(), hardware=True)
        else:
            self.gdb.break_insert(f"*{self.entry_code.entry:#x}", condition=selector.condition())


class _Run:
    """One walk down the path; each method takes one stage."""

    def __init__(self, tracer: SyscallTracer, trace: SyscallTrace, deadline: float) -> None:
        self.t = tracer
        self.gdb = tracer.gdb
        self.trace = trace
        self.deadline = deadline

    def left(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TraceError(f"trace did not finish in time; so far:\n{self.trace}")
        return remaining

    def record(self, name: str, note: str = "", pt_regs_at: int | None = None, backtrace: bool = False) -> Stage:
        undo = [fault(self.gdb) for fault in self.t.faults.get(name, ())]
        regs = self.gdb.registers(TRACE_REGISTERS)
        pt_regs = None
        if pt_regs_at is not None:
            pt_regs = self.read_pt_regs(pt_regs_at)
        frames = tuple(f.function or f"{f.address:#x}" for f in self.gdb.backtrace()) if backtrace else ()
        for action in undo:
            if action is not None:
                action()
        stage = Stage(name, True, regs, pt_regs, note=note, backtrace=frames)
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
        return f"*{self.t.kernel.vmlinux.symbol(symbol):#x}"

    def stop(self) -> StopEvent:
        return self.gdb.continue_until_stop(timeout=self.left())

    def walk(self, from_user: bool) -> None:
        code = self.t.entry_code
        self.stop()
        if from_user:
            self.step_off(self.record("user")["rip"])
        else:
            self.skip("user", "no user address given (trace started at entry_SYSCALL_64)")
        user = self.trace.stages.get("user")
        self.step_past(self.record("entry")["rip"], code.entry_swapgs, "after_swapgs")
        self.gdb.delete_breakpoints()
        regs_ptr = self.kernel_stages()
        self.exit_stages(regs_ptr, user)

    def step_off(self, address: int) -> None:
        """Execute the instruction at *address* (a `syscall`, a `swapgs`, a `sysretq`: none
        stays put). Once, under load, a step from the user breakpoint came back with the PC
        unchanged and the `syscall` not executed (QEMU 7.2, GDB 13); a step that went
        nowhere is taken again, with a warning in the log."""
        for attempt in range(1, MAX_STEP_ATTEMPTS + 1):
            stop = self.gdb.stepi(timeout=self.left())
            if stop.address != address:
                return
            log.warning("stepi at %#x reported no progress (attempt %d): %s", address, attempt, stop)
        raise TraceError(f"the instruction at {address:#x} did not execute in {MAX_STEP_ATTEMPTS} steps; "
                         f"so far:\n{self.trace}")

    def step_past(self, rip: int | None, address: int, name: str) -> None:
        """Step from *rip* until the instruction at *address* has executed, then record *name*."""
        for _ in range(MAX_SWAPGS_STEPS):
            if rip == address:
                self.step_off(address)
                self.record(name)
                return
            rip = self.gdb.stepi(timeout=self.left()).address
        self.skip(name, f"swapgs at {address:#x} not reached in {MAX_SWAPGS_STEPS} steps")

    def kernel_stages(self) -> int:
        regs_reg, nr_reg = x86.do_syscall_64_args(self.t.kernel.version_tuple)
        self.gdb.break_insert(self.at("do_syscall_64"), condition=f"${nr_reg} == {self.trace.selector.nr:#x}")
        self.stop()
        regs_ptr = self.gdb.registers([regs_reg])[regs_reg]
        self.record("do_syscall_64", note=f"regs={regs_ptr:#x}, nr in ${nr_reg}", pt_regs_at=regs_ptr)
        self.gdb.delete_breakpoints()
        handler = self.trace.handler
        if handler == NO_HANDLER:
            for name in ("handler", "ksys", "handler_return"):
                self.skip(name, f"sys_call_table has no handler for nr {self.trace.selector.nr}")
            return regs_ptr
        self.gdb.break_insert(self.at(handler), condition=f"$rdi == {regs_ptr:#x}")
        self.stop()
        self.record("handler", backtrace=True)
        self.gdb.delete_breakpoints()
        self.handler_tail(handler, regs_ptr)
        return regs_ptr

    def handler_tail(self, handler: str, regs_ptr: int) -> None:
        """ksys_<name> (if the handler calls it) and the handler's return."""
        sp = self.trace.stages["handler"]["rsp"]
        ret = int.from_bytes(self.gdb.read_memory(sp, 8), "little")
        # The return lands right after the call, with the return address popped.
        return_bp = self.gdb.break_insert(f"*{ret:#x}", condition=f"$rsp == {sp + 8:#x}").number
        ksys = "ksys_" + handler.removeprefix("__x64_sys_")
        ksys_bp = None
        if self.t.kernel.vmlinux.has_symbol(ksys):
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

    def exit_stages(self, regs_ptr: int, user: Stage | None) -> None:
        code = self.t.entry_code
        # Where the kernel will return to, as pt_regs holds it now (not as recorded earlier).
        pt = self.read_pt_regs(regs_ptr)
        user_rip, user_sp = pt["ip"], pt["sp"]
        back = f"$rip == {user_rip:#x} && $rsp == {user_sp:#x} && ($cs & 3) == 3"
        numbers = {"user_return": self.gdb.break_insert(f"*{user_rip:#x}", condition=back, hardware=True).number}
        if code.exit_swapgs is not None:
            cond = f"$rcx == {user_rip:#x} && $rsp == {user_sp:#x}"
            numbers["exit_swapgs"] = self.gdb.break_insert(f"*{code.exit_swapgs:#x}", condition=cond).number
        if code.sysretq is not None:
            cond = f"$rcx == {user_rip:#x} && $rsp == {user_sp:#x}"
            numbers["sysretq"] = self.gdb.break_insert(f"*{code.sysretq:#x}", condition=cond).number
        self.follow_exit(numbers)

    def follow_exit(self, numbers: dict[str, int]) -> None:
        by_number = {n: name for name, n in numbers.items()}
        while "user_return" not in self.trace.stages:
            stop = self.stop()
            name = by_number.get(stop.breakpoint or -1)
            if name is None:
                raise TraceError(f"unexpected stop {stop.reason} at {stop.address:#x}; so far:\n{self.trace}")
            if name == "exit_swapgs":
                self.record(name, note="before the exit swapgs")
            elif name == "sysretq":
                self.step_off(self.record(name)["rip"])
                self.record("user_return", note="one instruction after sysretq")
            else:
                self.record("user_return", note="returned to user mode without sysretq (IRET exit?)")
            self.gdb.delete_breakpoint(numbers[name])
        for name in ("exit_swapgs", "sysretq"):
            if name not in self.trace.stages:
                self.skip(name, "the kernel left by another exit path (IRET)")

"""SyscallTrace: the register state of one syscall at every stage of its road; on x86_64:

    user instruction -> entry (-> swapgs) -> C entry(pt_regs) -> handler [-> ksys_<name>]
        -> return -> exit: SYSRET (exit swapgs, sysretq/sysretl) or IRET (iret path, iretq) -> user

What a trace holds (this module) is apart from how it is taken (tracer.py, walk.py): the
roads and their stages are described by the architecture (arch/, x86_64/ today), and a
trace knows its stages through its road. No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..arch.base import SummaryField, TaskInfo
from ..arch.roads import Abi, Road
from ..core.errors import SyscallIrlError

NO_HANDLER = "no handler"  # SyscallTrace.handler when the kernel has none for the number


class TraceError(SyscallIrlError):
    """The trace could not be taken (not: an invariant failed)."""


class StageNotRecorded(TraceError, KeyError):
    """`trace[name]` of a stage the trace holds no record of: one its road does not have,
    or one on the road the walk never reached. A KeyError, as a mapping's missing key is,
    whose message names the road's stages (SyscallIrlError's str, not KeyError's repr)."""


def stage_names(road: Road) -> str:
    """The stages of *road* in its order, as a reader needs them: the C entry's candidates
    (one per kernel) as one stage, "A or B"."""
    names, dispatch = list(road.stages), road.dispatch_symbols
    at = names.index(dispatch[0])
    names[at:at + len(dispatch)] = [" or ".join(dispatch)]
    return ", ".join(names)


# GDB's reads of a string, widest first: none may pass its NUL (the next page may be unmapped).
_READS = ((8, "unsigned long"), (4, "unsigned int"), (2, "unsigned short"), (1, "unsigned char"))


def points_to(pointer: str, text: str) -> str:
    """A GDB condition true when *pointer* (an expression) points to *text* and its NUL, read
    in the address space loaded (a user pointer, at the kernel entry or in user mode)."""
    data, at, terms = text.encode() + b"\0", 0, []
    for width, c_type in _READS:
        while len(data) - at >= width:
            terms.append(f"*({c_type} *)({pointer} + {at}) == {int.from_bytes(data[at:at + width], 'little'):#x}")
            at += width
    return " && ".join(terms)


@dataclass(frozen=True)
class SyscallSelector:
    """Which syscall to trace: its number, argument values (by index 0..5) in the road's
    ABI, and the process that makes it (comm and/or pid). An argument given as a str is a
    pointer to that NUL-terminated string (execve's path: no DWARF needed). The guest's
    command agent (PID 1) is never selected unless *agent* is true."""

    nr: int
    args: Mapping[int, int | str] = field(default_factory=dict)
    comm: str | None = None
    pid: int | None = None
    agent: bool = False

    def register_condition(self, abi: Abi) -> str:
        """A GDB condition true at the selected syscall's user registers in *abi*."""
        bits, mask = abi.bits, (1 << abi.bits) - 1

        def value(register: str) -> str:
            # In compatibility mode only the low half of a register is the program's.
            return f"${register}" if bits == 64 else f"(${register} & {mask:#x})"

        terms = [f"{value(abi.number_register)} == {self.nr & mask:#x}"]
        terms += [f"{value(abi.arg_registers[i])} == {v & mask:#x}" if isinstance(v, int)
                  else points_to(value(abi.arg_registers[i]), v) for i, v in sorted(self.args.items())]
        return " && ".join(terms)

    def __str__(self) -> str:
        parts = [f"nr={self.nr}"]
        parts += [f"arg{i}={v:#x}" if isinstance(v, int) else f"arg{i}={v!r}" for i, v in sorted(self.args.items())]
        parts += [f"comm={self.comm!r}"] if self.comm is not None else []
        parts += [f"pid={self.pid}"] if self.pid is not None else []
        return " ".join(parts)


@dataclass(frozen=True)
class Stage:
    """One stage of the path: where the CPU was and what it held, or why it was not seen.

    `pt_regs` is the decoded struct pt_regs (at the C entry), `frame` what a return path's
    instruction is about to pop (x86's iretq: ip, cs, flags, sp, ss), `backtrace` the
    call stack (at the handler). `summary` is the architecture's choice of the registers
    `line()` shows (all of them, by name, without one)."""

    name: str
    taken: bool
    registers: Mapping[str, int] = field(default_factory=dict)
    pt_regs: Mapping[str, int] | None = None
    note: str = ""
    backtrace: tuple[str, ...] = ()
    frame: Mapping[str, int] | None = None
    summary: tuple[SummaryField, ...] = field(default=(), compare=False, repr=False)

    def __getitem__(self, register: str) -> int:
        if not self.taken:
            raise KeyError(f"stage {self.name} was not taken: {self.note}")
        return self.registers[register]

    def line(self) -> str:
        if not self.taken:
            return f"{self.name:<19} not taken: {self.note}"
        shown = self.summary or tuple((name, name, "#x") for name in self.registers)
        text = f"{self.name:<19} " + " ".join(f"{label}={self.registers[register]:{spec}}"
                                                for label, register, spec in shown)
        if self.frame is not None:
            text += "  frame: " + " ".join(f"{k}={v:#x}" for k, v in self.frame.items())
        return text + (f"  [{self.note}]" if self.note else "")


@dataclass
class SyscallTrace:
    """Every stage of one syscall, printable as a whole so a failure shows the path.

    `road` is the way in (roads.py), `entry` the kernel symbol the CPU entered at,
    `exit` the way out it took ("sysretq", "sysretl", "iret"; "" if it was not seen),
    `handler` the handler the kernel's table (or the syscall's name) designates,
    `table_handler` what the kernel's table held at run time ("" without a table),
    `task` the process followed (with DWARF), `output`/`status` the command's."""

    command: str
    selector: SyscallSelector
    road: Road
    handler: str
    stages: dict[str, Stage] = field(default_factory=dict)
    entry: str = ""
    exit: str = ""
    table_handler: str = ""
    task: TaskInfo | None = None
    output: str | None = None
    status: int | None = None

    def __getitem__(self, name: str) -> Stage:
        __tracebackhide__ = True  # the lookup's frame is noise: its message says what is missing
        try:
            return self.stages[name]
        except KeyError:
            raise StageNotRecorded(self._missing(name)) from None

    def _missing(self, name: str) -> str:
        road = self.road
        if name not in road.stages:
            not_taken = [stage for stage in self.stages.values() if not stage.taken]
            example = (f"trace[{not_taken[0].name!r}].note == {not_taken[0].note!r}" if not_taken
                       else "this trace took every stage it recorded")
            return (f"stage {name!r} is not on the {road.name} road (its stages: {stage_names(road)}); "
                    f"a stage of the road not taken is in the trace and says why in its note ({example})")
        if name in road.dispatch_symbols and self._dispatch_name():
            why = f"this kernel's C entry is {self._dispatch_name()} (trace.dispatch)"
        else:
            why = f"the walk ended before it, at {next(reversed(self.stages), 'no stage')}"
        return (f"stage {name!r} of the {road.name} road was not recorded: {why}; "
                f"recorded: {', '.join(self.stages) or 'nothing'}")

    def _dispatch_name(self) -> str:
        """The name of the C entry's stage in this trace ("" if not recorded)."""
        return next((name for name in self.road.dispatch_symbols if name in self.stages), "")

    def __contains__(self, name: object) -> bool:
        return name in self.stages

    @property
    def dispatch(self) -> Stage:
        """The stage at the C entry that took pt_regs (do_syscall_64, do_int80_emulation, ...)."""
        __tracebackhide__ = True
        name = self._dispatch_name()
        if not name:
            raise StageNotRecorded(f"the trace has no C entry stage; so far:\n{self}")
        return self.stages[name]

    def taken(self, names: tuple[str, ...] | None = None) -> list[Stage]:
        """The stages among *names* (all of the road's) the kernel took, in the order given."""
        return [self.stages[name] for name in (self.road.stages if names is None else names)
                if name in self.stages and self.stages[name].taken]

    def __str__(self) -> str:
        who = f" by {self.task}" if self.task is not None else ""
        head = (f"syscall trace of {self.road.abi.name} nr={self.selector.nr} ({self.handler}) by "
                f"{self.road.mnemonic}{who} in `{self.command}`: entry {self.entry or '?'}, exit {self.exit or '?'}")
        if self.table_handler and self.table_handler != self.handler:
            head += f"; the table held {self.table_handler}"
        body = [self.stages[name].line() for name in self.road.stages if name in self.stages]
        if any(name in self.stages for name in self.road.dispatch_symbols):
            regs = self.dispatch.pt_regs
            if regs:
                body.append(f"pt_regs at {self.dispatch.name}: " + " ".join(f"{k}={v:#x}" for k, v in regs.items()))
        handler = self.stages.get("handler")
        if handler is not None and handler.backtrace:
            body.append("backtrace at the handler: " + " <- ".join(handler.backtrace))
        if self.status is not None:
            body.append(f"the command exited with status {self.status}")
        return "\n".join([head, *("  " + line for line in body)])

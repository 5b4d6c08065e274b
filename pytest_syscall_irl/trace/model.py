"""SyscallTrace: the register state of one syscall at every stage of its road.

    user instruction -> entry (-> swapgs) -> C entry(pt_regs) -> handler [-> ksys_<name>]
        -> return -> exit: SYSRET (exit swapgs, sysretq/sysretl) or IRET (iret path, iretq) -> user

What a trace holds (this module) is apart from how it is taken (tracer.py): the roads
themselves are described in roads.py. No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..arch.x86_64 import facts as x86
from ..core.errors import SyscallIrlError
from ..arch.x86_64.roads import Road
from ..arch.x86_64.tasks import TaskInfo

USER_STAGES = ("user", "user_return")
ENTRY_STAGES = ("entry", "after_swapgs")
HANDLER_STAGES = ("handler", "ksys", "handler_return", "dispatch_return")
EXIT_STAGES = ("exit_swapgs", "sysretq", "sysretl", "iret_path", "iretq")
# The C entries that take pt_regs, by road (roads.py); a trace names its stage after the one it met.
DISPATCH_STAGES = ("do_syscall_64", "do_int80_emulation", "do_int80_syscall_32", "do_SYSENTER_32",
                   "do_fast_syscall_32")
KERNEL_STAGES = (*ENTRY_STAGES, *DISPATCH_STAGES, *HANDLER_STAGES, *EXIT_STAGES)
STAGES = ("user", *KERNEL_STAGES, "user_return")
# Registers recorded at every stage (one MI round trip).
TRACE_REGISTERS = ("rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                   "r12", "r13", "r14", "r15", "eflags", "cs", "ss", "fs_base", "gs_base", "k_gs_base", "cr3", "cr4")
NO_HANDLER = "no handler"  # SyscallTrace.handler when the kernel has none for the number


class TraceError(SyscallIrlError):
    """The trace could not be taken (not: an invariant failed)."""


@dataclass(frozen=True)
class SyscallSelector:
    """Which syscall to trace: its number, argument values (by index 0..5) in the road's
    ABI, and the process that makes it (comm and/or pid). The guest's command agent
    (PID 1) is never selected unless *agent* is true."""

    nr: int
    args: Mapping[int, int] = field(default_factory=dict)
    comm: str | None = None
    pid: int | None = None
    agent: bool = False

    def register_condition(self, arg_registers: tuple[str, ...] = x86.SYSCALL_ARG_REGISTERS, bits: int = 64) -> str:
        """A GDB condition true at the selected syscall's user registers."""
        mask = (1 << bits) - 1

        def value(register: str) -> str:
            # In compatibility mode only the low half of a register is the program's.
            return f"${register}" if bits == 64 else f"(${register} & {mask:#x})"

        terms = [f"{value('rax')} == {self.nr & mask:#x}"]
        terms += [f"{value(arg_registers[i])} == {v & mask:#x}" for i, v in sorted(self.args.items())]
        return " && ".join(terms)

    def __str__(self) -> str:
        parts = [f"nr={self.nr}"]
        parts += [f"arg{i}={v:#x}" for i, v in sorted(self.args.items())]
        parts += [f"comm={self.comm!r}"] if self.comm is not None else []
        parts += [f"pid={self.pid}"] if self.pid is not None else []
        return " ".join(parts)


@dataclass(frozen=True)
class Stage:
    """One stage of the path: where the CPU was and what it held, or why it was not seen.

    `pt_regs` is the decoded struct pt_regs (at the C entry), `frame` the IRET frame
    about to be popped (at iretq: ip, cs, flags, sp, ss), `backtrace` the call stack
    (at the handler)."""

    name: str
    taken: bool
    registers: Mapping[str, int] = field(default_factory=dict)
    pt_regs: Mapping[str, int] | None = None
    note: str = ""
    backtrace: tuple[str, ...] = ()
    frame: Mapping[str, int] | None = None

    def __getitem__(self, register: str) -> int:
        if not self.taken:
            raise KeyError(f"stage {self.name} was not taken: {self.note}")
        return self.registers[register]

    def line(self) -> str:
        if not self.taken:
            return f"{self.name:<19} not taken: {self.note}"
        r = self.registers
        text = (f"{self.name:<19} rip={r['rip']:#018x} cs={r['cs']:#04x} ss={r['ss']:#04x} "
                f"rflags={r['eflags']:#08x} rax={r['rax']:#x} rcx={r['rcx']:#x} r11={r['r11']:#x} "
                f"rsp={r['rsp']:#x} gs_base={r['gs_base']:#x} k_gs_base={r['k_gs_base']:#x} cr3={r['cr3']:#x}")
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
        return self.stages[name]

    def __contains__(self, name: object) -> bool:
        return name in self.stages

    @property
    def dispatch(self) -> Stage:
        """The stage at the C entry that took pt_regs (do_syscall_64, do_int80_emulation, ...)."""
        for name in DISPATCH_STAGES:
            if name in self.stages:
                return self.stages[name]
        raise KeyError(f"the trace has no C entry stage; so far:\n{self}")

    def taken(self, names: tuple[str, ...] = STAGES) -> list[Stage]:
        """The stages among *names* the kernel took, in the order of the road."""
        return [self.stages[name] for name in names if name in self.stages and self.stages[name].taken]

    def __str__(self) -> str:
        who = f" by {self.task}" if self.task is not None else ""
        head = (f"syscall trace of {self.road.abi.name} nr={self.selector.nr} ({self.handler}) by "
                f"{self.road.mnemonic}{who} in `{self.command}`: entry {self.entry or '?'}, exit {self.exit or '?'}")
        if self.table_handler and self.table_handler != self.handler:
            head += f"; the table held {self.table_handler}"
        body = [self.stages[name].line() for name in STAGES if name in self.stages]
        if any(name in self.stages for name in DISPATCH_STAGES):
            regs = self.dispatch.pt_regs
            if regs:
                body.append(f"pt_regs at {self.dispatch.name}: " + " ".join(f"{k}={v:#x}" for k, v in regs.items()))
        handler = self.stages.get("handler")
        if handler is not None and handler.backtrace:
            body.append("backtrace at the handler: " + " <- ".join(handler.backtrace))
        if self.status is not None:
            body.append(f"the command exited with status {self.status}")
        return "\n".join([head, *("  " + line for line in body)])

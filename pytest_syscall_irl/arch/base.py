"""What an architecture tells the tracer: its roads, the registers a trace records, the
frame the kernel saves them in, where its entry code switches state, how to read the
running task, and the GDB conditions that pin a breakpoint to one syscall.

The walker (trace/walk.py) follows any architecture through `Architecture`; one folder
beside this module fills it in (x86_64/ today, as `pytest_syscall_irl.arch.x86_64.X86_64`),
and the faces (plugin, cli) choose which. Nothing here knows an instruction, a register
name or a symbol of one architecture. No pytest here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .registers import RegisterFile
from .roads import HANDLER_STAGES, USER_STAGES, Exit, Road, SymbolTable
from .survey import Survey

# How a stage's one-line summary shows a register: (label, register, format spec).
SummaryField = tuple[str, str, str]


class MemoryReader(Protocol):
    """What reads guest memory in the stopped target (GdbSession has this)."""

    def read_memory(self, address: int, size: int, timeout: float = ...) -> bytes: ...


class TargetReader(MemoryReader, Protocol):
    """What reads registers and memory in the stopped target (GdbSession has this)."""

    def registers(self, names: Sequence[str] | None = None, timeout: float = ...) -> dict[str, int]: ...


class Evaluator(Protocol):
    """What reads an expression in the stopped target (GdbSession has this)."""

    def evaluate(self, expression: str, timeout: float = ...) -> str: ...


class Disassembled(Protocol):
    """One disassembled instruction (machine.mi_records.Instruction is one)."""

    @property
    def address(self) -> int: ...
    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class TaskInfo:
    """Who was running: the task_struct pointer, its pid (thread id) and comm."""

    address: int
    pid: int
    comm: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm})"


@dataclass(frozen=True)
class ProcessConditions:
    """GDB conditions true only while one process runs: `here` at the location it was
    stopped at, `exiting` at the kernel's process exit (do_exit, in kernel state)."""

    here: str
    exiting: str


@dataclass(frozen=True)
class EntryCode:
    """Addresses in an entry function, found by disassembly (boot-time alternatives patch
    the code, so no fixed label or offset is trusted): the entry, its switch to kernel
    state, and the switch back and return instruction of an exit inside it (None: absent)."""

    entry: int
    entry_switch: int | None
    exit_switch: int | None
    exit_instruction: int | None


@dataclass(frozen=True)
class SavedRegisters:
    """The frame the kernel saves the user registers in (Linux's `struct pt_regs`): its C
    type, its fields and their known offsets; every field one little-endian word."""

    c_type: str
    offsets: Mapping[str, int]
    word: int = 8

    def size(self, layout: Mapping[str, int]) -> int:
        """Bytes to read for a frame with *layout* (field -> offset)."""
        return max(layout.values()) + self.word

    def decode(self, data: bytes, layout: Mapping[str, int]) -> dict[str, int]:
        """The frame's fields from its raw bytes."""
        need = self.size(layout)
        if len(data) < need:
            raise ValueError(f"{self.c_type} needs {need} bytes, got {len(data)}")
        return {name: int.from_bytes(data[off:off + self.word], "little") for name, off in layout.items()}


@dataclass(frozen=True)
class StageNames:
    """Every stage a trace on an architecture may record, in groups, in the order of the path."""

    entry: tuple[str, ...]
    dispatch: tuple[str, ...]
    exit: tuple[str, ...]
    user: tuple[str, ...] = USER_STAGES
    handler: tuple[str, ...] = HANDLER_STAGES

    @classmethod
    def of(cls, roads: Sequence[Road], exits: Sequence[Exit]) -> StageNames:
        """The stages of *roads*; the exit stages in the order of *exits*, which must hold
        every road's exits (the order a reader expects is the architecture's to give)."""
        missing = [way.name for road in roads for way in road.exits if way not in exits]
        if missing:
            raise ValueError(f"exits {missing} of the roads are not among {[way.name for way in exits]}")
        return cls(entry=tuple(dict.fromkeys(s for road in roads for s in road.entry_stages)),
                   dispatch=tuple(dict.fromkeys(s for road in roads for s in road.dispatch_symbols)),
                   exit=tuple(dict.fromkeys(s for way in exits for s in way.stages)))

    @property
    def kernel(self) -> tuple[str, ...]:
        return (*self.entry, *self.dispatch, *self.handler, *self.exit)

    @property
    def all(self) -> tuple[str, ...]:
        return (self.user[0], *self.kernel, self.user[1])


class CurrentTask(Protocol):
    """How the debugger finds the running task (`current`) of this architecture's kernels.
    *switched*: the entry code has switched to kernel state (x86: after the entry swapgs)."""

    def slot(self, vmlinux: SymbolTable, switched: bool) -> tuple[str, int]:
        """(the register holding the per-CPU base, the offset of the task pointer from it)."""
        ...

    def is_running(self, vmlinux: SymbolTable, task: int) -> str:
        """A GDB condition true while *task* runs, after the entry's switch (no DWARF needed)."""
        ...

    def condition(self, vmlinux: SymbolTable, *, pid: int | None = None, comm: str | None = None,
                  exclude_pids: tuple[int, ...] = ()) -> str:
        """A GDB condition on the running task before the entry's switch (needs DWARF)."""
        ...

    def read(self, gdb: Evaluator, vmlinux: SymbolTable) -> TaskInfo:
        """The running task after the entry's switch, through DWARF types."""
        ...

    def holds_code(self, address: int, code: bytes) -> str:
        """A GDB condition true where the address space loaded holds *code* at *address*
        (a static program's code at its fixed address: which program runs, no DWARF needed)."""
        ...

    def same_process(self, target: TargetReader, vmlinux: SymbolTable) -> ProcessConditions:
        """Conditions true, at the location the target is stopped at now and where the process
        exits, only while the process running now runs (no DWARF needed)."""
        ...


class Architecture(Protocol):
    """One architecture as the tracer follows it (see the module docstring)."""

    @property
    def name(self) -> str: ...
    @property
    def roads(self) -> Mapping[str, Road]: ...
    @property
    def default_road(self) -> str:
        """The road a shell command's syscall is traced on when none is named."""
        ...
    @property
    def stages(self) -> StageNames: ...
    @property
    def trace_registers(self) -> tuple[str, ...]:
        """The registers recorded at every stage (one debugger round trip)."""
        ...
    @property
    def summary(self) -> tuple[SummaryField, ...]:
        """The registers a stage's one-line summary shows, in order."""
        ...
    @property
    def pc(self) -> str:
        """The program counter's register name."""
        ...
    @property
    def register_file(self) -> RegisterFile:
        """The views of the registers (x86's eax, ax, al...) derived from the full registers."""
        ...
    @property
    def pt_regs(self) -> SavedRegisters: ...
    @property
    def kernel_arg_registers(self) -> tuple[str, ...]:
        """The kernel's C calling convention: arguments 0.. of a function at its first instruction."""
        ...
    @property
    def entry_switch(self) -> str:
        """The instruction the entry code switches to kernel state with, for messages."""
        ...
    @property
    def current(self) -> CurrentTask: ...
    @property
    def survey(self) -> Survey:
        """What `syscall-irl diff` takes on a kernel: the roads, the facts, the per-boot values (arch/survey.py)."""
        ...

    def find_entry_code(self, entry: int, instructions: Sequence[Disassembled]) -> EntryCode:
        """The entry's switch, and an exit's switch and return instruction, in its disassembly."""
        ...

    def entry_address(self, road: Road, vmlinux: SymbolTable, memory: MemoryReader) -> int:
        """Where the CPU enters for *road* (read from guest memory where the CPU reads it)."""
        ...

    def dispatch_regs_register(self, symbol: str, version: tuple[int, int, int]) -> str:
        """The register holding the pt_regs pointer at the C entry *symbol*'s first instruction."""
        ...

    def dispatch_number_condition(self, register: str, layout: Mapping[str, int], nr: int) -> str:
        """A GDB condition true when the pt_regs in *register* are those of syscall *nr*."""
        ...

    def return_breakpoint(self, memory: MemoryReader, registers: Mapping[str, int]) -> tuple[int, str]:
        """At a function's first instruction: where it returns to, and a condition true
        there only once this call has returned."""
        ...

    def same_stack_condition(self, address: int) -> str:
        """A GDB condition true while the CPU runs on the kernel stack holding *address*."""
        ...

    def user_return(self, pt_regs: Mapping[str, int]) -> tuple[int, str]:
        """Where user mode resumes after the syscall with *pt_regs*, and a condition true there."""
        ...

    def in_code_exit_condition(self, pt_regs: Mapping[str, int]) -> str:
        """A condition true at an in-code exit's stages when it returns to *pt_regs*."""
        ...

    def path_exit_condition(self, regs_ptr: int) -> str:
        """A condition true where a return path begins with the pt_regs at *regs_ptr*."""
        ...

    def path_return_condition(self, pt_regs: Mapping[str, int]) -> str:
        """A condition true at a return path's instruction when it returns to *pt_regs*."""
        ...

    def exit_frame(self, memory: MemoryReader, registers: Mapping[str, int]) -> dict[str, int]:
        """What a return path's instruction pops, at its stop with *registers*."""
        ...

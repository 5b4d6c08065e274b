"""What an architecture tells `syscall-irl diff` (trace/survey.py): the roads to trace and how
the suite's payloads take them, the facts to read (in the guest, in guest memory, the syscall
tables), and which values mean nothing to compare: registers that are per boot or whatever a C
function left in them (`LeftOut`), and kernel address regions whose contents are per boot
(`Region`).

Plain data: one folder beside this module fills it in (x86_64/survey.py), and the
architecture hands it out as `Architecture.survey`. Nothing here knows a register, an MSR or a
symbol of one architecture. No pytest here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .roads import Abi


@dataclass(frozen=True)
class SurveyRoad:
    """One road as the suite's payloads take it: the payload, its arguments, the syscall it
    makes and the arguments a trace selects it by.

    The payload runs as `PAYLOAD *mode [NUMBER] *argv`: NUMBER is *nr*'s number in the ABI
    *number_in* where the payload takes the number as an argument (None: it makes *nr*
    itself). A kernel without the symbol *needs* has no such road (*lacking* says why)."""

    name: str
    payload: str
    nr: str
    args: Mapping[int, int]  # syscall argument index -> the value the trace selects on
    mode: tuple[str, ...] = ()
    number_in: Abi | None = None
    argv: tuple[str, ...] = ()
    at: str = "sirl_syscall_insn"  # the payload's label at the syscall instruction
    cpu: str | None = None  # the guest's CPU model (None: QEMU's default)
    needs: str | None = None
    lacking: str = ""


@dataclass(frozen=True)
class GuestReading:
    """A fact read inside the guest by a payload that prints `ARGUMENT VALUE` (VALUE in hex),
    in the guest of CPU model *cpu* (None: QEMU's default)."""

    name: str
    payload: str
    argument: str
    cpu: str | None = None


@dataclass(frozen=True)
class MemoryFact:
    """A fact read from guest memory: *size* bytes at *symbol* + *offset*, decoded into a
    value that reads as an address and the details beside it."""

    name: str
    symbol: str
    offset: int
    size: int
    decode: Callable[[bytes], tuple[int, str]]


@dataclass(frozen=True)
class PerCpuField:
    """A guest reading that means a field of CPU 0's per-CPU data: when the reading *fact*
    equals the word at *symbol* + *offset* in CPU 0's per-CPU area, it reads as *meaning*."""

    fact: str
    symbol: str
    offset: int
    meaning: str


@dataclass(frozen=True)
class Region:
    """Addresses [start, end) whose values are per boot and have no known meaning (the heap):
    compared only as "a pointer into *what*", with the reason."""

    start: int
    end: int
    what: str
    reason: str


@dataclass(frozen=True)
class LeftOut:
    """Registers whose values mean nothing to compare (at *stages*, or at every stage), and why."""

    registers: frozenset[str]
    reason: str
    stages: frozenset[str] = frozenset()  # empty: every stage

    def covers(self, stage: str, register: str) -> bool:
        return register in self.registers and (not self.stages or stage in self.stages)

    @property
    def label(self) -> str:
        where = f" at {', '.join(sorted(self.stages))}" if self.stages else ""
        return ", ".join(sorted(self.registers)) + where


@dataclass(frozen=True)
class Survey:
    """Everything `syscall-irl diff` takes on one kernel of an architecture.

    *frame_size*: the bytes from the pt_regs pointer to the top of the task's stack (at most);
    *stack_size*: the task stack's size, from the kernel's symbol table (name -> address)."""

    roads: tuple[SurveyRoad, ...]
    readings: tuple[GuestReading, ...]
    memory_facts: tuple[MemoryFact, ...]
    tables: tuple[str, ...]  # the syscall tables whose slots are counted
    per_cpu_fields: tuple[PerCpuField, ...]
    left_out: tuple[LeftOut, ...]
    regions: tuple[Region, ...]
    frame_size: int
    stack_size: Callable[[Mapping[str, int]], int]
    word: int = 8  # a table slot's and a per-CPU offset's size in bytes

    def cpus(self) -> list[str | None]:
        """The guests' CPU models, one guest each, in the order of the roads."""
        return list(dict.fromkeys([*(road.cpu for road in self.roads), *(one.cpu for one in self.readings)]))

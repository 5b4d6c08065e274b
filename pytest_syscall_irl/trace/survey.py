"""One kernel's side of `syscall-irl diff`: a guest and a GDB, in it one trace per road of the
architecture's survey (arch/survey.py) as the suite's payloads make them, and the facts the
suite reads; each kept as a record that report/diff.py compares with the other kernel's.

    side = SideTaker(settings, X86_64, log_root, identity).take()

A record holds values as they *mean* something, so that two builds of the same code compare
equal: a kernel address reads as `symbol+0xoff` (`SymbolNames`), a per-boot address whose
meaning is known as `anchor+0xoff` (the trace's pt_regs, the per-CPU area, the current task:
`Anchor`), and any other per-boot value (a heap pointer, a page-table root) as what it is,
left out of the comparison with the reason (the survey's `Region`s and `LeftOut` rules). User
addresses stay raw: both kernels run the same payloads with ASLR off. The raw values are kept
beside the texts, so the report can say how many values differ only in their build-specific
addresses. No pytest here.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..arch.base import Architecture, MemoryReader
from ..arch.roads import SymbolTable, SyscallNames
from ..arch.survey import GuestReading, LeftOut, Region, Survey, SurveyRoad
from ..core.errors import SyscallIrlError

if TYPE_CHECKING:
    from ..kernel.artifacts import Kernel
    from ..lab.guest import Guest
    from ..lab.settings import LabSettings
    from .model import Stage, SyscallTrace
    from .tracer import SyscallTracer

NO_ASLR = "echo 0 > /proc/sys/kernel/randomize_va_space"  # user stacks and the vDSO where the other kernel has them
Values = dict[str, str]


class SymbolNames:
    """Addresses within [low, high) as `symbol+0xoff` of the nearest symbol at or below them
    (aliases at one address: a sized one first, then by name, so two builds pick alike)."""

    def __init__(self, table: Mapping[str, int], low: int, high: int, size_of: Callable[[str], int]) -> None:
        best: dict[int, str] = {}
        for name, address in table.items():
            if low <= address < high:
                known = best.get(address)
                if known is None or (bool(size_of(name)), known) > (bool(size_of(known)), name):
                    best[address] = name
        self._addresses = sorted(best)
        self._names = [best[address] for address in self._addresses]
        self.low, self.high = low, high

    def name(self, address: int) -> str | None:
        """`symbol+0xoff` for *address*, None outside the range or below its first symbol."""
        if not self.low <= address < self.high:
            return None
        at = bisect.bisect_right(self._addresses, address) - 1
        return None if at < 0 else f"{self._names[at]}+{address - self._addresses[at]:#x}"


@dataclass(frozen=True)
class Anchor:
    """A per-boot address whose meaning is known (the trace's pt_regs, the per-CPU area):
    values in [start - below, start + size) read as `name+0xoff` / `name-0xoff`, or through
    *inner* (per-CPU symbols by offset) as `name:symbol+0xoff`."""

    name: str
    start: int
    size: int
    below: int = 0
    inner: SymbolNames | None = None

    def text(self, value: int) -> str | None:
        if not self.start - self.below <= value < self.start + self.size:
            return None
        offset = value - self.start
        inner = self.inner.name(offset) if self.inner is not None and offset >= 0 else None
        if inner is not None:
            return f"{self.name}:{inner}"
        return f"{self.name}+{offset:#x}" if offset >= 0 else f"{self.name}-{-offset:#x}"


@dataclass
class ValueReader:
    """Turns the raw values of one kernel's records into comparable texts; remembers what it
    left out and why (`left_out`: what -> reason)."""

    symbols: SymbolNames
    anchors: Sequence[Anchor] = ()
    regions: Sequence[Region] = ()
    left_out: dict[str, str] = field(default_factory=dict)

    def text(self, value: int) -> str:
        for anchor in self.anchors:
            found = anchor.text(value)
            if found is not None:
                return found
        name = self.symbols.name(value)
        if name is not None:
            return name
        for region in self.regions:
            if region.start <= value < region.end:
                self.left_out[region.what] = region.reason
                return f"({region.what})"
        return f"{value:#x}"

    def with_anchors(self, anchors: Iterable[Anchor]) -> ValueReader:
        """This reader with *anchors* first (a trace's own); it shares `left_out`."""
        return ValueReader(self.symbols, [*anchors, *self.anchors], self.regions, self.left_out)


@dataclass
class Reading:
    """Values as texts (compared) and raw (shown, and counted where only they differ)."""

    texts: Values = field(default_factory=dict)
    raw: Values = field(default_factory=dict)

    def add(self, key: str, value: int, reader: ValueReader, rule: LeftOut | None = None) -> None:
        if rule is not None:
            reader.left_out[rule.label] = rule.reason
            self.texts[key] = "(left out)"
        else:
            self.texts[key] = reader.text(value)
        self.raw[key] = f"{value:#x}"


def stage_record(stage: Stage, reader: ValueReader, rules: Sequence[LeftOut] = ()) -> dict[str, Any]:
    """One stage of a trace as a record: taken or why not, its values (registers, then
    `pt_regs.FIELD`, `frame.FIELD`), the backtrace's function names."""
    if not stage.taken:
        return {"taken": False, "note": stage.note}
    reading = Reading()
    for name, value in stage.registers.items():
        reading.add(name, value, reader, next((rule for rule in rules if rule.covers(stage.name, name)), None))
    for prefix, values in (("pt_regs", stage.pt_regs), ("frame", stage.frame)):
        for name, value in (values or {}).items():
            reading.add(f"{prefix}.{name}", value, reader)
    # Frames GDB could not name are stack words (the int80 entry's pt_regs): not code.
    frames = [frame for frame in stage.backtrace if not frame.startswith("0x")]
    return {"taken": True, "values": reading.texts, "raw": reading.raw, "backtrace": frames}


def trace_record(trace: SyscallTrace, reader: ValueReader, rules: Sequence[LeftOut] = ()) -> dict[str, Any]:
    """A SyscallTrace as a comparable record (the process is named by comm: pids are per boot)."""
    stages = {name: stage_record(stage, reader, rules) for name, stage in trace.stages.items()}
    return {"command": trace.command, "entry": trace.entry, "exit": trace.exit, "handler": trace.handler,
            "table_handler": trace.table_handler, "comm": trace.task.comm if trace.task else "",
            "status": trace.status, "output": trace.output, "stages": stages}


@dataclass
class Side:
    """What one kernel showed: who it is, the facts the suite reads, one record per road
    (or the error that stopped the trace), how long it took."""

    identity: dict[str, str]
    facts: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"text", "raw"}
    roads: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    suite: dict[str, str] = field(default_factory=dict)  # test id -> outcome

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "facts": self.facts, "roads": self.roads, "left_out": self.left_out,
                "seconds": self.seconds, "suite": self.suite}


# --- what is read of one kernel ------------------------------------------------------------


def kernel_reader(kernel: Kernel, survey: Survey) -> ValueReader:
    """Kernel addresses as symbol+offset, per-boot regions as what they are."""
    vmlinux = kernel.vmlinux
    image = SymbolNames(vmlinux.symbols, vmlinux.symbol("_text"), vmlinux.symbol("_end"), vmlinux.symbol_size)
    return ValueReader(image, regions=survey.regions)


def _per_cpu_base(vmlinux: SymbolTable, gdb: MemoryReader, word: int) -> int:
    """Where CPU 0's per-CPU area starts, as an offset from the per-CPU symbols' addresses."""
    return int.from_bytes(gdb.read_memory(vmlinux.symbol("__per_cpu_offset"), word), "little")


def per_cpu_anchor(kernel: Kernel, gdb: MemoryReader, word: int = 8) -> Anchor | None:
    """CPU 0's per-CPU area (its per-CPU symbols by offset), None without SMP's offsets."""
    vmlinux = kernel.vmlinux
    if not all(vmlinux.has_symbol(name) for name in ("__per_cpu_offset", "__per_cpu_start", "__per_cpu_end")):
        return None
    start, end = vmlinux.symbol("__per_cpu_start"), vmlinux.symbol("__per_cpu_end")
    return Anchor("percpu", _per_cpu_base(vmlinux, gdb, word) + start, end - start,
                  inner=SymbolNames(vmlinux.symbols, start, end, vmlinux.symbol_size))


def trace_anchors(trace: SyscallTrace, kernel: Kernel, architecture: Architecture) -> list[Anchor]:
    """The trace's pt_regs (and the task stack below it) and its task_struct."""
    anchors = []
    dispatch = next((trace.stages[name] for name in trace.road.dispatch_symbols if name in trace.stages), None)
    if dispatch is not None and dispatch.taken:
        register = architecture.dispatch_regs_register(dispatch.name, kernel.version_tuple)
        survey = architecture.survey
        anchors.append(Anchor("pt_regs", dispatch.registers[register], survey.frame_size,
                              below=survey.stack_size(kernel.vmlinux.symbols)))
    if trace.task is not None and kernel.vmlinux.has_symbol("init_task"):
        anchors.append(Anchor("current", trace.task.address, kernel.vmlinux.symbol_size("init_task")))
    return anchors


def guest_facts(guest: Guest, readings: Iterable[GuestReading], reader: ValueReader) -> dict[str, dict[str, str]]:
    """Facts read inside the guest by their payloads (the MSRs on x86_64, as the suite's read_msr fixture)."""
    found = {}
    for reading in readings:
        result = guest.run(f"{guest.payload(reading.payload).guest_path} {reading.argument}")
        if result.status != 0:
            found[reading.name] = {"text": f"unreadable (status {result.status}: {result.output.strip()})", "raw": ""}
            continue
        value = int(result.output.split()[1], 16)
        found[reading.name] = {"text": reader.text(value), "raw": f"{value:#x}"}
    return found


def memory_facts(vmlinux: SymbolTable, gdb: MemoryReader, survey: Survey,
                 reader: ValueReader) -> dict[str, dict[str, str]]:
    """The survey's facts in guest memory (x86_64: the IDT gate of vector 0x80) and the syscall tables' slots."""
    found = {}
    for fact in survey.memory_facts:
        if vmlinux.has_symbol(fact.symbol):
            value, details = fact.decode(gdb.read_memory(vmlinux.symbol(fact.symbol) + fact.offset, fact.size))
            found[fact.name] = {"text": f"{reader.text(value)} {details}", "raw": f"{value:#x}"}
    for table in survey.tables:
        slots = str(vmlinux.symbol_size(table) // survey.word) if vmlinux.has_symbol(table) else "absent"
        found[f"{table} slots"] = {"text": slots, "raw": slots}
    return found


def name_per_cpu_fields(vmlinux: SymbolTable, gdb: MemoryReader, survey: Survey,
                        facts: dict[str, dict[str, str]]) -> None:
    """Readings that equal a known field of CPU 0's per-CPU data read as that field (x86_64:
    SYSENTER_ESP is the top of CPU 0's entry stack)."""
    for known in survey.per_cpu_fields:
        raw = facts.get(known.fact, {}).get("raw")
        if not raw or not vmlinux.has_symbol(known.symbol) or not vmlinux.has_symbol("__per_cpu_offset"):
            continue
        address = _per_cpu_base(vmlinux, gdb, survey.word) + vmlinux.symbol(known.symbol) + known.offset
        if int(raw, 16) == int.from_bytes(gdb.read_memory(address, survey.word), "little"):
            facts[known.fact]["text"] = known.meaning


class PayloadTracer(Protocol):
    """What traces a syscall a payload makes (SyscallTracer has this)."""

    def payload(self, name: str, *argv: str, nr: int | str, args: Mapping[int, int | str] | None = ...,
                at: str = ...) -> SyscallTrace: ...


def trace_road(tracer: PayloadTracer, vmlinux: SymbolTable, road: SurveyRoad) -> SyscallTrace:
    """One trace of *road*, as the suite's payload makes it: `PAYLOAD *mode [NUMBER] *argv`."""
    number = [] if road.number_in is None else [str(SyscallNames(vmlinux, road.number_in).number(road.nr))]
    return tracer.payload(road.payload, *road.mode, *number, *road.argv, nr=road.nr, args=road.args, at=road.at)


# --- one kernel's side -----------------------------------------------------------------------


class SideTaker:
    """One kernel's GDB and guests, and the records taken in them (`take`). *say* hears each
    step (a guest starting, a road traced), prefixed with the side's name and release."""

    def __init__(self, settings: LabSettings, architecture: Architecture, log_root: Path, identity: dict[str, str],
                 say: Callable[[str], None] = lambda message: None) -> None:
        from ..lab.debugger import WorkerDebugger
        from ..lab.guest import Lab
        self.kernel, self.architecture, self.survey = settings.kernel, architecture, architecture.survey
        self.say: Callable[[str], None] = lambda message: say(f"{log_root.name} ({self.kernel.release}): {message}")
        self.lab = Lab(settings, log_root)
        self.debugger = WorkerDebugger(self.lab, "diff", register_file=architecture.register_file)
        self.reader = kernel_reader(self.kernel, self.survey)
        self.side = Side(identity, left_out=self.reader.left_out)
        self.seconds = dict.fromkeys(("boot", "traces", "facts"), 0.0)

    def take(self) -> Side:
        """Every road and fact, one guest per CPU model the survey asks for; GDB closed at the end."""
        started = time.monotonic()
        try:
            self.debugger.session()  # GDB loads the symbols while the guest starts
            for cpu in self.survey.cpus():
                self.in_guest(cpu)
        finally:
            self.debugger.close()
        self.side.roads = {road.name: self.side.roads[road.name] for road in self.survey.roads}
        self.side.seconds = {**self.seconds, "total": time.monotonic() - started}
        return self.side

    def in_guest(self, cpu: str | None) -> None:
        """The facts and roads of CPU model *cpu*, in a guest of their own; memory facts in QEMU's default's."""
        from ..lab.variant import GuestVariant
        from .tracer import SyscallTracer
        start = time.monotonic()
        self.say(f"starting a guest (CPU {cpu or 'QEMU default'})")
        guest = self.lab.boot(variant=GuestVariant.of(cpu=cpu))
        self.seconds["boot"] += time.monotonic() - start
        try:
            guest.run(NO_ASLR).check()
            start = time.monotonic()
            facts = guest_facts(guest, [one for one in self.survey.readings if one.cpu == cpu], self.reader)
            self.side.facts.update(facts)
            gdb = self.debugger.attach(guest)
            if cpu is None:
                self.side.facts.update(memory_facts(self.kernel.vmlinux, gdb, self.survey, self.reader))
            name_per_cpu_fields(self.kernel.vmlinux, gdb, self.survey, facts)
            per_cpu = per_cpu_anchor(self.kernel, gdb, self.survey.word)
            self.seconds["facts"] += time.monotonic() - start
            tracer = SyscallTracer(gdb, self.kernel, guest, self.architecture)
            reader = self.reader.with_anchors([per_cpu] if per_cpu else [])
            for road in (road for road in self.survey.roads if road.cpu == cpu):
                self.road(road, tracer, reader)
            self.debugger.release(gdb, guest)
        finally:
            guest.shutdown()

    def road(self, road: SurveyRoad, tracer: SyscallTracer, reader: ValueReader) -> None:
        """The record of *road*, or the error that stopped its trace."""
        if road.needs and not self.kernel.vmlinux.has_symbol(road.needs):
            self.side.roads[road.name] = {"error": road.lacking}
            return
        self.say(f"tracing {road.name}")
        start = time.monotonic()
        try:
            trace = trace_road(tracer, self.kernel.vmlinux, road)
        except SyscallIrlError as exc:
            # What the kernel did (a payload killed, a trace cut short, a guest that died) is part
            # of the comparison; the next roads are tried all the same.
            self.side.roads[road.name] = {"error": f"{type(exc).__name__}: {exc.message.splitlines()[0]}"}
            return
        finally:
            self.seconds["traces"] += time.monotonic() - start
        own = reader.with_anchors(trace_anchors(trace, self.kernel, self.architecture))
        self.side.roads[road.name] = trace_record(trace, own, self.survey.left_out)

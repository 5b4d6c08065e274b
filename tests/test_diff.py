"""`syscall-irl diff`: the comparison on small hand-made traces (symbolization, per-boot values,
a changed stage list, the suite's outcomes, the JSON and HTML), what x86_64's survey holds and
how a side reads it (with a fake symbol table and memory), and the command itself on the
real reference kernel: against itself it finds nothing, against the sysret-never mutant it
names the syscall64 road's exit; a wrong request exits 2 before anything boots."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl.arch.survey import LeftOut, Region
from pytest_syscall_irl.arch.x86_64 import X86_64, roads
from pytest_syscall_irl.report import diff
from pytest_syscall_irl.trace.model import Stage, SyscallSelector, SyscallTrace
from pytest_syscall_irl.trace.survey import (Anchor, Side, SymbolNames, ValueReader, memory_facts, name_per_cpu_fields,
                                             trace_record, trace_road)

ROOT = Path(__file__).resolve().parent.parent
MUTANT_PATCH = ROOT / "tests" / "kernel_mutants" / "sysret-never.patch"
TEXT = 0xFFFFFFFF81000000
# Two builds of the same code: the same functions, the second one 0x1000 further on.
SYMBOLS = {"_text": 0, "entry_SYSCALL_64": 0x400080, "do_syscall_64": 0x23FF70, "ksys_write": 0xE0270,
           "__x64_sys_write": 0xE0300, "alias_without_size": 0x400080, "_end": 0x2000000}
SIZES = {"entry_SYSCALL_64": 0x200, "do_syscall_64": 0x80, "ksys_write": 0x90, "__x64_sys_write": 0x20}
HEAP = Region(0xFFFF888000000000, 0xFFFFC88000000000, "direct-map pointer", "the heap: per boot")
CR3 = LeftOut(frozenset({"cr3"}), "the page-table root: per boot")


def _names(shift: int) -> SymbolNames:
    table = {name: TEXT + address + shift for name, address in SYMBOLS.items()}
    return SymbolNames(table, table["_text"], table["_end"], lambda name: SIZES.get(name, 0))


def _stage(name: str, **registers: int) -> Stage:
    return Stage(name, True, registers)


def _trace(shift: int = 0, stack: int = 0xFFFFC900000BBF58, exit: str = "sysretq", heap: int = 0xFFFF8880004D9840,
           cr3: int = 0x4F8000) -> tuple[SyscallTrace, ValueReader]:
    """A syscall64 trace of write(1, ..., 12) on a build shifted by *shift*, with its pt_regs at *stack*."""
    entry = TEXT + SYMBOLS["entry_SYSCALL_64"] + shift
    trace = SyscallTrace("/payloads/syscall_irl", SyscallSelector(1, {0: 1, 2: 12}), roads.SYSCALL64,
                         "__x64_sys_write", entry="entry_SYSCALL_64", exit=exit)
    trace.stages["user"] = _stage("user", rip=0x40117E, rsp=0x7FFE641C7B10, cr3=cr3)
    trace.stages["entry"] = _stage("entry", rip=entry, rsp=0x7FFE641C7B10, cr3=cr3)
    trace.stages["do_syscall_64"] = Stage("do_syscall_64", True, {"rip": TEXT + 0x23FF72 + shift, "rdi": stack,
                                                                 "rsp": stack - 8, "r11": heap},
                                          pt_regs={"ip": 0x401180, "sp": 0x7FFE641C7B10})
    exits = ("exit_swapgs", "sysretq") if exit == "sysretq" else ("iret_path", "iretq")
    for name in ("exit_swapgs", "sysretq", "iret_path", "iretq"):
        trace.stages[name] = (_stage(name, rip=entry + 0x19B, rsp=0x7FFE641C7B10) if name in exits
                              else Stage(name, False, note=f"the kernel left by {exit}"))
    trace.stages["user_return"] = _stage("user_return", rip=0x401180, rsp=0x7FFE641C7B10)
    reader = ValueReader(_names(shift), regions=[HEAP])
    return trace, reader.with_anchors([Anchor("pt_regs", stack, 168, below=0x4000)])


def _side(**kwargs: Any) -> Side:
    trace, reader = _trace(**kwargs)
    side = Side({"release": "6.1.192", "bzimage": "bzImage"}, left_out=reader.left_out)
    side.roads["syscall64"] = trace_record(trace, reader, [CR3])
    side.facts["LSTAR"] = {"text": reader.text(TEXT + SYMBOLS["entry_SYSCALL_64"] + kwargs.get("shift", 0)),
                           "raw": f"{TEXT + SYMBOLS['entry_SYSCALL_64'] + kwargs.get('shift', 0):#x}"}
    return side


# --- the comparison ----------------------------------------------------------------------------


def test_a_kernel_address_reads_as_symbol_plus_offset() -> None:
    names = _names(0)
    assert names.name(TEXT + 0x23FF72) == "do_syscall_64+0x2"
    # An alias without a size at the same address loses to the sized symbol, in both builds.
    assert names.name(TEXT + 0x400080) == "entry_SYSCALL_64+0x0"
    assert _names(0x1000).name(TEXT + 0x401080) == "entry_SYSCALL_64+0x0"
    assert names.name(0x40117E) is None and names.name(TEXT + 0x2000000) is None


def test_an_anchor_reads_values_around_it() -> None:
    inner = SymbolNames({"runqueues": 0x1E000, "fixed_percpu_data": 0}, 0, 0x20000, lambda name: 8)
    per_cpu = Anchor("percpu", 0xFFFF88800F800000, 0x20000, inner=inner)
    regs = Anchor("pt_regs", 0xFFFFC900000BBF58, 168, below=0x4000)
    assert per_cpu.text(0xFFFF88800F81E040) == "percpu:runqueues+0x40"
    assert regs.text(0xFFFFC900000BBF50) == "pt_regs-0x8" and regs.text(0xFFFFC900000BBFF8) == "pt_regs+0xa0"
    assert regs.text(0xFFFFC900000BC000) is None and regs.text(0xFFFFC900000B7F50) is None


def test_a_heap_pointer_is_compared_as_what_it_is_and_its_reason_kept() -> None:
    reader = ValueReader(_names(0), regions=[HEAP])
    assert reader.text(0xFFFF8880004D9840) == "(direct-map pointer)"
    assert reader.left_out == {"direct-map pointer": "the heap: per boot"}
    assert reader.text(0x40117E) == "0x40117e"  # a user address stays raw


def test_two_builds_of_the_same_code_compare_equal() -> None:
    base = _side()
    other = _side(shift=0x1000, stack=0xFFFFC900000D3F58, heap=0xFFFF888000162C90, cr3=0x4DF000)
    report = diff.compare(base, other)
    assert report.differences == [] and report.status == diff.SAME
    # rip at entry, do_syscall_64 and the exits, rdi and rsp at do_syscall_64, r11, LSTAR...
    assert report.build_specific >= 6
    assert base.roads["syscall64"]["stages"]["do_syscall_64"]["values"]["rsp"] == "pt_regs-0x8"
    assert base.left_out["cr3"] == "the page-table root: per boot"
    assert "no differences except build-specific addresses" in diff.render_text(report)


def test_a_changed_exit_names_the_exit_and_the_stages() -> None:
    report = diff.compare(_side(), _side(exit="iret"))
    lines = [d.line() for d in report.differences]
    assert report.status == diff.CHANGED
    assert "syscall64: exit: sysretq -> iret" in lines
    assert "syscall64: stages taken only by one side: exit_swapgs, sysretq -> iret_path, iretq" in lines


def test_a_changed_value_is_a_difference() -> None:
    base, other = _side(), _side(heap=0)
    assert [d.line() for d in diff.compare(base, other).differences] == [
        "syscall64: do_syscall_64 r11: (direct-map pointer) -> 0x0"]


def test_a_road_traced_on_one_side_only_differs() -> None:
    other = _side()
    other.roads["syscall64"] = {"error": "`/payloads/syscall_irl` exited with status 139"}
    found = diff.compare(_side(), other).differences
    assert [(d.where, d.what, d.base) for d in found] == [("syscall64", "trace", "traced")]


def test_changed_suite_outcomes_are_listed(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text("<testsuites><testsuite>"
                     "<testcase classname='x86_64.test_a' name='test_ok'/>"
                     "<testcase classname='x86_64.test_a' name='test_bad'><failure message='assert 1 == 2'/></testcase>"
                     "<testcase classname='x86_64.test_a' name='test_skip'><skipped/></testcase>"
                     "</testsuite></testsuites>")
    found = diff.case_outcomes(junit)
    assert found == {"x86_64.test_a::test_ok": "passed", "x86_64.test_a::test_bad": "failed (violation)",
                     "x86_64.test_a::test_skip": "skipped"}
    changed = diff.changed_outcomes({**found, "x86_64.test_a::test_bad": "passed"}, found)
    assert [d.line() for d in changed] == ["suite: x86_64.test_a::test_bad: passed -> failed (violation)"]


def test_the_json_and_html_reports() -> None:
    report = diff.compare(_side(), _side(exit="iret"))
    data = json.loads(json.dumps(diff.render_json(report)))
    assert {"schema", "status", "summary", "build_specific", "differences", "base", "patched"} <= set(data)
    assert data["status"] == 1 and {"where", "what", "base", "patched"} == set(data["differences"][0])
    road = data["patched"]["roads"]["syscall64"]
    assert road["exit"] == "iret" and road["stages"]["iretq"]["values"]["rip"] == "entry_SYSCALL_64+0x19b"
    assert {"identity", "facts", "roads", "left_out", "seconds", "suite"} <= set(data["base"])
    page = diff.render_html(report)
    assert "<th>base</th><th>patched</th>" in page and "class=differs" in page
    assert "not taken: the kernel left by iret" in page


# --- what x86_64 surveys, and how a side reads it ---------------------------------------------

SIX_ARGS = {i: 0x11111111 * (i + 1) for i in range(6)}
SIX_ARGV = ("0x11111111", "0x22222222", "0x33333333", "0x44444444", "0x55555555", "0x66666666")


def test_x86_64_surveys_its_five_roads_in_one_guest() -> None:
    survey = X86_64.survey
    assert [road.name for road in survey.roads] == [
        "syscall64", "int80-from-64", "int80-from-32", "syscall32", "sysenter32"]
    assert survey.cpus() == [None]  # QEMU's TCG takes sysenter and the 32-bit syscall on its default CPU


def test_x86_64_surveys_the_syscall_msrs() -> None:
    # Intel SDM vol. 4, table 2-2: IA32_STAR..IA32_FMASK and IA32_SYSENTER_CS/ESP/EIP.
    assert {one.name: (one.payload, int(one.argument, 16)) for one in X86_64.survey.readings} == {
        "STAR": ("rdmsr", 0xC0000081), "LSTAR": ("rdmsr", 0xC0000082), "CSTAR": ("rdmsr", 0xC0000083),
        "FMASK": ("rdmsr", 0xC0000084), "SYSENTER_CS": ("rdmsr", 0x174), "SYSENTER_ESP": ("rdmsr", 0x175),
        "SYSENTER_EIP": ("rdmsr", 0x176)}


def test_the_left_out_rules_name_stages_and_registers_a_trace_records() -> None:
    for rule in X86_64.survey.left_out:
        assert rule.stages <= set(X86_64.stages.all), rule
        assert rule.registers <= set(X86_64.trace_registers), rule


class _Symbols:
    """A symbol table of a few names (the rest absent), its memory unread."""

    path = Path("vmlinux")
    release = "6.1.0"

    def __init__(self, symbols: Mapping[str, int], sizes: Mapping[str, int] | None = None) -> None:
        self.symbols, self.sizes = symbols, sizes or {}

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols

    def symbol(self, name: str) -> int:
        return self.symbols[name]

    def symbol_size(self, name: str) -> int:
        return self.sizes.get(name, 0)

    def names_at(self, address: int) -> list[str]:
        return [name for name, at in self.symbols.items() if at == address]

    def read(self, address: int, size: int) -> bytes:
        raise AssertionError("the image is not read here")


class _Memory:
    """Guest memory: *words* at their addresses."""

    def __init__(self, words: Mapping[int, bytes]) -> None:
        self.words = words

    def read_memory(self, address: int, size: int, timeout: float = 0) -> bytes:
        return self.words[address][:size]


class _PayloadRecorder:
    """A tracer that records how each payload was asked for, and hands back a made-up trace."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def payload(self, name: str, *argv: str, nr: int | str, args: Mapping[int, int | str] | None = None,
                at: str = "sirl_syscall_insn") -> SyscallTrace:
        self.calls.append((name, argv, nr, dict(args or {}), at))
        return _trace()[0]


def test_a_surveyed_road_runs_the_suite_s_payload_with_the_i386_number() -> None:
    roads = {road.name: road for road in X86_64.survey.roads}
    tracer, vmlinux = _PayloadRecorder(), _Symbols({"__ia32_sys_getppid": TEXT})
    for name in ("syscall64", "int80-from-64", "int80-from-32", "sysenter32"):
        trace_road(tracer, vmlinux, roads[name])
    fast = {i: SIX_ARGS[i] for i in (0, 2, 3, 4)}  # the fast entries take argument 6 from the user stack
    assert tracer.calls == [  # getppid is 64 in arch/x86/entry/syscalls/syscall_32.tbl
        ("syscall_irl", (), "write", {0: 1, 2: 12}, "sirl_syscall_insn"),
        ("int80", ("64", *SIX_ARGV), "getppid", SIX_ARGS, "sirl_syscall_insn"),
        ("compat32", ("int80", "64", *SIX_ARGV), "getppid", SIX_ARGS, "sirl_int80_insn"),
        ("compat32", ("sysenter", "64", *SIX_ARGV), "getppid", fast, "sirl_sysenter_insn")]


def test_the_idt_gate_and_the_tables_read_as_facts() -> None:
    handler, idt = TEXT + 0xA01230, TEXT + 0x1000000
    gate = ((handler & 0xFFFF).to_bytes(2, "little") + (0x10).to_bytes(2, "little") + bytes([0, 0xEE])
            + ((handler >> 16) & 0xFFFF).to_bytes(2, "little") + (handler >> 32).to_bytes(4, "little") + bytes(4))
    vmlinux = _Symbols({"idt_table": idt, "sys_call_table": TEXT + 0x200}, {"sys_call_table": 451 * 8})
    reader = ValueReader(SymbolNames({"asm_int80_emulation": handler}, TEXT, TEXT + 0x2000000, lambda name: 16))
    found = memory_facts(vmlinux, _Memory({idt + 16 * 0x80: gate}), X86_64.survey, reader)
    assert found == {
        "IDT[0x80]": {"text": "asm_int80_emulation+0x0 selector=0x10 type=0xe dpl=3 ist=0 present=1",
                      "raw": f"{handler:#x}"},
        "sys_call_table slots": {"text": "451", "raw": "451"},
        "ia32_sys_call_table slots": {"text": "absent", "raw": "absent"}}


def test_sysenter_esp_reads_as_the_top_of_cpu_0_s_entry_stack() -> None:
    per_cpu, tss, sp0 = 0xFFFF88800F800000, 0x6000, 0xFFFFFE0000003000
    vmlinux = _Symbols({"__per_cpu_offset": TEXT + 0x100, "cpu_tss_rw": tss})
    memory = _Memory({TEXT + 0x100: per_cpu.to_bytes(8, "little"), per_cpu + tss + 4: sp0.to_bytes(8, "little")})
    facts = {"SYSENTER_ESP": {"text": "0xfffffe0000003000", "raw": f"{sp0:#x}"},
             "SYSENTER_EIP": {"text": "entry_SYSENTER_compat+0x0", "raw": "0x1"}}
    name_per_cpu_fields(vmlinux, memory, X86_64.survey, facts)
    assert facts["SYSENTER_ESP"] == {"text": "TSS.sp0 of CPU 0 (the top of its entry stack)", "raw": f"{sp0:#x}"}
    other = {"SYSENTER_ESP": {"text": "0x1000", "raw": "0x1000"}}
    name_per_cpu_fields(vmlinux, memory, X86_64.survey, other)
    assert other["SYSENTER_ESP"]["text"] == "0x1000"


# --- the command on the real kernels -----------------------------------------------------------


def _diff(*args: str, quiet: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_syscall_irl.cli.main", "diff", *(["-q"] if quiet else []),
                           *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def reference() -> Path:
    from pytest_syscall_irl.kernel.build import reference_kernel
    path = reference_kernel()
    if path is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    return path


@pytest.fixture(scope="module")
def sysret_never(reference: Path) -> Path:
    """The reference kernel whose entry code leaves every 64-bit syscall by IRET (cached, ~20 s to build)."""
    from pytest_syscall_irl.kernel.mutant import MutantBuild, MutantPatch
    return MutantBuild(MutantPatch.load(MUTANT_PATCH)).build()


@pytest.mark.integration
def test_the_reference_against_itself_differs_in_nothing(reference: Path, tmp_path: Path) -> None:
    result = _diff(str(reference), str(reference), "--json", str(tmp_path / "d.json"), "--html",
                   str(tmp_path / "d.html"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: no differences except build-specific addresses" in result.stdout, result.stdout
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["differences"] == [] and set(data["base"]["roads"]) == {
        "syscall64", "int80-from-64", "int80-from-32", "syscall32", "sysenter32"}
    assert all("error" not in road for road in data["base"]["roads"].values()), data["base"]["roads"]
    assert data["base"]["facts"]["LSTAR"]["text"] == "entry_SYSCALL_64+0x0"
    assert "<th>base</th><th>patched</th>" in (tmp_path / "d.html").read_text()


@pytest.mark.integration
def test_a_kernel_that_never_sysrets_differs_in_the_syscall64_exit(reference: Path, sysret_never: Path) -> None:
    result = _diff(str(reference), str(sysret_never), "--suite", "--suite-args",
                   "-p no:xdist -k test_an_eligible_syscall_leaves_by_sysretq")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "syscall64: exit: sysretq -> iret" in result.stdout, result.stdout
    assert "syscall64: stages taken only by one side: exit_swapgs, sysretq -> iret_path, iretq" in result.stdout
    changed = [line for line in result.stdout.splitlines() if line.startswith("  suite:")]
    assert len(changed) == 1, result.stdout
    assert changed[0].endswith("test_sysret_eligibility::test_an_eligible_syscall_leaves_by_sysretq: "
                               "passed -> failed (violation)"), result.stdout
    # The other roads do not go through the patched code.
    others = ("  int80-from-64:", "  int80-from-32:", "  syscall32:", "  sysenter32:")
    assert not [line for line in result.stdout.splitlines() if line.startswith(others)], result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("problem, fix", [
    ("missing", "does not exist"),
    ("not-a-bzimage", "is not an x86 bzImage"),
    ("other-vmlinux", "are from different builds"),
    ("three-vmlinux", "--vmlinux given 3 times for 2 kernels"),
])
def test_a_wrong_request_exits_2_before_anything_boots(problem: str, fix: str, reference: Path,
                                                       sysret_never: Path) -> None:
    vmlinux = str(reference.parent / "vmlinux")
    args = {"missing": [str(reference), "/nonexistent/bzImage"],
            "not-a-bzimage": [str(reference), str(MUTANT_PATCH)],
            "other-vmlinux": [str(reference), str(sysret_never), "--vmlinux", vmlinux],
            "three-vmlinux": [str(reference), str(reference), *["--vmlinux", vmlinux] * 3]}[problem]
    started = time.monotonic()
    result = _diff(*args, quiet=False)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert fix in result.stderr and "syscall-irl: error:" in result.stderr
    assert "starting a guest" not in result.stderr and time.monotonic() - started < 10

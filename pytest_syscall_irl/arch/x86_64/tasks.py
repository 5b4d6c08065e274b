"""The running task as the debugger sees it: pid and comm of `current` at any stage.

x86_64 keeps the pointer to the running task_struct in a per-CPU variable read through
GS: `current_task` up to 6.1 and again from 6.15, the first member of `struct pcpu_hot`
from 6.2 to 6.14 (arch/x86/include/asm/current.h in each version). Both are found in
the kernel's own symbol table, never assumed from its version. Per-CPU symbols are
offsets from the CPU's per-CPU base, which is GS base in the kernel after the entry
`swapgs` and the kernel GS base (MSR_KERNEL_GS_BASE) in user mode and before that swapgs.

The task_struct fields (pid, comm) need the vmlinux's DWARF; without it only the
task pointer is known, and a process is told by what the CPU holds: its page-table root
in CR3 (`same_process`) and the code mapped at its program's addresses (`code_condition`).
No pytest here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ...core.errors import KernelError, SyscallIrlError
from ..base import Evaluator, ProcessConditions, TargetReader, TaskInfo
from ..roads import SymbolTable
from .facts import PTI_USER_PGTABLE_BIT

__all__ = ["CR3_ROOT_MASK", "GS_IN_KERNEL", "GS_IN_USER", "TASK_COMM_LEN", "CurrentTaskViaGs", "Evaluator",
           "TaskInfo", "code_condition", "comm_words", "current_task", "current_task_slot", "gs_register",
           "page_table_condition", "parse_comm", "read_current", "task_condition"]

TASK_COMM_LEN = 16  # include/linux/sched.h
# Where the per-CPU base is, by where the CPU is on the path (see the module docstring).
GS_IN_KERNEL = "$gs_base"
GS_IN_USER = "$k_gs_base"
# CR3 bits 51:12 hold the physical address of the top page table (Intel SDM vol. 3, 4.5);
# bits 11:0 are the PCID with CR4.PCIDE (Linux gives an mm a different one per CPU and
# may change it) or PWT/PCD without: the root alone names an address space.
CR3_ROOT_MASK = 0x000F_FFFF_FFFF_F000
WORD = 8


def current_task_slot(vmlinux: SymbolTable) -> int:
    """Per-CPU offset of the pointer to the running task (current_task, or pcpu_hot's
    first member, current_task, in 6.2..6.14)."""
    for name in ("current_task", "pcpu_hot"):
        if vmlinux.has_symbol(name):
            return vmlinux.symbol(name)
    raise KernelError(f"{vmlinux.path} has neither current_task nor pcpu_hot: "
                      "cannot find the running task (not an x86_64 kernel?)")


def current_task(vmlinux: SymbolTable, gs: str = GS_IN_KERNEL) -> str:
    """A GDB expression for `current` (a struct task_struct *), with the per-CPU base in
    register *gs*: GS_IN_KERNEL after the entry swapgs, GS_IN_USER before it."""
    return f"(*(struct task_struct **)({gs} + {current_task_slot(vmlinux):#x}))"


def comm_words(comm: str) -> tuple[int, int]:
    """task_struct.comm as two little-endian 8-byte words: the kernel pads comm with
    NULs (strscpy_pad in __set_task_comm), so equality of both words is equality of
    names. A name is cut to TASK_COMM_LEN - 1 bytes, as the kernel cuts it."""
    data = comm.encode()[: TASK_COMM_LEN - 1].ljust(TASK_COMM_LEN, b"\0")
    return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little")


def task_condition(vmlinux: SymbolTable, gs: str, *, pid: int | None = None, comm: str | None = None,
                   exclude_pids: tuple[int, ...] = ()) -> str:
    """A GDB condition on the running task: its pid, its comm, pids it must not be."""
    task = current_task(vmlinux, gs)
    terms = [f"{task}->pid != {p}" for p in exclude_pids]
    if pid is not None:
        terms.append(f"{task}->pid == {pid}")
    if comm is not None:
        low, high = comm_words(comm)
        terms.append(f"*(unsigned long *)({task}->comm) == {low:#x}")
        terms.append(f"*(unsigned long *)({task}->comm + 8) == {high:#x}")
    return " && ".join(terms)


_COMM = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_comm(text: str) -> str:
    """comm from GDB's printing of a char[16] ('"cat", \\'\\\\000\\' <repeats 12 times>')."""
    match = _COMM.search(text)
    if match is None:
        raise KernelError(f"cannot read a task name from GDB's {text!r}")
    return match.group(1).split("\\000", 1)[0]


def read_current(gdb: Evaluator, vmlinux: SymbolTable, gs: str = GS_IN_KERNEL) -> TaskInfo:
    """The running task, read through DWARF types (the vmlinux must have DWARF)."""
    task = current_task(vmlinux, gs)
    address = int(gdb.evaluate(f"(unsigned long){task}"), 0)
    pid = int(gdb.evaluate(f"{task}->pid"), 0)
    return TaskInfo(address, pid, parse_comm(gdb.evaluate(f"{task}->comm")))


def gs_register(registers: Mapping[str, int]) -> str:
    """Which GS register holds the per-CPU base at a stop with these *registers*: the
    kernel's GS base is a kernel address (the upper half), a user one is not."""
    return GS_IN_KERNEL if registers["gs_base"] >> 63 else GS_IN_USER


class CurrentTaskViaGs:
    """`current` through GS, as arch.base.CurrentTask describes it: the per-CPU base is
    in GS base once the entry `swapgs` has run (*switched*), in the kernel GS base before."""

    def slot(self, vmlinux: SymbolTable, switched: bool) -> tuple[str, int]:
        return (GS_IN_KERNEL if switched else GS_IN_USER).lstrip("$"), current_task_slot(vmlinux)

    def is_running(self, vmlinux: SymbolTable, task: int) -> str:
        return f"*(unsigned long *)({GS_IN_KERNEL} + {current_task_slot(vmlinux):#x}) == {task:#x}"

    def condition(self, vmlinux: SymbolTable, *, pid: int | None = None, comm: str | None = None,
                  exclude_pids: tuple[int, ...] = ()) -> str:
        return task_condition(vmlinux, GS_IN_USER, pid=pid, comm=comm, exclude_pids=exclude_pids)

    def read(self, gdb: Evaluator, vmlinux: SymbolTable) -> TaskInfo:
        return read_current(gdb, vmlinux)

    def holds_code(self, address: int, code: bytes) -> str:
        return code_condition(address, code)

    def same_process(self, target: TargetReader, vmlinux: SymbolTable) -> ProcessConditions:
        """In kernel state (GS base is the kernel's), the running task, here and at its exit.
        Before the entry's switch or in user mode, the page-table root: CR3 is the user one
        there, the same at every stop at this location. At the exit, in kernel state, the
        task where the kernel's per-CPU data can be read now; where it cannot (PTI: user page
        tables map none), the kernel half of the root (PTI_USER_PGTABLE_BIT clear)."""
        registers = target.registers(["gs_base", "k_gs_base", "cr3"])
        if gs_register(registers) == GS_IN_KERNEL:
            running = self.is_running(vmlinux, _task(target, registers["gs_base"], vmlinux, quietly=False))
            return ProcessConditions(running, running)
        here, task = page_table_condition(registers["cr3"]), _task(target, registers["k_gs_base"], vmlinux)
        if task:
            return ProcessConditions(here, self.is_running(vmlinux, task))
        return ProcessConditions(here, page_table_condition(registers["cr3"] & ~PTI_USER_PGTABLE_BIT))


def _task(target: TargetReader, base: int, vmlinux: SymbolTable, quietly: bool = True) -> int:
    """The task pointer in the per-CPU area at *base*; 0 where it is not mapped (*quietly*)."""
    try:
        return int.from_bytes(target.read_memory(base + current_task_slot(vmlinux), WORD), "little")
    except SyscallIrlError as exc:
        if quietly:
            return 0
        raise KernelError(f"the running task cannot be read through the per-CPU base {base:#x}: {exc}") from exc


def page_table_condition(cr3: int) -> str:
    """A GDB condition true while the address space whose CR3 was *cr3* is loaded, whatever
    its PCID (compare CR3s of one kind: with PTI the kernel's differs from the user's in
    PTI_USER_PGTABLE_BIT, and without PTI that bit is the root's own)."""
    return f"($cr3 & {CR3_ROOT_MASK:#x}) == {cr3 & CR3_ROOT_MASK:#x}"


def code_condition(address: int, code: bytes) -> str:
    """A GDB condition true where the address space loaded holds *code* at *address* (its
    whole 8-byte words: a read past them could reach an unmapped page, and GDB stops on a
    condition it cannot evaluate)."""
    words = [code[at:at + WORD] for at in range(0, len(code) - len(code) % WORD, WORD)]
    if not words:
        raise ValueError(f"{len(code)} bytes of code at {address:#x}: need at least {WORD}")
    return " && ".join(f"*(unsigned long *){address + WORD * i:#x} == {int.from_bytes(word, 'little'):#x}"
                       for i, word in enumerate(words))

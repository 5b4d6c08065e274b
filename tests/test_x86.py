"""x86_64 facts against the manuals' numbers (not against our own constants)."""

from __future__ import annotations

import struct

import pytest

from pytest_syscall_irl import STAGES, roads, x86
from pytest_syscall_irl.arch.base import EntryCode
from pytest_syscall_irl.arch.x86_64 import X86_64
from pytest_syscall_irl.machine.gdbmi import Instruction
from pytest_syscall_irl.trace.model import SyscallSelector


def test_fmask_by_kernel_version() -> None:
    assert x86.expected_fmask((6, 1, 192)) == 0x257FD5
    assert x86.expected_fmask((5, 14, 0)) == 0x257FD5
    assert x86.expected_fmask((5, 13, 19)) == 0x47700
    assert x86.flag_names(0x47700) == ["TF", "IF", "DF", "IOPL", "NT", "AC"]


def test_sysret_rflags_masks_r11_and_sets_bit_1() -> None:
    assert x86.sysret_rflags(0x246) == 0x246
    assert x86.sysret_rflags(0) == 0x2
    # VM (bit 17) and RF (bit 16) are not restored by SYSRET; 0x3C7FD7 keeps AC, ID, VIF, VIP.
    assert x86.sysret_rflags(0x30000 | 0x200) == 0x202
    assert x86.sysret_rflags(0x3C0000) == 0x3C0002


def test_star_selectors_of_linux() -> None:
    assert x86.star_selectors(0x0023001000000000) == (0x10, 0x23)


def test_decode_pt_regs_by_layout() -> None:
    raw = struct.pack("<21Q", *range(100, 121))
    regs = x86.decode_pt_regs(raw)
    assert (regs["r15"], regs["orig_ax"], regs["ss"]) == (100, 115, 120)
    assert x86.PT_REGS_OFFSETS["orig_ax"] == 120 and x86.PT_REGS_SIZE == 168
    swapped = {**x86.PT_REGS_OFFSETS, "ip": 136, "cs": 128}
    assert x86.decode_pt_regs(raw, swapped)["ip"] == 117
    with pytest.raises(ValueError):
        x86.decode_pt_regs(raw[:100])


def test_do_syscall_64_argument_order() -> None:
    assert x86.do_syscall_64_args((6, 1, 0)) == ("rdi", "rsi")
    assert x86.do_syscall_64_args((5, 10, 0)) == ("rsi", "rdi")


def test_selector_condition_names_every_argument_register() -> None:
    condition = SyscallSelector(1, {0: 1, 2: 12, 3: -1}).register_condition(roads.X86_64)
    assert condition == "$rax == 0x1 && $rdi == 0x1 && $rdx == 0xc && $r10 == 0xffffffffffffffff"


def test_ia32_selector_compares_the_low_halves() -> None:
    condition = SyscallSelector(20, {0: -1}).register_condition(roads.IA32)
    assert condition == "($rax & 0xffffffff) == 0x14 && ($rbx & 0xffffffff) == 0xffffffff"


def test_entry_code_found_by_disassembly() -> None:
    code = [Instruction(0x100, "swapgs", "entry_SYSCALL_64", 0),
            Instruction(0x103, "mov    %rsp,%gs:0x6014", "entry_SYSCALL_64", 3),
            Instruction(0x200, "swapgs", "entry_SYSCALL_64", 256),
            Instruction(0x203, "jmp    0x205", "entry_SYSCALL_64", 259),
            Instruction(0x205, "verw   0x0(%rip)", "entry_SYSCALL_64", 261),
            Instruction(0x20c, "sysretq", "entry_SYSCALL_64", 268),
            Instruction(0x300, "swapgs", "entry_SYSCALL_64", 512)]
    assert X86_64.find_entry_code(0x100, code) == EntryCode(0x100, 0x100, 0x200, 0x20C)


def test_the_stages_are_the_roads_stages_in_the_order_of_the_path() -> None:
    assert STAGES == ("user", "entry", "after_swapgs", "do_syscall_64", "do_int80_emulation", "do_int80_syscall_32",
                      "do_fast_syscall_32", "do_SYSENTER_32", "handler", "ksys", "handler_return", "dispatch_return",
                      "exit_swapgs", "sysretq", "sysretl", "iret_path", "iretq", "user_return")
    for road in roads.ROADS.values():
        assert [stage for stage in STAGES if stage in road.stages] == list(road.stages), road.name


def test_the_pt_regs_description_decodes_as_the_facts_do() -> None:
    raw = struct.pack("<21Q", *range(100, 121))
    layout = X86_64.pt_regs.offsets
    assert X86_64.pt_regs.decode(raw, layout) == x86.decode_pt_regs(raw)
    assert X86_64.pt_regs.size(layout) == x86.PT_REGS_SIZE


@pytest.mark.parametrize(("version", "symbol", "register"), [
    ((6, 1, 0), "do_syscall_64", "rdi"), ((5, 10, 0), "do_syscall_64", "rsi"),
    ((5, 10, 0), "do_int80_emulation", "rdi"),
])
def test_the_c_entry_finds_pt_regs_where_its_kernel_passes_them(version: tuple[int, int, int], symbol: str,
                                                                 register: str) -> None:
    assert X86_64.dispatch_regs_register(symbol, version) == register


def test_a_compat_mode_return_compares_only_esp() -> None:
    ip, condition = X86_64.user_return({"ip": 0x8049000, "sp": 0xFFFFD000, "cs": x86.USER32_CS})
    assert ip == 0x8049000 and "($rsp & 0xffffffff) == 0xffffd000" in condition
    assert "$rsp == 0x7ffd0000 " in X86_64.user_return({"ip": 0x401000, "sp": 0x7FFD0000, "cs": x86.USER_CS})[1]


@pytest.mark.parametrize(("user_cr3", "cr4", "kernel_cr3"), [
    (0x261000, 0x6B0, 0x260000),  # no PCID: only the PGD half changes (seen on QEMU's default CPU)
    (0x261805, 0x6B0 | x86.CR4_PCIDE, 0x260005),  # PCID: the user ASID bit goes too
    (0x261805, 0x6B0, 0x260805),  # bit 11 is no ASID bit without CR4.PCIDE
])
def test_pti_kernel_cr3(user_cr3: int, cr4: int, kernel_cr3: int) -> None:
    assert x86.pti_kernel_cr3(user_cr3, cr4) == kernel_cr3


def test_thread_size_from_either_name_of_the_init_stack_bounds() -> None:
    # 6.1 names the init task's stack __start_init_task..__end_init_task, 6.12 __start_init_stack..__end_init_stack.
    assert x86.thread_size({"__start_init_task": 0x1000, "__end_init_task": 0x5000}) == 0x4000
    assert x86.thread_size({"__start_init_stack": 0x2000, "__end_init_stack": 0x4000, "init_stack": 0x2000}) == 0x2000
    with pytest.raises(KeyError):
        x86.thread_size({"init_stack": 0x2000})

"""Roads by instruction, and syscall names read from a kernel's tables."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pytest_syscall_irl import roads


@pytest.mark.parametrize("code, bits, road", [
    (b"\x0f\x05", 64, "syscall64"), (b"\x0f\x05", 32, "syscall32"), (b"\xcd\x80", 64, "int80"),
    (b"\xcd\x80", 32, "int80"), (b"\x0f\x34", 32, "sysenter32"),
])
def test_the_road_follows_from_the_instruction_and_the_mode(code: bytes, bits: int, road: str) -> None:
    assert roads.road_of(code, bits).name == road


def test_a_non_syscall_instruction_names_the_ones_it_knows() -> None:
    with pytest.raises(roads.RoadError, match=r"90 90 in a 64-bit program is no syscall instruction"):
        roads.road_of(b"\x90\x90", 64)


class TableKernel:
    """A vmlinux whose tables point at the given handlers (8-byte slots from 0x1000)."""

    path = Path("vmlinux")
    release = "6.1.0"

    def __init__(self, table: str, handlers: list[str], extra: tuple[str, ...] = ()) -> None:
        self.table = table
        self.addresses = {name: 0x10000 + 16 * i for i, name in enumerate(dict.fromkeys(handlers))}
        self.data = b"".join(struct.pack("<Q", self.addresses[h]) for h in handlers)
        self.extra = set(extra)

    def has_symbol(self, name: str) -> bool:
        return name == self.table or name in self.addresses or name in self.extra

    def symbol(self, name: str) -> int:
        return 0x1000

    def symbol_size(self, name: str) -> int:
        return len(self.data)

    def read(self, address: int, size: int) -> bytes:
        return self.data[address - 0x1000:address - 0x1000 + size]

    def names_at(self, address: int) -> list[str]:
        return sorted([n for n, a in self.addresses.items() if a == address] + ["__do_sys_alias"])


def test_x86_64_names_come_from_sys_call_table() -> None:
    kernel = TableKernel("sys_call_table", ["__x64_sys_read", "__x64_sys_write", "__x64_sys_ni_syscall"])
    names = roads.SyscallNames(kernel, roads.X86_64)  # type: ignore[arg-type]
    assert (names.number("read"), names.number("write"), names.number(7)) == (0, 1, 7)
    assert names.handler(1) == "__x64_sys_write" and names.handler(99) == ""
    with pytest.raises(roads.RoadError, match="has no x86_64 syscall 'clock_gettime'"):
        names.number("clock_gettime")


def test_ia32_names_without_a_table_are_the_i386_abi_where_the_kernel_has_the_handler() -> None:
    kernel = TableKernel("no_table", [], extra=("__ia32_sys_getpid", "__ia32_compat_sys_execve"))
    names = roads.SyscallNames(kernel, roads.IA32)  # type: ignore[arg-type]
    assert names.number("getpid") == 20 and names.handler(20) == "__ia32_sys_getpid"
    assert names.number("execve") == 11 and names.handler(11) == "__ia32_compat_sys_execve"
    with pytest.raises(roads.RoadError):
        names.number("getppid")  # the kernel has no handler for it

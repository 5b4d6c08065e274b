"""The running task's expressions, against symbol tables of both layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl import tasks
from pytest_syscall_irl.core.errors import KernelError


class Symbols:
    """A stand-in vmlinux with the given symbols."""

    path = Path("vmlinux")

    def __init__(self, **symbols: int) -> None:
        self.symbols = symbols

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols

    def symbol(self, name: str) -> int:
        return self.symbols[name]


def _vmlinux(**symbols: int) -> Any:
    return Symbols(**symbols)


def test_current_task_is_the_per_cpu_variable_where_it_exists() -> None:
    assert tasks.current_task(_vmlinux(current_task=0x1FBC0), "$gs_base") == \
        "(*(struct task_struct **)($gs_base + 0x1fbc0))"


def test_current_task_is_pcpu_hots_first_member_in_6_2_to_6_14() -> None:
    assert "0x2a000)" in tasks.current_task(_vmlinux(pcpu_hot=0x2A000), "$k_gs_base")


def test_a_kernel_with_neither_is_an_error_naming_both() -> None:
    with pytest.raises(KernelError, match="neither current_task nor pcpu_hot"):
        tasks.current_task_slot(_vmlinux())


def test_comm_words_are_the_nul_padded_name() -> None:
    assert tasks.comm_words("cat") == (int.from_bytes(b"cat\0\0\0\0\0", "little"), 0)
    low, high = tasks.comm_words("a-very-long-program-name")
    assert (low.to_bytes(8, "little") + high.to_bytes(8, "little")) == b"a-very-long-pro\0"


def test_task_condition_names_every_term() -> None:
    condition = tasks.task_condition(_vmlinux(current_task=0x100), "$gs_base", pid=42, comm="cat",
                                     exclude_pids=(1,))
    assert condition.count("$gs_base + 0x100") == 4
    assert "->pid != 1" in condition and "->pid == 42" in condition
    assert f"== {int.from_bytes(b'cat', 'little'):#x}" in condition


@pytest.mark.parametrize("text, comm", [
    ('"cat", \'\\000\' <repeats 12 times>', "cat"),
    ('"sirl-agent\\000\\000\\000\\000\\000"', "sirl-agent"),
    ('"sh\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000"', "sh"),
])
def test_parse_comm_reads_gdbs_char_array(text: str, comm: str) -> None:
    assert tasks.parse_comm(text) == comm


def test_gs_register_tells_kernel_from_user_gs_base() -> None:
    assert tasks.gs_register({"gs_base": 0xFFFF88800F600000}) == "$gs_base"
    assert tasks.gs_register({"gs_base": 0}) == "$k_gs_base"


def test_the_architectures_current_task_reads_gs_base_after_swapgs_and_k_gs_base_before() -> None:
    current, vmlinux = tasks.CurrentTaskViaGs(), _vmlinux(current_task=0x1FBC0)
    assert current.slot(vmlinux, switched=True) == ("gs_base", 0x1FBC0)
    assert current.slot(vmlinux, switched=False) == ("k_gs_base", 0x1FBC0)
    assert current.is_running(vmlinux, 0xFFFF888001234000) == \
        "*(unsigned long *)($gs_base + 0x1fbc0) == 0xffff888001234000"
    # Selecting a process happens before the entry swapgs: through the kernel GS base.
    assert "$k_gs_base + 0x1fbc0" in current.condition(vmlinux, pid=42)

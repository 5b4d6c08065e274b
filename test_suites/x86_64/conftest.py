"""Helpers shared by the x86_64 syscall-path suite: MSRs as the guest reads them."""

from __future__ import annotations

import pytest

from pytest_syscall_irl import x86
from pytest_syscall_irl import Guest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: runs several times longer than the other tests of the suite "
                                       "(it is scheduled first)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Longest first: under xdist, a long test dealt out last keeps one worker busy while
    # the others sit idle at the end of the run. A stable sort keeps the rest in order.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def read_msr(guest: Guest):
    """Read an MSR inside the guest through /dev/cpu/0/msr (the `rdmsr` payload).

    def test_lstar(read_msr):
        assert read_msr(x86.MSR_LSTAR) != 0
    """

    def read(msr: int) -> int:
        result = guest.run(f"{guest.payload('rdmsr').guest_path} {msr:#x}")
        if result.status == 3:
            pytest.skip(f"/dev/cpu/0/msr is not available in the guest (CONFIG_X86_MSR): {result.output.strip()}")
        assert result.status == 0, f"rdmsr {msr:#x} failed: {result.output}"
        number, value = result.output.split()
        assert int(number, 16) == msr
        return int(value, 16)

    return read


@pytest.fixture
def syscall_entry(kernel, gdb) -> int:
    """Address of entry_SYSCALL_64 from the vmlinux symbol table; skips where FRED is
    active on the CPU (CR4.FRED), where SYSCALL enters through the FRED entry point and
    LSTAR is unused. A kernel built with FRED on a CPU without it (QEMU 7.2's TCG has
    none) takes the LSTAR path, so the symbol alone decides nothing."""
    cr4 = gdb.registers(["cr4"])["cr4"]
    if cr4 & x86.CR4_FRED:
        pytest.skip(f"FRED is active on the CPU (CR4 {cr4:#x} has FRED, bit 32): SYSCALL does not go through LSTAR")
    return kernel.vmlinux.symbol("entry_SYSCALL_64")

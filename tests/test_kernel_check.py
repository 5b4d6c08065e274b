"""Unit tests of `syscall-irl kernel check` (kernel_check.py) with a fake kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_syscall_irl.cli import main as cli
from pytest_syscall_irl.kernel.build import reference_kernel

from pytest_syscall_irl.kernel.check import check, command_channel, lacking
from pytest_syscall_irl.kernel.modules import GuestModules

FULL = {"univ8250_console_setup", "populate_rootfs", "gunzip", "devtmpfs_init", "msr_fops", "virtio_pci_driver",
        "virtio_blk", "iso9660_fs_type", "pti_init", "entry_SYSCALL_compat", "ldt_dup_context", "x64_sys_call",
        "nr_uarts"}


@dataclass
class FakeVmlinux:
    names: set[str]
    path: Path = Path("vmlinux")
    serial_ports: int = 4  # the value of nr_uarts

    def has_symbol(self, name: str) -> bool:
        return name in self.names

    def symbol(self, name: str) -> int:
        assert name == "nr_uarts"
        return 0x1000

    def read(self, address: int, size: int) -> bytes:
        assert (address, size) == (0x1000, 4)
        return self.serial_ports.to_bytes(4, "little")


@dataclass
class FakeKernel:
    vmlinux: FakeVmlinux
    dwarf: bool = True
    release: str = "6.12.0"
    missing_for_iso: list[str] = field(default_factory=list)


def _lacking(symbols: set[str], modules: GuestModules = GuestModules(), dwarf: bool = True) -> dict[str, bool]:
    findings = check(FakeKernel(FakeVmlinux(symbols), dwarf), modules)  # type: ignore[arg-type]
    return {finding.feature: finding.fatal for finding in lacking(findings)}


def test_a_full_kernel_lacks_nothing() -> None:
    assert _lacking(FULL) == {}


def test_a_distro_kernel_lacks_the_msr_driver_unless_its_module_is_inserted() -> None:
    distro = FULL - {"msr_fops", "virtio_blk", "iso9660_fs_type"}
    assert _lacking(distro) == {"CONFIG_X86_MSR": False, "CONFIG_VIRTIO_BLK": False, "CONFIG_ISO9660_FS": False}
    modules = GuestModules(Path("/lib/modules/6.12.0"), (), frozenset({"msr", "virtio_blk", "isofs"}))
    assert _lacking(distro, modules) == {}


def test_what_the_suite_cannot_do_without_is_fatal_and_the_rest_is_not() -> None:
    found = _lacking(FULL - {"univ8250_console_setup", "pti_init", "entry_SYSCALL_compat"}, dwarf=False)
    assert found == {"CONFIG_SERIAL_8250_CONSOLE": True, "DWARF": False,
                     "CONFIG_PAGE_TABLE_ISOLATION (CONFIG_MITIGATION_PAGE_TABLE_ISOLATION in 6.12)": False,
                     "CONFIG_IA32_EMULATION": False}


def test_a_kernel_with_one_serial_port_lacks_the_agent_channel_and_runs_on_the_shared_line() -> None:
    kernel = FakeKernel(FakeVmlinux(FULL, serial_ports=1))
    findings = {finding.feature: finding for finding in check(kernel, GuestModules())}  # type: ignore[arg-type]
    finding = findings["CONFIG_SERIAL_8250_RUNTIME_UARTS >= 2"]
    assert not finding.present and not finding.fatal
    assert "1 8250 port (nr_uarts in vmlinux): the agent's channel is ttyS0" in str(finding)
    assert "cleaned by pattern" in str(finding)
    assert command_channel(kernel) == "ttyS0"  # type: ignore[arg-type]
    assert command_channel(FakeKernel(FakeVmlinux(FULL))) == "ttyS1"  # type: ignore[arg-type]


def test_the_cli_checks_the_reference_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    assert cli.main(["kernel", "check", f"--kernel={kernel}", "--modules=none"]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] CONFIG_X86_MSR: built in (msr_fops in vmlinux)" in out
    assert "[ok  ] CONFIG_SERIAL_8250_RUNTIME_UARTS >= 2: 4 8250 ports (nr_uarts in vmlinux): the agent's " \
           "channel is ttyS1" in out
    assert "0 of 15 features lacking" in out

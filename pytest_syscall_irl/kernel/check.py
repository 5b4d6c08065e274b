"""What a kernel lacks for which tests, read from its vmlinux (and module directory)
before anything boots, like kunit_tool's config check.

    for finding in check(Kernel.load("bzImage"), GuestModules()):
        print(finding)

Each feature is recognised by a symbol that exists only when the option is built in (a
module's symbols are not in vmlinux), or by the module directory for drivers the guest
can insert. No pytest here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .artifacts import Kernel
from .modules import GuestModules

MSR_TESTS = ("test_lstar.py::test_lstar_msr_is_entry_syscall_64", "test_lstar.py::test_star_selectors",
             "test_rflags.py::test_fmask_is_what_the_kernel_version_sets",
             "test_rflags.py::test_syscall_clears_the_fmask_bits")
PTI_TESTS = ("test_cr3.py::test_entry_switches_to_the_kernel_page_tables",
             "test_cr3.py::test_exit_returns_to_the_user_page_tables")


@dataclass(frozen=True)
class Finding:
    """One feature the suite uses: whether the kernel has it, and what its absence costs."""

    feature: str  # "CONFIG_X86_MSR"
    present: bool
    how: str  # how it was found, or what was looked for
    without: str  # what happens to the suite without it
    fatal: bool = False  # no test can run without it

    def __str__(self) -> str:
        mark = "ok  " if self.present else ("FAIL" if self.fatal else "lack")
        text = f"[{mark}] {self.feature}: {self.how}"
        return text if self.present else f"{text}\n       without it: {self.without}"


def _symbol(kernel: Kernel, option: str, symbol: str, without: str, fatal: bool = False) -> Finding:
    present = kernel.vmlinux.has_symbol(symbol)
    how = f"built in ({symbol} in vmlinux)" if present else f"not built in (no {symbol} in vmlinux)"
    return Finding(option, present, how, without, fatal)


def _driver(kernel: Kernel, modules: GuestModules, option: str, symbol: str, module: str, without: str) -> Finding:
    found = _symbol(kernel, option, symbol, without)
    if found.present or module not in modules.provided:
        return found
    return Finding(option, True, f"module {module} from {modules.directory}, inserted by the guest's init", without)


def check(kernel: Kernel, modules: GuestModules) -> list[Finding]:
    """Every feature the suite relies on, as this kernel (and *modules*) provide it."""
    return [
        Finding("DWARF", kernel.dwarf, f"{kernel.vmlinux.path} has {'' if kernel.dwarf else 'no '}.debug_info",
                "test_write_args.py::test_echo_writes_syscall_irl_to_fd_1 skips (the running task's pid and comm "
                "need struct task_struct); traces use the x86_64 struct pt_regs layout without checking it against "
                "DWARF; GDB cannot unwind past do_syscall_64 without DWARF's call frame information (.debug_frame), so "
                "test_dispatch.py::test_the_handler_runs_under_do_syscall_64_and_the_entry checks do_syscall_64 "
                "and skips the entry_SYSCALL_64 frame (CONFIG_DEBUG_INFO_DWARF5)"),
        _symbol(kernel, "CONFIG_SERIAL_8250_CONSOLE", "univ8250_console_setup",
                "no console on ttyS0: no guest can be driven", fatal=True),
        _second_port(kernel),
        _symbol(kernel, "CONFIG_BLK_DEV_INITRD", "populate_rootfs", "no initramfs: the guest has no init", fatal=True),
        _symbol(kernel, "CONFIG_RD_GZIP", "gunzip", "the gzip initramfs cannot be unpacked", fatal=True),
        _symbol(kernel, "CONFIG_DEVTMPFS", "devtmpfs_init", "no /dev for the guest's init", fatal=True),
        _driver(kernel, modules, "CONFIG_X86_MSR", "msr_fops", "msr",
                f"the MSR tests skip: {', '.join(MSR_TESTS)} (build it in, or pass its module directory, --modules)"),
        *(_driver(kernel, modules, option, symbol, module,
                  "payloads travel inside the initramfs instead of on the ISO9660 disk (nothing skips)")
          for option, symbol, module in (("CONFIG_VIRTIO_PCI", "virtio_pci_driver", "virtio_pci"),
                                         ("CONFIG_VIRTIO_BLK", "virtio_blk", "virtio_blk"),
                                         ("CONFIG_ISO9660_FS", "iso9660_fs_type", "isofs"))),
        _symbol(kernel, "CONFIG_PAGE_TABLE_ISOLATION (CONFIG_MITIGATION_PAGE_TABLE_ISOLATION in 6.12)", "pti_init",
                f"the CR3 switch is not tested: {', '.join(PTI_TESTS)} skip"),
        _symbol(kernel, "CONFIG_IA32_EMULATION", "entry_SYSCALL_compat",
                "no 32-bit entries (int $0x80 from 32-bit code, compat syscall and sysenter) to test"),
        _symbol(kernel, "CONFIG_MODIFY_LDT_SYSCALL", "ldt_dup_context",
                "no LDT segment to return to: test_sysret_eligibility.py::"
                "test_an_ss_other_than_user_ds_leaves_by_iret skips (SS != __USER_DS is not tested)"),
        _dispatch(kernel),
        _fred(kernel),
    ]


SHARED_LINE_COST = ("the guest's command agent shares ttyS0 with the kernel's messages: command output is "
                    "cleaned by pattern (a line that looks like a kernel message is lost, \\r is dropped, a program "
                    "that prints Oops or BUG is reported as a kernel crash) and reading it is slower")


def serial_ports(kernel: Kernel) -> int | None:
    """How many 8250 ports the kernel drives (CONFIG_SERIAL_8250_RUNTIME_UARTS: the initial
    value of 8250_core.c's nr_uarts, read from vmlinux), or None without the 8250 driver.
    The `8250.nr_uarts=` boot argument can lower it at run time."""
    if not kernel.vmlinux.has_symbol("nr_uarts"):
        return None
    return int.from_bytes(kernel.vmlinux.read(kernel.vmlinux.symbol("nr_uarts"), 4), "little")


def command_channel(kernel: Kernel) -> str:
    """The port the guest's agent will talk on: "ttyS1", its own, or "ttyS0", the kernel's console."""
    return "ttyS1" if (serial_ports(kernel) or 0) >= 2 else "ttyS0"


def _second_port(kernel: Kernel) -> Finding:
    ports = serial_ports(kernel)
    how = ("no nr_uarts in vmlinux" if ports is None
           else f"{ports} 8250 port{'s' if ports != 1 else ''} (nr_uarts in vmlinux): the agent's channel is "
                f"{command_channel(kernel)}")
    return Finding("CONFIG_SERIAL_8250_RUNTIME_UARTS >= 2", (ports or 0) >= 2, how,
                   SHARED_LINE_COST + " (nothing skips)")


def _dispatch(kernel: Kernel) -> Finding:
    present = kernel.vmlinux.has_symbol("x64_sys_call")
    how = ("x64_sys_call: do_syscall_64 dispatches by a switch (BHI changes, 6.9 / 6.1.85)" if present
           else "no x64_sys_call: do_syscall_64 calls through sys_call_table")
    return Finding("dispatch", True, how, "")


def _fred(kernel: Kernel) -> Finding:
    built = kernel.vmlinux.has_symbol("asm_fred_entrypoint_user")
    how = ("built with FRED: SYSCALL takes the FRED entry only where the CPU enables it (CR4.FRED); the LSTAR "
           "tests skip only there, and QEMU 7.2's TCG has no FRED" if built else "built without FRED: the LSTAR path")
    return Finding("CONFIG_X86_FRED", True, how, "")


def lacking(findings: list[Finding]) -> list[Finding]:
    """The findings of features the kernel lacks."""
    return [finding for finding in findings if not finding.present]

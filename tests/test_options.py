"""The plugin's options and usage errors, through a real pytest run (pytester, subprocess)."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest

from pytest_syscall_irl.kernel.build import reference_kernel

USES_KERNEL = "def test_k(kernel):\n    pass\n"


def _fake_bzimage(path: Path, version: str) -> Path:
    data = bytearray(0x1000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x20E, 0x600)
    data[0x800:0x800 + len(version) + 1] = version.encode() + b"\0"
    # The CRC-32 trailer (arch/x86/boot/tools/build.c) of its 5 sectors (setup_sects 0, syssize 0).
    struct.pack_into("<I", data, 0xA00 - 4, zlib.crc32(data[: 0xA00 - 4]) ^ 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def _usage_error(pytester: pytest.Pytester, *args: str) -> str:
    pytester.makepyfile(test_x=USES_KERNEL)
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert "Traceback" not in err and "ERROR:" in err
    return err


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_missing_kernel_file(pytester: pytest.Pytester, workers: list[str]) -> None:
    err = _usage_error(pytester, "--kernel=nope/bzImage", *workers)
    assert "nope/bzImage" in err


def test_text_file_is_not_a_bzimage(pytester: pytest.Pytester) -> None:
    (pytester.path / "notes.txt").write_text("hello\n")
    err = _usage_error(pytester, "--kernel=notes.txt")
    assert "notes.txt" in err and "bzImage" in err


def test_elf_file_as_kernel_points_at_bzimage(pytester: pytest.Pytester) -> None:
    shutil.copy("/bin/true", pytester.path / "vmlinux")
    err = _usage_error(pytester, "--kernel=vmlinux")
    assert "ELF" in err and "bzImage" in err


def test_no_vmlinux_found_asks_for_vmlinux(pytester: pytest.Pytester) -> None:
    _fake_bzimage(pytester.path / "bzImage", "6.1.0 (a@b) #1 SMP")
    err = _usage_error(pytester, "--kernel=bzImage")
    assert "--syscall-irl-vmlinux" in err


def test_ini_twin_is_read_and_named(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsyscall_irl_kernel = from-ini/bzImage\n")
    err = _usage_error(pytester)
    assert "from-ini/bzImage" in err


@pytest.mark.integration
def test_missing_qemu_and_gdb(pytester: pytest.Pytester) -> None:
    kernel = _reference_or_skip()
    err = _usage_error(pytester, f"--kernel={kernel}", "--syscall-irl-qemu=no-such-qemu")
    assert "no-such-qemu" in err and "apt-get install qemu-system-x86" in err
    err = _usage_error(pytester, f"--kernel={kernel}", "--syscall-irl-gdb=/no/such/gdb")
    assert "/no/such/gdb" in err and "--syscall-irl-gdb" in err


@pytest.mark.integration
@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
@pytest.mark.parametrize("option, says", [
    ("--syscall-irl-qemu=/bin/false", "/bin/false is not a QEMU system emulator"),
    ("--syscall-irl-gdb=/bin/false", "/bin/false is not a GDB that speaks MI 3"),
    ('--syscall-irl-boot-args=foo="bar quiet', "unbalanced double quote"),
])
def test_impostor_programs_and_bad_boot_args(pytester: pytest.Pytester, option: str, says: str,
                                              workers: list[str]) -> None:
    err = _usage_error(pytester, f"--kernel={_reference_or_skip()}", option, *workers)
    assert says in err


@pytest.mark.integration
def test_a_truncated_bzimage_is_a_usage_error(pytester: pytest.Pytester) -> None:
    kernel = _reference_or_skip()
    (pytester.path / "bzImage").write_bytes(kernel.read_bytes()[:100_000])
    err = _usage_error(pytester, "--kernel=bzImage", f"--syscall-irl-vmlinux={kernel.parent / 'vmlinux'}")
    assert "bzImage is truncated: 100000 bytes" in err


@pytest.mark.integration
def test_a_bad_ini_value_names_the_ini_file(pytester: pytest.Pytester) -> None:
    pytester.makeini(f"[pytest]\nsyscall_irl_kernel = {_reference_or_skip()}\nsyscall_irl_gdb = /bin/false\n")
    err = _usage_error(pytester)
    assert f"syscall_irl_gdb = /bin/false in {pytester.path / 'tox.ini'}" in err


@pytest.mark.integration
def test_vmlinux_of_another_build_is_rejected(pytester: pytest.Pytester) -> None:
    kernel = _reference_or_skip()
    _fake_bzimage(pytester.path / "bzImage", "6.1.0 (someone@elsewhere) #7 SMP Tue Jan 1 00:00:00 UTC 2030")
    err = _usage_error(pytester, "--kernel=bzImage", f"--syscall-irl-vmlinux={kernel.parent / 'vmlinux'}")
    assert "someone@elsewhere" in err


@pytest.mark.integration
def test_stripped_vmlinux_is_rejected(pytester: pytest.Pytester, tmp_path: Path) -> None:
    kernel = _reference_or_skip()
    stripped = tmp_path / "vmlinux"
    import subprocess

    subprocess.run(["strip", "-o", str(stripped), str(kernel.parent / "vmlinux")], check=True)
    err = _usage_error(pytester, f"--kernel={kernel}", f"--syscall-irl-vmlinux={stripped}")
    assert "symbols" in err


@pytest.mark.integration
def test_kaslr_boot_arg_is_rejected(pytester: pytest.Pytester) -> None:
    kernel = _reference_or_skip()
    err = _usage_error(pytester, f"--kernel={kernel}", "--syscall-irl-boot-args=quiet kaslr")
    assert "kaslr" in err


def test_bad_accel_choice(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x=USES_KERNEL)
    result = pytester.runpytest_subprocess("--syscall-irl-accel=fast")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid choice" in result.stderr.str()


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_no_kernel_anywhere_is_a_usage_error_only_when_needed(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, workers: list[str]) -> None:
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(pytester.path / "empty-cache"))
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    assert pytester.runpytest_subprocess(*workers).ret == pytest.ExitCode.OK
    pytester.makepyfile(test_x=USES_KERNEL)
    result = pytester.runpytest_subprocess(*workers)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert "no kernel to test" in out and "syscall-irl kernel build" in out
    assert "Traceback" not in out and "INTERNALERROR" not in out


def _reference_or_skip() -> Path:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    return kernel


@pytest.mark.integration
@pytest.mark.parametrize("args, ini, restored", [
    ([], "", True),
    (["--syscall-irl-no-snapshots"], "", False),
    ([], "syscall_irl_snapshots = false", False),
])
def test_guests_restore_from_snapshot_unless_told_not_to(pytester: pytest.Pytester, args: list[str], ini: str,
                                                          restored: bool) -> None:
    _reference_or_skip()
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x=f"def test_g(guest):\n    assert guest.restored is {restored}\n"
                               f"    assert guest.run('echo up').output == 'up\\n'\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["syscall-irl: guests restored*" if restored else "syscall-irl: guests cold-booted*"])


HEAVY = ("qemu.qmp", "pexpect", "pycdlib", "pygdbmi", "pytest_syscall_irl.lab.guest",
         "pytest_syscall_irl.machine.gdbmi")
REPORT_MODULES = """
import sys

def pytest_sessionfinish(session):
    loaded = [name for name in {heavy!r} if name in sys.modules]
    print("heavy modules:", ",".join(loaded) or "none")
"""


def test_a_run_without_kernel_tests_loads_no_qemu_or_gdb_modules(pytester: pytest.Pytester) -> None:
    # The plugin is loaded by every pytest run of its environment. (The report header,
    # which -q leaves out, does resolve the default kernel and loads them.)
    pytester.makeconftest(REPORT_MODULES.format(heavy=HEAVY))
    pytester.makepyfile(test_x="def test_fails():\n    assert 1 == 2\n")
    result = pytester.runpytest_subprocess("-s", "-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*heavy modules: none*"])


def test_one_vmlinux_for_several_kernels_is_a_usage_error(pytester: pytest.Pytester) -> None:
    err = _usage_error(pytester, "--kernel=a/bzImage", "--kernel=b/bzImage", "--syscall-irl-vmlinux=a/vmlinux")
    assert "one --syscall-irl-vmlinux for several kernels" in err
    assert "one --syscall-irl-vmlinux per --syscall-irl-kernel" in err


def test_modules_must_pair_with_the_kernels(pytester: pytest.Pytester) -> None:
    err = _usage_error(pytester, "--kernel=a/bzImage", "--kernel=b/bzImage", *["--syscall-irl-modules=none"] * 3)
    assert "--syscall-irl-modules given 3 times for 2 kernels" in err


def test_a_module_directory_without_modules_dep_is_a_usage_error(pytester: pytest.Pytester) -> None:
    kernel = _reference_or_skip()
    (pytester.path / "mods").mkdir()
    err = _usage_error(pytester, f"--kernel={kernel}", "--syscall-irl-modules=mods")
    assert "mods has no modules.dep" in err and "--syscall-irl-modules=none" in err


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_each_test_runs_once_per_kernel_named_in_ids_header_and_junit(pytester: pytest.Pytester,
                                                                      workers: list[str]) -> None:
    kernel = _reference_or_skip()
    release = kernel.parent.joinpath("complete").read_text().split('"version": "')[1].split(" ")[0]
    pytester.makepyfile(test_x="def test_k(kernel):\n    print('release', kernel.release)\n"
                               "def test_plain():\n    pass\n")
    # The same kernel twice stands for a patched kernel and its base: same release, two ids.
    result = pytester.runpytest_subprocess(f"--kernel={kernel}", f"--kernel={kernel}", "--syscall-irl-modules=none",
                                           "-v", "--junitxml=junit.xml", *workers)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines([f"syscall-irl: kernel[{release}@1] {release} ({kernel})",
                                 f"syscall-irl: kernel[{release}@2] {release} ({kernel})"])
    result.assert_outcomes(passed=3)  # test_plain runs once: it uses no kernel
    result.stdout.fnmatch_lines_random([f"*test_x.py::test_k?{release}@1?*", f"*test_x.py::test_k?{release}@2?*"])
    junit = (pytester.path / "junit.xml").read_text()
    for n in (1, 2):
        assert f'<property name="syscall-irl kernel[{release}@{n}] release" value="{release}"' in junit, junit
        assert f'<property name="syscall-irl kernel[{release}@{n}] bzImage" value="{kernel}"' in junit, junit

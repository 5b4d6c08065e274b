"""Bad input caught before a guest boots, and damaged caches built again, never trusted:
boot arguments read as the kernel reads them, QEMU and GDB proven what they claim to
be (on the real programs), and each cached artifact given a damaged copy."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_syscall_irl.core import cache
from pytest_syscall_irl.lab import accel

from pytest_syscall_irl.kernel import build as kernel_build

from pytest_syscall_irl.machine import programs
from pytest_syscall_irl.core.errors import ConfigError, SyscallIrlWarning
from pytest_syscall_irl.lab.accel import kvm_verdict
from pytest_syscall_irl.lab.settings import check_boot_args
from pytest_syscall_irl.kernel.artifacts import split_cmdline
from pytest_syscall_irl.kernel.build import KernelBuild, reference_damage
from pytest_syscall_irl.core.cache import CacheEntry, check_cache_dir

# --- boot arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, pairs", [
    ("quiet pti=on", [("quiet", None), ("pti", "on")]),
    ('dyndbg="file x.c +p" quiet', [("dyndbg", "file x.c +p"), ("quiet", None)]),
    ('"foo=a b" x', [("foo", "a b"), ("x", None)]),  # lib/cmdline.c: a quote may open the word
    ("  a   b=  ", [("a", None), ("b", "")]),
])
def test_cmdline_is_split_as_the_kernel_splits_it(text: str, pairs: list[tuple[str, str | None]]) -> None:
    assert split_cmdline(text) == pairs


def test_an_unbalanced_quote_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unbalanced double quote in 'foo=\"bar quiet'"):
        check_boot_args('foo="bar quiet')


@pytest.mark.parametrize("args, refused", [
    ("kaslr", "kaslr"), ("quiet kaslr", "kaslr"), ("rdinit=/bin/sh", "rdinit"), ("console=tty0", "console=tty0"),
])
def test_arguments_that_undo_the_lab_are_refused(args: str, refused: str) -> None:
    with pytest.raises(ConfigError, match=refused):
        check_boot_args(args)


@pytest.mark.parametrize("args", ["nokaslr", 'x="kaslr"', 'dyndbg="kaslr rdinit"', "console=ttyS0,115200", ""])
def test_words_inside_values_are_not_parameters(args: str) -> None:
    check_boot_args(args)


# --- QEMU and GDB, the real ones and impostors -------------------------------------------------


@pytest.fixture(autouse=True)
def _no_remembered_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(programs, "_verdicts", {})


def test_the_real_qemu_and_gdb_pass(tmp_path: Path) -> None:
    qemu, version = programs.check_qemu("qemu-system-x86_64", tmp_path)
    assert qemu == shutil.which("qemu-system-x86_64") and version.startswith("QEMU emulator version ")
    gdb, version = programs.check_gdb("gdb", tmp_path)
    assert gdb == shutil.which("gdb") and version.startswith("GNU gdb")


@pytest.mark.parametrize("check", [programs.check_qemu, programs.check_gdb])
@pytest.mark.parametrize("impostor", ["/bin/false", "/bin/true", "/bin/cat"])
def test_impostors_are_refused_with_the_fix(check: Any, impostor: str) -> None:
    with pytest.raises(ConfigError, match=rf"{impostor} is not a .*apt-get install"):
        check(impostor)


@pytest.mark.skipif(shutil.which("qemu-system-i386") is None, reason="qemu-system-i386 not installed")
def test_a_qemu_of_another_target_is_refused() -> None:
    with pytest.raises(ConfigError, match="emulates i386, not x86_64"):
        programs.check_qemu("qemu-system-i386")


def test_a_file_that_is_not_executable_says_so(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_text("")
    with pytest.raises(ConfigError, match=r"--syscall-irl-qemu .* is not executable: chmod \+x"):
        programs.check_qemu(str(tmp_path / "qemu"))


def test_a_verdict_is_kept_per_binary_and_a_damaged_record_asks_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    programs.check_qemu("qemu-system-x86_64", tmp_path)
    monkeypatch.setattr(programs, "_verdicts", {})  # a new process: only the record on disk
    monkeypatch.setattr(programs, "_qemu_verdict", lambda qemu: pytest.fail("asked QEMU again"))
    assert programs.check_qemu("qemu-system-x86_64", tmp_path)[1].startswith("QEMU emulator version")
    monkeypatch.setattr(programs, "_verdicts", {})
    [record] = (tmp_path / "checked-programs").glob("*.json")
    record.write_text(record.read_text()[:10])
    asked: list[str] = []
    monkeypatch.setattr(programs, "_qemu_verdict", lambda qemu: asked.append(qemu) or "QEMU again")
    with pytest.warns(SyscallIrlWarning, match=r"checked-programs/.* is damaged \(it does not parse\)"):
        assert programs.check_qemu("qemu-system-x86_64", tmp_path)[1] == "QEMU again" and asked


def test_a_program_given_as_qemu_and_as_gdb_is_asked_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(programs, "_qemu_verdict", lambda qemu: "QEMU")
    monkeypatch.setattr(programs, "_gdb_verdict", lambda gdb: "GDB")
    assert programs.check_qemu("/bin/true", tmp_path)[1] == "QEMU"
    monkeypatch.setattr(programs, "_verdicts", {})
    assert programs.check_gdb("/bin/true", tmp_path)[1] == "GDB"
    assert len(list((tmp_path / "checked-programs").glob("*.json"))) == 2


# --- cached artifacts --------------------------------------------------------------------------


def _build_once(directory: Path, builds: list[int]) -> None:
    def build(staging: Path) -> None:
        builds.append(1)
        (staging / "initramfs.cpio.gz").write_bytes(b"x" * 1000)

    CacheEntry(directory, "guest image").ensure(build)


@pytest.mark.parametrize("damage", [
    lambda d: (d / "initramfs.cpio.gz").write_bytes(b"x" * 500),  # truncated
    lambda d: (d / "initramfs.cpio.gz").write_bytes(b"y" * 1000),  # same size, other bytes
    lambda d: (d / "initramfs.cpio.gz").unlink(),
    lambda d: (d / "MANIFEST.json").write_text("{"),
    lambda d: (d / "stray").write_text(""),
])
def test_a_damaged_cached_directory_is_built_again_with_a_warning(tmp_path: Path, damage: Any) -> None:
    builds: list[int] = []
    directory = tmp_path / "images" / "k"
    _build_once(directory, builds)
    _build_once(directory, builds)
    assert len(builds) == 1
    damage(directory)
    with pytest.warns(SyscallIrlWarning, match=r"images/k is damaged \(.*\): building it again"):
        _build_once(directory, builds)
    assert len(builds) == 2 and (directory / "initramfs.cpio.gz").read_bytes() == b"x" * 1000
    assert sorted(p.name for p in directory.parent.iterdir()) == ["k", "k.lock"]  # the damaged copy is gone


def _lab_settings(tmp_path: Path) -> Any:
    kernel = SimpleNamespace(bzimage=SimpleNamespace(path=tmp_path / "bzImage"))
    return SimpleNamespace(cache=tmp_path, qemu="/usr/bin/qemu-system-x86_64", kernel=kernel)


@pytest.mark.parametrize("marker_text", ["", "kv", "maybe\nwho knows", "kvm\n"])
def test_a_damaged_kvm_probe_marker_is_probed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker_text: str) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    probes: list[str] = []
    monkeypatch.setattr(accel, "kvm_probe", lambda qemu, kernel: probes.append(qemu) or (False, "printed nothing"))
    settings = _lab_settings(tmp_path)
    assert kvm_verdict(settings) == (False, "printed nothing") and len(probes) == 1
    assert kvm_verdict(settings) == (False, "printed nothing") and len(probes) == 1  # the marker is used
    [marker] = [p for p in (tmp_path / "kvm-probe").iterdir() if not p.name.endswith(".lock")]
    marker.write_text(marker_text)
    with pytest.warns(SyscallIrlWarning, match=r"KVM probe marker .* is damaged"):
        assert kvm_verdict(settings) == (False, "printed nothing") and len(probes) == 2


def test_explicit_kvm_where_the_probe_failed_is_refused_quoting_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_verdict", lambda settings: (False, "a KVM guest printed nothing within 10 s"))
    settings = SimpleNamespace(accel="kvm")
    with pytest.raises(ConfigError, match=r"KVM does not work here: a KVM guest printed nothing within 10 s; "
                                          r"use --syscall-irl-accel=tcg"):
        accel.check_accel(settings)  # type: ignore[arg-type]


def _complete_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KernelBuild:
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: "6.1.192-2")
    build = KernelBuild(cache=tmp_path)
    build.directory.mkdir(parents=True)
    for name in kernel_build.ARTIFACTS:
        (build.directory / name).write_bytes(name.encode() * 100)
    build.entry.seal({})
    return build


@pytest.mark.parametrize("name", ["bzImage", "vmlinux"])
def test_a_damaged_kernel_build_is_not_the_reference_kernel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    build = _complete_build(tmp_path, monkeypatch)
    assert build.is_complete() and reference_damage(tmp_path) is None
    path = build.directory / name
    path.write_bytes(path.read_bytes()[:50])
    assert not build.is_complete()
    assert build.damage() == f"{name} has 50 bytes, {len(name) * 100} when it was made"
    assert kernel_build.reference_kernel(tmp_path) is None
    assert "run `syscall-irl kernel build` to build it again" in str(reference_damage(tmp_path))


def test_a_bzimage_of_the_same_size_with_other_bytes_is_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _complete_build(tmp_path, monkeypatch)
    stat = build.bzimage.stat()
    build.bzimage.write_bytes(b"X" * stat.st_size)
    os.utime(build.bzimage, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build.damage() == "bzImage has changed since it was made (SHA-256 differs)"


def test_a_vmlinux_of_the_same_size_written_again_is_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _complete_build(tmp_path, monkeypatch)
    build.vmlinux.write_bytes(bytes(b ^ 0xFF for b in build.vmlinux.read_bytes()))
    assert build.damage() == "vmlinux has changed since it was made (SHA-256 differs)"


def test_a_vmlinux_restored_with_a_new_mtime_is_the_same_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CI cache restored by tar keeps whole seconds: the vmlinux's digest says it is as built.
    build = _complete_build(tmp_path, monkeypatch)
    stat = build.vmlinux.stat()
    os.utime(build.vmlinux, ns=(stat.st_atime_ns, stat.st_mtime_ns // 10**9 * 10**9 - 10**9))
    assert build.damage() is None
    assert json.loads((build.directory / kernel_build.RECORD).read_text())["artifacts"]["vmlinux"][1] == \
        build.vmlinux.stat().st_mtime_ns  # refreshed: the next use reads nothing


def test_a_damaged_kernel_build_is_built_again_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _complete_build(tmp_path, monkeypatch)
    build.vmlinux.unlink()
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    built: list[Path] = []

    def build_into(directory: Path) -> dict[str, object]:
        built.append(directory)
        for name in kernel_build.ARTIFACTS:
            (directory / name).write_bytes(b"rebuilt")
        return {"steps": 3}

    monkeypatch.setattr(build, "_build_into", build_into)
    with pytest.warns(SyscallIrlWarning, match=r"kernel build .* is damaged \(vmlinux is missing\): building it"):
        assert build.build() == build.bzimage
    assert built == [build.directory] and build.is_complete() and build.entry.meta() == {"steps": 3}


def test_the_cache_root_and_its_check_are_the_ones_the_kernel_build_names() -> None:
    assert kernel_build.cache_dir is cache.cache_dir and kernel_build.check_cache_dir is cache.check_cache_dir


def test_a_cache_directory_that_cannot_be_written_gives_the_fix(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write to the cache directory .*SYSCALL_IRL_CACHE"):
        check_cache_dir(tmp_path / "file" / "cache")


@pytest.mark.integration
def test_a_guest_silent_on_its_console_is_reported_within_the_bound(tmp_path: Path) -> None:
    # The real QEMU and kernel with the console elsewhere and a shell instead of our init
    # (which writes to ttyS0 itself): the serial line stays silent, as under a KVM that
    # hangs before the first instruction.
    from pytest_syscall_irl.machine.console import GuestConsole
    from pytest_syscall_irl.core.errors import ConsoleError
    from pytest_syscall_irl.lab.image import build_guest_image
    from pytest_syscall_irl.machine.qemu import MachineConfig, QemuMachine

    bzimage = kernel_build.reference_kernel()
    if bzimage is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    image = build_guest_image(kernel_build.cache_dir(), payloads_on_iso=True)
    config = MachineConfig(kernel=bzimage, initrd=image.initramfs, append="console=tty0 nokaslr rdinit=/bin/sh")
    with QemuMachine(config, tmp_path / "logs") as machine:
        machine.launch()
        console = GuestConsole(machine.sockets.console)
        console.connect()
        machine.resume()
        start = time.monotonic()
        with pytest.raises(ConsoleError, match="printed nothing at all on its console within 3 s"):
            console.wait_ready(90, silence=3)
        assert time.monotonic() - start < 10
        console.close()

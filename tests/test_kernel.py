"""Kernel artifacts and the build cache: fakes first, then the cached reference kernel."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from pytest_syscall_irl.cli import main as cli

from pytest_syscall_irl.kernel import build as kernel_build
from pytest_syscall_irl.core.errors import ConfigError, KernelError
from pytest_syscall_irl.kernel.artifacts import (CRC_RESIDUE, BzImage, Kernel, Vmlinux, image_crc, parse_version_string,
                                                 version_tuple)
from pytest_syscall_irl.core.cache import cache_dir
from pytest_syscall_irl.kernel.build import KernelBuild, build_key, dropped_options, reference_kernel

VERSION = "9.9.9 (tester@fakehost) #3 SMP PREEMPT_DYNAMIC Tue Jan 1 00:00:00 UTC 2030"
BANNER = (
    "Linux version 9.9.9 (tester@fakehost) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld 2.40) "
    "#3 SMP PREEMPT_DYNAMIC Tue Jan 1 00:00:00 UTC 2030\n"
)
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to make a fake vmlinux")


def make_bzimage(path: Path, version: str = VERSION) -> Path:
    """A file with just enough of an x86 setup header for BzImage.read."""
    data = bytearray(0x4000)
    struct.pack_into("<H", data, 0x1FE, 0xAA55)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    struct.pack_into("<H", data, 0x20E, 0x3000 - 0x200)
    # setup_sects 0 (= 4): the kernel starts at 0xA00 and fills the file; its gzip payload at 0xB00.
    struct.pack_into("<I", data, 0x1F4, (len(data) - 0xA00) // 16)
    struct.pack_into("<II", data, 0x248, 0x100, 0x400)
    data[0xB00:0xB02] = b"\x1f\x8b"
    encoded = version.encode() + b"\0"
    data[0x3000 : 0x3000 + len(encoded)] = encoded
    path.write_bytes(with_crc(data))
    return path


def with_crc(data: bytearray) -> bytes:
    """*data* with the CRC-32 trailer arch/x86/boot/tools/build.c writes in its last 4 bytes."""
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(data[:-4]) ^ 0xFFFFFFFF)
    return bytes(data)


def make_vmlinux(path: Path, banner: str = BANNER, extra: str = "") -> Path:
    """A small static ELF with the symbols Vmlinux requires, linked by gcc."""
    source = path.with_suffix(".c")
    source.write_text(
        f"const char linux_banner[] = {json.dumps(banner)};\n"
        "const unsigned long sys_call_table[2] = {0x1111, 0x2222};\n"
        f"{extra}\nvoid entry_SYSCALL_64(void) {{}}\nvoid _start(void) {{}}\n"
    )
    subprocess.run(
        ["gcc", "-nostdlib", "-static", "-no-pie", "-O0", "-o", str(path), str(source)],
        check=True,
    )
    return path


@pytest.fixture
def fake_build(tmp_path: Path) -> tuple[Path, Path]:
    """A bzImage and a vmlinux from the same fake build, in a kernel tree layout."""
    boot = tmp_path / "tree" / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    return make_bzimage(boot / "bzImage"), make_vmlinux(tmp_path / "tree" / "vmlinux")


# --- BzImage ---------------------------------------------------------------------------------


def test_a_truncated_bzimage_names_the_sizes_and_the_fix(tmp_path: Path) -> None:
    path = make_bzimage(tmp_path / "bzImage")
    path.write_bytes(path.read_bytes()[:0x3800])
    with pytest.raises(ConfigError, match=r"bzImage is truncated: 14336 bytes, its setup header says 16384.*copy"):
        BzImage.read(path)


def _patched_bzimage(tmp_path: Path, offset: int, fmt: str, value: int) -> Path:
    """A fake bzImage with *value* packed (struct *fmt*) at *offset*."""
    path = make_bzimage(tmp_path / "bzImage")
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def test_a_bzimage_whose_payload_is_not_compressed_data_is_rejected(tmp_path: Path) -> None:
    path = _patched_bzimage(tmp_path, 0xB00, "<H", 0)
    with pytest.raises(ConfigError, match="compressed kernel at offset 2816 starts with 00 00.*not a gzip"):
        BzImage.read(path)


def test_a_bzimage_whose_payload_runs_past_its_end_is_rejected(tmp_path: Path) -> None:
    path = _patched_bzimage(tmp_path, 0x24C, "<I", 0x4000)  # payload_length
    with pytest.raises(ConfigError, match="does not fit in the file"):
        BzImage.read(path)


def test_an_unreadable_bzimage_says_how_to_fix_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_bzimage(tmp_path / "bzImage")

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)  # chmod 000 does not stop root, who runs CI
    with pytest.raises(ConfigError, match=r"permission denied: make it readable \(chmod a\+r .*bzImage\)"):
        BzImage.read(path)


def test_bzimage_version_is_read_from_the_setup_header(tmp_path: Path) -> None:
    image = BzImage.read(make_bzimage(tmp_path / "bzImage"))
    assert image.version == VERSION
    assert image.release == "9.9.9"
    assert image.build_id == ("9.9.9", "tester@fakehost", "#3 SMP PREEMPT_DYNAMIC Tue Jan 1 00:00:00 UTC 2030")


def test_an_elf_file_is_not_a_bzimage(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(1024))
    with pytest.raises(ConfigError, match=r"ELF file \(vmlinux\?\), --kernel wants arch/x86/boot/bzImage"):
        BzImage.read(path)


def test_a_text_file_is_not_a_bzimage(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n" * 200)
    with pytest.raises(ConfigError, match="not an x86 bzImage.*text file"):
        BzImage.read(path)


def test_a_missing_bzimage_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}/nope does not exist.*syscall-irl kernel build"):
        BzImage.read(tmp_path / "nope")


def test_a_directory_is_not_a_bzimage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        BzImage.read(tmp_path)


def test_a_bzimage_without_version_string_is_rejected(tmp_path: Path) -> None:
    path = _patched_bzimage(tmp_path, 0x20E, "<H", 0)  # kernel_version
    with pytest.raises(ConfigError, match="without a readable kernel_version"):
        BzImage.read(path)


# --- version strings -------------------------------------------------------------------------


def test_banner_parsing_copes_with_parentheses_in_the_compiler() -> None:
    build = parse_version_string(BANNER.removeprefix("Linux version "), has_compiler=True)
    assert build == ("9.9.9", "tester@fakehost", "#3 SMP PREEMPT_DYNAMIC Tue Jan 1 00:00:00 UTC 2030")
    assert build == parse_version_string(VERSION, has_compiler=False)


@pytest.mark.parametrize(
    "release, expected",
    [("6.1.192", (6, 1, 192)), ("6.8-rc1", (6, 8, 0)), ("6.1.0-13-amd64", (6, 1, 0)), ("5.4.0+", (5, 4, 0))],
)
def test_version_tuple(release: str, expected: tuple[int, int, int]) -> None:
    assert version_tuple(release) == expected


def test_version_tuple_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="cannot parse kernel release 'linux'"):
        version_tuple("linux")


# --- Vmlinux and Kernel with a fake ELF ------------------------------------------------------


def test_vmlinux_missing_or_not_elf(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Vmlinux.open(tmp_path / "vmlinux")
    (tmp_path / "vmlinux").write_text("not an elf\n")
    with pytest.raises(ConfigError, match="is not an ELF file"):
        Vmlinux.open(tmp_path / "vmlinux")


@needs_gcc
def test_vmlinux_symbols_and_static_contents(tmp_path: Path) -> None:
    vmlinux = Vmlinux.open(make_vmlinux(tmp_path / "vmlinux"))
    assert vmlinux.banner == BANNER
    assert vmlinux.release == "9.9.9"
    assert vmlinux.read(vmlinux.symbol("sys_call_table"), 16) == struct.pack("<QQ", 0x1111, 0x2222)
    assert vmlinux.has_symbol("entry_SYSCALL_64") and not vmlinux.has_symbol("nope")
    assert ".symtab" in vmlinux.section_names and not vmlinux.has_dwarf
    with pytest.raises(KernelError, match="no symbol 'nope'"):
        vmlinux.symbol("nope")
    with pytest.raises(KernelError, match="not in a loadable segment"):
        vmlinux.read(0xDEAD0000, 8)


@needs_gcc
def test_an_elf_without_kernel_symbols_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "true.c"
    path.write_text("void _start(void) {}\n")
    subprocess.run(["gcc", "-nostdlib", "-static", "-o", str(tmp_path / "elf"), str(path)], check=True)
    with pytest.raises(ConfigError, match=r"vmlinux without symbols \(stripped\?\): no entry_SYSCALL_64, linux_banner"):
        Vmlinux.open(tmp_path / "elf")


@needs_gcc
def test_kernel_load_finds_vmlinux_in_the_build_tree(fake_build: tuple[Path, Path]) -> None:
    bzimage, vmlinux = fake_build
    loaded = Kernel.load(bzimage)
    assert loaded.vmlinux.path == vmlinux
    assert loaded.release == "9.9.9" and loaded.version_tuple == (9, 9, 9)
    assert not loaded.payloads_on_iso
    assert loaded.missing_for_iso == ["CONFIG_ISO9660_FS", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_PCI"]


@needs_gcc
def test_kernel_load_finds_vmlinux_beside_the_bzimage(tmp_path: Path) -> None:
    bzimage = make_bzimage(tmp_path / "bzImage")
    extra = "int iso9660_fs_type, virtio_blk, virtio_pci_driver;"
    vmlinux = make_vmlinux(tmp_path / "vmlinux", extra=extra)
    loaded = Kernel.load(bzimage)
    assert loaded.vmlinux.path == vmlinux
    assert loaded.payloads_on_iso


def test_kernel_load_without_vmlinux_says_pass_vmlinux(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no vmlinux found .* pass --vmlinux"):
        Kernel.load(make_bzimage(tmp_path / "bzImage"))


@needs_gcc
def test_kernel_load_rejects_a_vmlinux_of_another_build(tmp_path: Path) -> None:
    bzimage = make_bzimage(tmp_path / "bzImage")
    other = make_vmlinux(tmp_path / "other", banner=BANNER.replace("#3 SMP", "#4 SMP"))
    with pytest.raises(ConfigError, match="different builds") as info:
        Kernel.load(bzimage, other)
    assert "#3 SMP" in str(info.value) and "#4 SMP" in str(info.value)


# --- config fragments, keys, cache dir -------------------------------------------------------


FRAGMENT = """\
# a comment
CONFIG_64BIT=y
CONFIG_RELOCATABLE=y
CONFIG_RANDOMIZE_BASE=y
CONFIG_CMDLINE="console=ttyS0"
# CONFIG_MODULES is not set
"""


def test_dropped_options_lists_what_olddefconfig_dropped() -> None:
    final = """\
CONFIG_64BIT=y
# CONFIG_RANDOMIZE_BASE is not set
CONFIG_CMDLINE="console=tty0"
CONFIG_MODULES=y
"""
    assert dropped_options(FRAGMENT, final) == [
        "CONFIG_RELOCATABLE=y (final .config: is not set)",
        "CONFIG_RANDOMIZE_BASE=y (final .config: is not set)",
        'CONFIG_CMDLINE="console=ttyS0" (final .config: "console=tty0")',
        "CONFIG_MODULES=n (final .config: y)",
    ]


def test_dropped_options_is_empty_when_everything_survived() -> None:
    final = 'CONFIG_64BIT=y\nCONFIG_RELOCATABLE=y\nCONFIG_RANDOMIZE_BASE=y\nCONFIG_CMDLINE="console=ttyS0"\n'
    assert dropped_options(FRAGMENT, final) == []


def test_cache_key_changes_with_the_fragment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: "6.1.192-2")
    monkeypatch.setattr(kernel_build, "compiler_id", lambda: "gcc (Debian 12.2.0-14) 12.2.0")
    first, second = tmp_path / "a.config", tmp_path / "b.config"
    first.write_text("CONFIG_64BIT=y\n")
    second.write_text("CONFIG_64BIT=y\nCONFIG_SMP=y\n")
    key_a = KernelBuild(fragment=first, cache=tmp_path).key
    assert key_a == KernelBuild(fragment=first, cache=tmp_path / "elsewhere").key
    assert key_a != KernelBuild(fragment=second, cache=tmp_path).key
    assert len(key_a) == 16
    assert key_a == build_key("debian-linux-source-6.1=6.1.192-2", "CONFIG_64BIT=y\n", "gcc (Debian 12.2.0-14) 12.2.0")


def test_cache_key_changes_with_the_compiler_and_source() -> None:
    base = build_key("src=1", "CONFIG_64BIT=y\n", "gcc 12")
    assert base != build_key("src=1", "CONFIG_64BIT=y\n", "gcc 13")
    assert base != build_key("src=2", "CONFIG_64BIT=y\n", "gcc 12")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("SYSCALL_IRL_CACHE", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "pytest-syscall-irl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pytest-syscall-irl"
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_a_complete_debian_build_is_reused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: "6.1.192-2")
    output: list[str] = []
    build = KernelBuild(cache=tmp_path, on_output=output.append)
    assert reference_kernel(tmp_path) is None
    build.directory.mkdir(parents=True)
    for name in ("bzImage", "vmlinux"):
        (build.directory / name).write_text("")
    build.entry.seal({})
    assert build.build() == tmp_path / "kernels" / build.key / "bzImage"
    assert output == []
    assert reference_kernel(tmp_path) == build.bzimage


def test_no_reference_kernel_without_debian_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: None)
    assert reference_kernel(tmp_path) is None
    with pytest.raises(KernelError, match="apt-get install linux-source-6.1"):
        KernelBuild(cache=tmp_path).build()


# --- KernelBuild with a fake kernel tree -----------------------------------------------------


def make_fake_tree(tmp_path: Path, bzimage: Path, vmlinux: Path, dropping: str = "") -> Path:
    """A "source tree" whose Makefile and merge_config.sh mimic the kernel's just enough."""
    tree = tmp_path / "src"
    (tree / "arch" / "x86").mkdir(parents=True)
    (tree / "scripts" / "kconfig").mkdir(parents=True)
    merge = tree / "scripts" / "kconfig" / "merge_config.sh"
    merge.write_text('#!/bin/sh\n# -m -O OBJ OBJ/.config FRAGMENT\ncat "$5" >> "$4"\n')
    merge.chmod(merge.stat().st_mode | stat.S_IXUSR)
    rules = {
        "kernelversion": ["@echo 9.9.9"],
        "tinyconfig": ["@echo CONFIG_64BIT=y > $(O)/.config"],
        "olddefconfig": [f"@sed -i '/{dropping or 'NOTHING'}/d' $(O)/.config", "@echo configured"],
        "bzImage": [
            "@echo '  CC      init/main.o'",
            "@echo '  LD      vmlinux'",
            "@mkdir -p $(O)/arch/x86/boot",
            f"cp {bzimage} $(O)/arch/x86/boot/bzImage",
            f"cp {vmlinux} $(O)/vmlinux",
        ],
    }
    (tree / "Makefile").write_text(
        "".join(f"{target}:\n" + "".join(f"\t{line}\n" for line in lines) for target, lines in rules.items())
    )
    return tree


@needs_gcc
def test_a_tree_build_runs_every_step_and_fills_the_cache(tmp_path: Path, fake_build: tuple[Path, Path]) -> None:
    tree = make_fake_tree(tmp_path, *fake_build)
    fragment = tmp_path / "frag.config"
    fragment.write_text("CONFIG_SMP=y\n")
    stages: list[str] = []
    output: list[str] = []
    build = KernelBuild(
        tree, fragment, jobs=1, cache=tmp_path / "cache", on_stage=stages.append, on_output=output.append
    )
    assert build.build() == build.bzimage
    assert (build.directory / "complete").is_file() and build.vmlinux.is_file()
    assert (build.directory / "config").read_text() == "CONFIG_64BIT=y\nCONFIG_SMP=y\n"
    assert "configured" in output
    assert "$ make -C" in build.log_path.read_text()
    assert Kernel.load(build.bzimage).release == "9.9.9"
    stages.clear()
    build.build()  # an explicit tree is always re-made
    assert any(stage.startswith("configuring") for stage in stages)


@needs_gcc
def test_a_dropped_option_fails_the_build(tmp_path: Path, fake_build: tuple[Path, Path]) -> None:
    tree = make_fake_tree(tmp_path, *fake_build, dropping="RANDOMIZE_BASE")
    fragment = tmp_path / "frag.config"
    fragment.write_text("CONFIG_RANDOMIZE_BASE=y\nCONFIG_SMP=y\n")
    build = KernelBuild(tree, fragment, cache=tmp_path / "cache")
    with pytest.raises(
        KernelError, match=r"did not survive.*\n  CONFIG_RANDOMIZE_BASE=y \(final .config: is not set\)$"
    ):
        build.build()
    assert not build.is_complete()


@needs_gcc
def test_a_failing_step_reports_command_exit_code_and_log(tmp_path: Path, fake_build: tuple[Path, Path]) -> None:
    tree = make_fake_tree(tmp_path, *fake_build)
    (tree / "Makefile").write_text("kernelversion:\n\t@echo 9.9.9\ntinyconfig:\n\t@echo broken tinyconfig; exit 3\n")
    build = KernelBuild(tree, cache=tmp_path / "cache")
    with pytest.raises(KernelError) as info:
        build.build()
    assert info.value.exit_code == 2  # make's own status when a recipe fails
    assert info.value.command is not None and info.value.command[-1] == "tinyconfig"
    assert info.value.log_tail is not None and "broken tinyconfig" in info.value.log_tail


def test_a_tree_that_is_not_a_kernel_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a Linux source tree"):
        KernelBuild(tmp_path, cache=tmp_path / "cache").build()


# --- cli -------------------------------------------------------------------------------------


def test_cli_kernel_path_without_a_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(tmp_path))
    assert cli.main(["kernel", "path"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "syscall-irl kernel build" in captured.err


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kernel", "build", "--config", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("syscall-irl: error: cannot read config fragment") and "Traceback" not in err


@pytest.fixture
def debian_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's linux-source and gcc as if installed, whatever this machine has."""
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: "6.12.117-1")
    monkeypatch.setattr(kernel_build, "compiler_id", lambda: "gcc (Debian 12.2.0-14) 12.2.0")


def test_cli_kernel_path_without_that_build_suggests_building_it_with_the_same_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], debian_source: None
) -> None:
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(tmp_path / "cache"))
    fragment = tmp_path / "my fragment.config"
    fragment.write_text("CONFIG_X86_FRED=y\n")
    assert cli.main(["kernel", "path", "--debian", "6.12", "--config", str(fragment)]) == 1
    err = capsys.readouterr().err
    assert f"`syscall-irl kernel build --debian 6.12 --config '{fragment}'`" in err, err


def test_cli_exit_status_2_is_a_wrong_request_1_is_failed_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as wrong:
        cli.main(["kernel", "build", "--no-such-option"])
    assert wrong.value.code == 2

    def failing(self: KernelBuild) -> Path:
        raise KernelError("kernel build step failed", exit_code=2)

    monkeypatch.setattr(KernelBuild, "build", failing)
    assert cli.main(["kernel", "build", "--quiet"]) == 1
    assert "syscall-irl: error: kernel build step failed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "exit status: 0 done; 1 the work failed" in " ".join(capsys.readouterr().out.split())


def test_cli_version_is_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    # An editable install's metadata is as old as its last `pip install -e`; tests/test_packaging.py
    # checks that a built wheel says __version__.
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"syscall-irl {importlib.metadata.version('pytest-syscall-irl')}\n"


def test_cli_failed_logs_of_a_missing_report_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["failed-logs", str(tmp_path / "junit.xml"), str(tmp_path / "logs")]) == 2
    assert f"cannot read the JUnit report {tmp_path / 'junit.xml'}" in capsys.readouterr().err
    (tmp_path / "junit.xml").write_text("<testsuites><testsuite>")  # cut short: pytest was killed
    assert cli.main(["failed-logs", str(tmp_path / "junit.xml"), str(tmp_path / "logs")]) == 2
    assert not (tmp_path / "logs").exists()


def test_cli_dry_run_prints_the_build_and_its_key_and_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], debian_source: None
) -> None:
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    assert cli.main(["kernel", "build", "--dry-run", "--base", "defconfig"]) == 0
    out = capsys.readouterr().out.splitlines()
    build = KernelBuild(base="defconfig", cache=tmp_path / "cache")
    assert out[0] == "syscall-irl kernel build --dry-run: nothing is built"
    assert f"fragment: {kernel_build.needs_fragment()}" in out and f"key: {build.key}" in out
    assert "state: to build (not built)" in out and not (tmp_path / "cache" / "kernels").exists()
    # --config "" is the default fragment (a CI matrix's entry without one).
    assert cli.main(["kernel", "build", "--dry-run", "--config", ""]) == 0
    assert f"fragment: {kernel_build.default_fragment()}" in capsys.readouterr().out.splitlines()


def test_cli_dry_run_without_the_source_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: None)
    assert cli.main(["kernel", "build", "-n", "--debian", "6.12"]) == 0
    assert "key: unknown (linux-source-6.12 is not installed: apt-get install linux-source-6.12)" in \
        capsys.readouterr().out
    assert cli.main(["kernel", "build", "-n", "--config", str(tmp_path / "nope")]) == 2


def test_cli_finds_the_shipped_fragments_by_the_names_the_readme_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], debian_source: None
) -> None:
    monkeypatch.chdir(tmp_path)  # no guest/ here: an installed package's user
    assert cli.main(["kernel", "build", "-n", "--config", "guest/kernel.config", "--config", "fred.config"]) == 0
    out = capsys.readouterr().out.splitlines()
    guest = kernel_build.default_fragment().parent
    assert f"fragment: {guest / 'kernel.config'}" in out and f"fragment: {guest / 'fred.config'}" in out
    # A file of that name in the working directory is the user's, and wins.
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest" / "fred.config").write_text("CONFIG_X86_FRED=y\n")
    assert cli.main(["kernel", "build", "-n", "--config", "guest/fred.config"]) == 0
    assert "fragment: guest/fred.config" in capsys.readouterr().out.splitlines()


@needs_gcc
def test_cli_kernel_build_prints_progress_then_the_path(
    tmp_path: Path,
    fake_build: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(tmp_path / "cache"))
    tree = make_fake_tree(tmp_path, *fake_build)
    assert cli.main(["kernel", "build", "--tree", str(tree), "--jobs", "1"]) == 0
    captured = capsys.readouterr()
    path = Path(captured.out.strip())
    assert path.name == "bzImage" and path.is_relative_to(tmp_path / "cache" / "kernels")
    assert "==> building bzImage with 1 jobs" in captured.err
    # make's own output is in the log, not on the screen: a progress line counts its steps.
    assert "configured" not in captured.err and "building: 1 steps, 0:00 elapsed" in captured.err
    assert f"==> full make output: {path.parent / 'build.log'}" in captured.err
    assert "configured" in (path.parent / "build.log").read_text()
    # The next build of the same fragment knows the total (2 steps) and gives an ETA.
    assert cli.main(["kernel", "build", "--tree", str(tree), "--jobs", "1"]) == 0
    assert "building: 1/~2 steps (50%)" in capsys.readouterr().err
    assert cli.main(["kernel", "build", "--tree", str(tree), "--make-output"]) == 0
    assert "configured" in capsys.readouterr().err


# --- the real reference kernel ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Kernel:
    """The cached reference kernel (`syscall-irl kernel build`)."""
    path = reference_kernel()
    if path is None:
        message = "no reference kernel in the cache: run `syscall-irl kernel build`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Kernel.load(path)


@pytest.mark.integration
def test_reference_vmlinux_is_found_beside_the_bzimage(reference: Kernel) -> None:
    assert reference.vmlinux.path == reference.bzimage.path.parent / "vmlinux"
    assert reference.dwarf


@pytest.mark.integration
def test_reference_banner_and_bzimage_agree(reference: Kernel) -> None:
    assert reference.vmlinux.build_id == reference.bzimage.build_id
    assert reference.vmlinux.banner.startswith(f"Linux version {reference.release} (")
    assert reference.version_tuple[:2] == (6, 1)


@pytest.mark.integration
def test_reference_symbols_agree_with_nm(reference: Kernel) -> None:
    nm = subprocess.run(["nm", str(reference.vmlinux.path)], capture_output=True, text=True, check=True)
    addresses = {fields[2]: int(fields[0], 16) for fields in map(str.split, nm.stdout.splitlines()) if len(fields) == 3}
    for name in ("entry_SYSCALL_64", "do_syscall_64", "sys_call_table", "linux_banner"):
        assert reference.vmlinux.symbol(name) == addresses[name], name


@pytest.mark.integration
def test_reference_symbol_sizes_and_aliases_agree_with_nm(reference: Kernel) -> None:
    nm = subprocess.run(["nm", "-S", str(reference.vmlinux.path)], capture_output=True, text=True, check=True)
    sizes = {f[3]: int(f[1], 16) for f in map(str.split, nm.stdout.splitlines()) if len(f) == 4}
    for name in ("sys_call_table", "do_syscall_64", "__x64_sys_write"):
        assert reference.vmlinux.symbol_size(name) == sizes[name], name
    write = reference.vmlinux.symbol("__x64_sys_write")
    assert "__x64_sys_write" in reference.vmlinux.names_at(write)
    assert reference.vmlinux.names_at(write) == sorted(reference.vmlinux.names_at(write))


@pytest.mark.integration
def test_reference_sys_call_table_starts_with_read_and_write(reference: Kernel) -> None:
    vmlinux = reference.vmlinux
    first, second = struct.unpack("<QQ", vmlinux.read(vmlinux.symbol("sys_call_table"), 16))
    assert (first, second) == (vmlinux.symbol("__x64_sys_read"), vmlinux.symbol("__x64_sys_write"))


@pytest.mark.integration
def test_reference_kernel_mounts_iso_payloads(reference: Kernel) -> None:
    assert reference.payloads_on_iso, reference.missing_for_iso


@pytest.mark.integration
def test_reference_vmlinux_of_another_build_is_rejected(reference: Kernel, tmp_path: Path) -> None:
    uts = reference.bzimage.build_id.uts_version
    assert uts is not None and uts.startswith("#")
    banner = reference.vmlinux.banner.encode()
    other_uts = ("#8" if uts.startswith("#9") else "#9") + uts[2:]  # same length: the ELF stays valid
    patched = banner.replace(uts.encode(), other_uts.encode())
    data = reference.vmlinux.path.read_bytes()
    assert banner in data and len(patched) == len(banner)
    (tmp_path / "vmlinux").write_bytes(data.replace(banner, patched))
    assert Vmlinux.open(tmp_path / "vmlinux").banner == patched.decode()  # still a valid ELF
    with pytest.raises(ConfigError, match="different builds"):
        Kernel.load(reference.bzimage.path, tmp_path / "vmlinux")


@pytest.mark.integration
def test_reference_stripped_vmlinux_is_rejected(reference: Kernel, tmp_path: Path) -> None:
    stripped = tmp_path / "vmlinux"
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(reference.vmlinux.path)], check=True)
    with pytest.raises(ConfigError, match=r"without symbols \(stripped\?\)"):
        Kernel.load(reference.bzimage.path, stripped)


def test_reference_bzimage_truncated_to_100k_is_rejected(reference: Kernel, tmp_path: Path) -> None:
    truncated = tmp_path / "bzImage"
    truncated.write_bytes(reference.bzimage.path.read_bytes()[:100_000])
    with pytest.raises(ConfigError, match=r"bzImage is truncated: 100000 bytes, its setup header says \d+"):
        Kernel.load(truncated, reference.vmlinux.path)


def test_debian_source_version_and_fragments_make_their_own_keys(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"linux-source-6.1": "6.1.192-2", "linux-source-6.12": "6.12.117-1"}
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda package: versions[package])
    monkeypatch.setattr(kernel_build, "compiler_id", lambda: "gcc 12")
    first, fred = tmp_path / "a.config", tmp_path / "fred.config"
    first.write_text("CONFIG_64BIT=y\n")
    fred.write_text("CONFIG_X86_FRED=y\n")
    reference = KernelBuild(fragment=first, cache=tmp_path)
    newer = KernelBuild(fragment=first, debian="6.12", cache=tmp_path)
    both = KernelBuild(fragment=[first, fred], debian="6.12", cache=tmp_path)
    assert newer.source_identity == "debian-linux-source-6.12=6.12.117-1"
    assert newer.tarball == Path("/usr/src/linux-source-6.12.tar.xz")
    # One fragment keeps the key it always had; a second one is merged after it.
    assert reference.key == build_key("debian-linux-source-6.1=6.1.192-2", "CONFIG_64BIT=y\n", "gcc 12")
    assert both.fragment_text == "CONFIG_64BIT=y\nCONFIG_X86_FRED=y\n"
    assert len({reference.key, newer.key, both.key}) == 3


def test_renamed_options_are_translated_for_trees_that_only_know_the_new_name(tmp_path: Path) -> None:
    fragment = "CONFIG_CPU_MITIGATIONS=y\nCONFIG_PAGE_TABLE_ISOLATION=y\n"
    (tmp_path / "arch" / "x86").mkdir(parents=True)
    (tmp_path / "arch" / "x86" / "Kconfig").write_text("config MITIGATION_PAGE_TABLE_ISOLATION\n\tbool\n")
    defined = kernel_build.kconfig_defines(tmp_path, ["CONFIG_PAGE_TABLE_ISOLATION",
                                                      "CONFIG_MITIGATION_PAGE_TABLE_ISOLATION"])
    assert defined == {"CONFIG_MITIGATION_PAGE_TABLE_ISOLATION"}
    assert kernel_build.translate_fragment(fragment, defined) == (
        "CONFIG_CPU_MITIGATIONS=y\nCONFIG_MITIGATION_PAGE_TABLE_ISOLATION=y\n")
    # A tree with the old name (6.1) keeps the fragment as written.
    assert kernel_build.translate_fragment(fragment, {"CONFIG_PAGE_TABLE_ISOLATION"}) == fragment


def test_added_options_name_what_the_merge_changed() -> None:
    fragment = "CONFIG_X86_MSR=y\nCONFIG_SERIAL_8250=y\nCONFIG_DEBUG_INFO_DWARF5=y\n"
    before = "CONFIG_X86_MSR=m\nCONFIG_SERIAL_8250=y\n# CONFIG_DEBUG_INFO_DWARF5 is not set\n"
    after = "CONFIG_X86_MSR=y\nCONFIG_SERIAL_8250=y\nCONFIG_DEBUG_INFO_DWARF5=y\n"
    assert kernel_build.added_options(fragment, before, after) == [
        "CONFIG_X86_MSR=y (was m)", "CONFIG_DEBUG_INFO_DWARF5=y (was not set)"]


def test_a_full_base_merges_only_what_the_suite_needs(tmp_path: Path) -> None:
    saved = tmp_path / "saved.config"
    saved.write_text("CONFIG_64BIT=y\n")
    assert KernelBuild(base="defconfig").fragments == [kernel_build.needs_fragment()]
    assert KernelBuild(base=str(saved)).fragments == [kernel_build.needs_fragment()]
    assert KernelBuild().fragments == [kernel_build.default_fragment()]
    with pytest.raises(ConfigError, match="neither tinyconfig nor defconfig nor a .config file"):
        KernelBuild(base="allnoconfig")


def _zeroed_body(source: Path, target: Path) -> Path:
    """*source* with its header intact and the rest of its kernel zeroed: what a copy cut
    short into a preallocated file, or a disk error, leaves."""
    data = bytearray(source.read_bytes())
    data[0x10200:-4] = bytes(len(data) - 0x10200 - 4)
    target.write_bytes(bytes(data))
    return target


def test_a_bzimage_whose_body_no_longer_matches_its_crc_is_refused(tmp_path: Path) -> None:
    image = make_bzimage(tmp_path / "bzImage")
    data = bytearray(image.read_bytes())
    data[0x3800] ^= 1  # one bit, behind an intact header
    image.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"{image} is damaged: its contents do not match the CRC-32 its kernel "
                                          r"build appended \(the trailer at byte 16380 says 0x[0-9a-f]{8}, the 16380 "
                                          r"bytes before it give 0x[0-9a-f]{8}\): copy it again"):
        BzImage.read(image)


def test_the_crc_is_build_cs_register_not_finalised() -> None:
    # arch/x86/boot/tools/build.c: CRC-32 (0xEDB88320, initial 0xffffffff) without the final
    # inversion, stored little-endian: an image with its trailer has zlib's residue.
    body = b"kernel" * 1000
    assert image_crc(body + struct.pack("<I", zlib.crc32(body) ^ 0xFFFFFFFF)) == CRC_RESIDUE


def test_a_signed_image_passes_once_its_signers_edits_are_undone(tmp_path: Path) -> None:
    # sbsign/pesign set the PE checksum and the certificate table entry, and append the
    # signature after the image (Debian's vmlinuz files are signed so).
    data = bytearray(0x4000)
    data[0x3C:0x40] = struct.pack("<I", 0x40)
    data[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<H", data, 0x40 + 0x18, 0x20B)  # PE32+
    unsigned = with_crc(data)
    signed = bytearray(unsigned)
    struct.pack_into("<I", signed, 0x40 + 0x58, 0x12345)
    struct.pack_into("<II", signed, 0x40 + 0xA8, len(signed), 1472)
    assert image_crc(unsigned) == image_crc(bytes(signed)) == CRC_RESIDUE


def _installed_kernels() -> list[Path]:
    return [*Path(cache_dir(), "kernels").glob("*/bzImage"), *Path(cache_dir(), "debian-kernels").glob("*/vmlinuz")]


@pytest.mark.skipif(not _installed_kernels(), reason="no built or fetched kernel in the cache")
@pytest.mark.parametrize("image", _installed_kernels(), ids=lambda path: path.parent.name[:24])
def test_real_kernels_pass_the_crc_check(image: Path) -> None:
    assert BzImage.read(image).release[0].isdigit()


@pytest.mark.skipif(reference_kernel() is None, reason="reference kernel not built (syscall-irl kernel build)")
def test_kernel_check_reports_a_zeroed_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = reference_kernel()
    assert reference is not None
    damaged = _zeroed_body(reference, tmp_path / "bzImage")
    assert cli.main(["kernel", "check", f"--kernel={damaged}", f"--vmlinux={reference.parent / 'vmlinux'}",
                     "--modules=none"]) == 2
    assert f"{damaged} is damaged: its contents do not match the CRC-32" in capsys.readouterr().err

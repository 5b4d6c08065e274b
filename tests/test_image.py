"""Initramfs (cpio newc) writer and the guest image cache."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import ImageError
from pytest_syscall_irl.lab.image import (CpioEntry, build_guest_image, build_programs, check_payloads, cpio_newc,
                                          payload_sources)


def test_cpio_round_trips_through_gnu_cpio(tmp_path: Path) -> None:
    archive = cpio_newc([
        CpioEntry("dir", 0o040755),
        CpioEntry("dir/file", 0o100644, b"hello\n"),
        CpioEntry("link", 0o120777, b"/dir/file"),
        CpioEntry("console", 0o020600, rdev=(5, 1)),
    ])
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing.splitlines()}
    assert set(lines) == {"dir", "dir/file", "link", "console"}
    assert lines["console"].startswith("crw-------") and "5," in lines["console"]
    assert lines["link"].startswith("lrwxrwxrwx")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames"], input=archive, cwd=out, check=True,
                   capture_output=True)
    assert (out / "dir" / "file").read_bytes() == b"hello\n"


def test_cpio_members_are_4_byte_aligned() -> None:
    for size in range(9):
        archive = cpio_newc([CpioEntry("f" * size, 0o100644, b"x" * size)])
        assert len(archive) % 4 == 0


@pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="musl-tools not installed")
def test_guest_image_is_cached_and_delivery_follows_kernel(tmp_path: Path) -> None:
    iso_image = build_guest_image(tmp_path, payloads_on_iso=True)
    assert iso_image.delivery == "iso" and iso_image.iso is not None
    again = build_guest_image(tmp_path, payloads_on_iso=True)
    assert again == iso_image and again.initramfs.stat().st_mtime_ns == iso_image.initramfs.stat().st_mtime_ns
    embedded = build_guest_image(tmp_path, payloads_on_iso=False)
    assert embedded.delivery == "initramfs" and embedded.initramfs != iso_image.initramfs
    names = subprocess.run(["cpio", "-it"], input=gzip.decompress(embedded.initramfs.read_bytes()),
                           capture_output=True, check=True).stdout.decode().split()
    assert "payloads/syscall_irl" in names and "init" in names and "dev/console" in names
    # The payload is a static, non-PIE x86_64 executable.
    kind = subprocess.run(["file", "-b", str(iso_image.payloads["syscall_irl"])], capture_output=True, text=True)
    if kind.returncode == 0 and kind.stdout:
        assert "statically linked" in kind.stdout and "x86-64" in kind.stdout


def test_concurrent_builds_build_once(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda _: build_guest_image(tmp_path, payloads_on_iso=True), range(4)))
    assert len({img.initramfs for img in images}) == 1
    assert len(list((tmp_path / "images").iterdir())) == 2  # the image dir and its lock file


def test_users_programs_64_and_32_bit_and_prebuilt(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n')
    (mine / "hello32.i386.c").write_text('#include "sirl32.h"\nint sirl_main(int c, char **v) '
                                         '{ (void)c; (void)v; sirl32_puts("hi\\n"); return 0; }\n')
    (mine / "notes.txt").write_text("not a program")
    image = build_guest_image(tmp_path / "cache", payloads_on_iso=True, payload_dirs=[mine])
    assert image.payload("hello").bits == 64 and image.payload("hello32").bits == 32
    assert image.payload("syscall_irl").bits == 64  # the built-in ones are still there
    assert "notes.txt" not in image.payloads and "notes" not in image.payloads
    # A static ELF file is shipped as it is, under its own name; the key covers it.
    shutil.copy(image.payloads["hello32"], mine / "prebuilt")
    again = build_guest_image(tmp_path / "cache", payloads_on_iso=True, payload_dirs=[mine])
    assert again.payload("prebuilt").read(again.payload("prebuilt").entry, 1) and again.iso != image.iso


def test_two_programs_of_one_name_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "syscall_irl.c").write_text("int main(void) { return 0; }\n")
    with pytest.raises(ImageError, match=r"two guest programs named 'syscall_irl'"):
        build_guest_image(tmp_path / "cache", payloads_on_iso=True, payload_dirs=[tmp_path])


def test_a_missing_payload_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"payload directory .*nowhere does not exist"):
        build_guest_image(tmp_path / "cache", payloads_on_iso=True, payload_dirs=[tmp_path / "nowhere"])


def _payload_dir(tmp_path: Path, name: str = "mine") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    return directory


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to link a dynamic program")
def test_a_dynamically_linked_program_is_refused_naming_its_loader(tmp_path: Path) -> None:
    # Shipped, it fails in the guest as "not found": the guest has no loader nor libc.
    mine = _payload_dir(tmp_path)
    source = tmp_path / "dyn.c"
    source.write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-o", str(mine / "dyn"), str(source)], check=True)
    with pytest.raises(ImageError, match=r"guest program .*/mine/dyn is dynamically linked \(needs /lib.*ld-linux.*"
                                         r"\): .* ship a static x86_64 or i386 ELF"):
        check_payloads(tmp_path / "cache", [mine])


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to link a shared object")
def test_a_program_that_needs_a_library_is_refused_naming_it(tmp_path: Path) -> None:
    # No PT_INTERP (a -nostartfiles -shared oddity), but DT_NEEDED: still nothing to load it with.
    mine = _payload_dir(tmp_path)
    source = tmp_path / "lib.c"
    source.write_text("int f(void) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-o", str(mine / "needy"), str(source), "-Wl,--no-as-needed", "-lm"],
                   check=True)
    with pytest.raises(ImageError, match=r"needy is dynamically linked \(needs libm\.so\.6"):
        check_payloads(tmp_path / "cache", [mine])


def test_a_file_that_is_not_elf_is_refused(tmp_path: Path) -> None:
    mine = _payload_dir(tmp_path)
    (mine / "script").write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ImageError, match=r"mine/script is not an ELF file: .* as script\.c"):
        check_payloads(tmp_path / "cache", [mine])


def test_headers_and_hidden_files_are_not_programs(tmp_path: Path) -> None:
    mine = _payload_dir(tmp_path)
    (mine / "common.h").write_text("#define X 1\n")
    (mine / ".gitignore").write_text("*\n")
    assert set(payload_sources(extra_dirs=[mine])) == set(payload_sources())


def test_two_programs_of_one_name_in_two_directories_are_an_error(tmp_path: Path) -> None:
    first, second = _payload_dir(tmp_path, "first"), _payload_dir(tmp_path, "second")
    (first / "same.c").write_text("int main(void) { return 0; }\n")
    (second / "same.c").write_text("int main(void) { return 1; }\n")
    with pytest.raises(ImageError, match=r"two guest programs named 'same': .*first/same\.c and .*second/same\.c"):
        check_payloads(tmp_path / "cache", [first, second])


def test_a_program_that_does_not_compile_is_an_error_with_the_compilers_words(tmp_path: Path) -> None:
    mine = _payload_dir(tmp_path)
    (mine / "broken.c").write_text("int main(void) { return nope; }\n")
    with pytest.raises(ImageError, match=r"cannot compile guest program .*broken\.c") as raised:
        check_payloads(tmp_path / "cache", [mine])
    assert "nope" in (raised.value.log_tail or "")


def test_checked_payloads_are_compiled_once_for_the_guests_to_come(tmp_path: Path) -> None:
    mine = _payload_dir(tmp_path)
    (mine / "fine.c").write_text("int main(void) { return 0; }\n")
    check_payloads(tmp_path / "cache", [mine])
    made = {p.name for p in (tmp_path / "cache" / "programs").iterdir()}
    assert build_programs(tmp_path / "cache", extra_dirs=[mine])["fine"].parent.name in made

"""Initramfs (cpio newc) writer and the guest image cache."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import ImageError
from pytest_syscall_irl.lab.image import CpioEntry, build_guest_image, cpio_newc


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

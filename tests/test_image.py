"""Initramfs (cpio newc) writer and the guest image cache."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_syscall_irl.image import CpioEntry, build_guest_image, cpio_newc


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

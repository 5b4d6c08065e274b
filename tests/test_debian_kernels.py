"""Debian's kernels fetched into the cache (`syscall-irl kernel fetch`), and the conformance
suite run on both Debian 12 cloud kernels (6.1 and 6.12, modules and -dbg vmlinux) in one run.

The unit tests drive DebianKernel with a fake apt; the integration test downloads the real
packages (about 600 MB once, then reused from the cache) and runs in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_syscall_irl.core import shipped
from pytest_syscall_irl.kernel.debian import (
    DebianKernel,
    FetchedKernel,
    damage,
    image_dependency,
    parse_stanza,
    seal,
)
from pytest_syscall_irl.core.cache import cache_dir
from pytest_syscall_irl.core.errors import ConfigError, KernelError, SyscallIrlWarning

META_61 = """Package: linux-image-cloud-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on cloud platforms.

"""
META_612 = """Package: linux-image-6.12-cloud-amd64
Version: 6.12.117-1~deb12u1
Depends: linux-image-6.12.117+deb12-cloud-amd64 (= 6.12.117-1~deb12u1)
"""
IMAGE_612 = """Package: linux-image-6.12.117+deb12-cloud-amd64
Version: 6.12.117-1~deb12u1
Depends: kmod, linux-base (>= 4.12~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
"""


class FakeApt:
    """apt-cache show answering from a table of stanzas."""

    def __init__(self, stanzas: dict[str, str]) -> None:
        self.stanzas = stanzas
        self.calls: list[list[str]] = []

    def __call__(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(command))
        text = self.stanzas.get(command[-1])
        return subprocess.CompletedProcess(list(command), 0 if text else 100, text or "",
                                           "" if text else "E: No packages found\n")


def test_a_stanza_is_read_up_to_its_blank_line() -> None:
    fields = parse_stanza(META_61 + "Package: other\nVersion: 1\n")
    assert fields["Package"] == "linux-image-cloud-amd64" and fields["Version"] == "6.1.192-3"
    assert fields["Description"].endswith("\nand modules for use on cloud platforms.")


def test_the_image_a_meta_package_names_is_found_in_its_depends() -> None:
    assert image_dependency(parse_stanza(META_61)) == "linux-image-6.1.0-57-cloud-amd64"
    assert image_dependency(parse_stanza(IMAGE_612)) is None  # an image depends on no other image
    assert image_dependency({"Depends": "linux-image-6.1.0-57-cloud-amd64-unsigned | linux-image-6.1.0-57"}) \
        == "linux-image-6.1.0-57"


def test_a_meta_package_that_looks_like_an_image_is_followed_to_its_image(tmp_path: Path) -> None:
    # linux-image-6.12-cloud-amd64 matches linux-image-<digit>...: only its Depends tells.
    apt = FakeApt({"linux-image-6.12-cloud-amd64": META_612, "linux-image-6.12.117+deb12-cloud-amd64": IMAGE_612})
    image, version = DebianKernel("linux-image-6.12-cloud-amd64", tmp_path, runner=apt).resolve()
    assert (image, version) == ("linux-image-6.12.117+deb12-cloud-amd64", "6.12.117-1~deb12u1")


def test_an_unknown_package_says_how_to_find_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"apt knows no package linux-image-nope.*apt-get update"):
        DebianKernel("linux-image-nope", tmp_path, runner=FakeApt({})).resolve()
    with pytest.raises(ConfigError, match="not a Debian kernel image package"):
        DebianKernel("linux-image-cloud-amd64-dbg", tmp_path)
    with pytest.raises(ConfigError, match="names no kernel image package"):
        DebianKernel("linux-image-cloud", tmp_path,
                     runner=FakeApt({"linux-image-cloud": "Package: linux-image-cloud\nVersion: 1\n"})).resolve()


def _fake_fetched(directory: Path) -> None:
    (directory / "modules/kernel").mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"MZ" + bytes(100))
    (directory / "vmlinux").write_bytes(b"\x7fELF" + bytes(100))
    (directory / "modules/modules.dep").write_text("kernel/msr.ko.xz:\n")
    (directory / "modules/kernel/msr.ko.xz").write_bytes(b"xz")
    seal(directory, "6.1.0-57-cloud-amd64", {"image": "linux-image-6.1.0-57-cloud-amd64=6.1.192-3"})


@pytest.mark.parametrize("harm, problem", [
    (lambda d: (d / "modules/kernel/msr.ko.xz").unlink(), "modules/kernel/msr.ko.xz is missing"),
    (lambda d: (d / "modules/kernel/extra.ko").write_text("x"), "modules/kernel/extra.ko was not there when it was "
                                                                "made"),
    (lambda d: (d / "vmlinux").write_bytes(b"\x7fELF"), "vmlinux has 4 bytes, 104 when it was made"),
    (lambda d: (d / "complete").write_text("{"), "complete is missing or unreadable"),
    (lambda d: shutil.rmtree(d), "not built"),
])
def test_a_damaged_fetched_kernel_is_not_trusted(tmp_path: Path, harm: Any, problem: str) -> None:
    _fake_fetched(tmp_path)
    assert damage(tmp_path) is None
    harm(tmp_path)
    assert damage(tmp_path) == problem


def test_a_vmlinuz_changed_in_place_is_caught_by_its_digest(tmp_path: Path) -> None:
    _fake_fetched(tmp_path)
    record = json.loads((tmp_path / "complete").read_text())
    (tmp_path / "vmlinuz").write_bytes(b"MZ" + bytes(99) + b"!")  # same size
    record["files"]["vmlinuz"][1] = (tmp_path / "vmlinuz").stat().st_mtime_ns  # and mtime as recorded
    (tmp_path / "complete").write_text(json.dumps(record))
    assert damage(tmp_path) == "vmlinuz has changed since it was made (SHA-256 differs)"


def test_a_damaged_fetched_kernel_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = IMAGE_612.replace("6.12.117+deb12", "6.1.0-57").replace("6.12.117-1~deb12u1", "6.1.192-3")
    apt = FakeApt({"linux-image-cloud-amd64": META_61, "linux-image-6.1.0-57-cloud-amd64": image})
    kernel = DebianKernel("linux-image-cloud-amd64", tmp_path, runner=apt)
    directory = kernel.directory_for("linux-image-6.1.0-57-cloud-amd64", "6.1.192-3")
    _fake_fetched(directory)
    fetches: list[Path] = []

    def unpack(image: str, version: str, staging: Path) -> dict[str, object]:
        fetches.append(staging)
        _fake_fetched(staging)
        return {"release": "6.1.0-57-cloud-amd64"}

    monkeypatch.setattr(kernel, "_unpack", unpack)
    assert kernel.fetch() == FetchedKernel(directory, "6.1.0-57-cloud-amd64") and fetches == []
    (directory / "vmlinux").write_bytes(b"cut short")
    with pytest.warns(SyscallIrlWarning, match=r"Debian kernel .* is damaged \(vmlinux has 9 bytes"):
        assert kernel.fetch().directory == directory
    assert len(fetches) == 1 and damage(directory) is None


def test_a_fetch_that_fails_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = IMAGE_612.replace("6.12.117+deb12", "6.1.0-57").replace("6.12.117-1~deb12u1", "6.1.192-3")
    apt = FakeApt({"linux-image-cloud-amd64": META_61, "linux-image-6.1.0-57-cloud-amd64": image})
    kernel = DebianKernel("linux-image-cloud-amd64", tmp_path, runner=apt)

    def unpack(image: str, version: str, staging: Path) -> dict[str, object]:
        (staging / "vmlinuz").write_bytes(b"MZ")
        raise KernelError("apt-get download failed")

    monkeypatch.setattr(kernel, "_unpack", unpack)
    with pytest.raises(KernelError, match="apt-get download failed"):
        kernel.fetch()
    assert [p.name for p in (tmp_path / "debian-kernels").iterdir()] == [
        "linux-image-6.1.0-57-cloud-amd64_6.1.192-3.lock"]


DEBIAN_KERNELS = ("linux-image-cloud-amd64", "linux-image-6.12-cloud-amd64")


@pytest.mark.integration
@pytest.mark.timeout(2700)  # a fresh machine: ~600 MB to download, two 590 MB vmlinux to index, 144 tests
def test_the_suite_passes_on_both_debian_cloud_kernels_in_one_run(pytester: pytest.Pytester,
                                                                  tmp_path: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("not a Debian system: Debian's kernels are fetched with apt-get and dpkg-deb")
    fetched = [DebianKernel(package, cache_dir()).fetch() for package in DEBIAN_KERNELS]
    junit = tmp_path / "junit.xml"
    options = [option for kernel in fetched for option in kernel.options()]
    result = pytester.run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", "-n", "2",
                          *options, f"--junitxml={junit}", str(shipped.SUITES_DIR), timeout=2100)
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, out
    outcomes = result.parseoutcomes()
    # Every feature the suite relies on is there (modules, DWARF, PTI, IA32): nothing may skip.
    assert set(outcomes) == {"passed"}, out
    names = [case.get("name", "") for case in ET.parse(junit).getroot().iter("testcase")]
    per_kernel = [sum(kernel.release in name for name in names) for kernel in fetched]
    assert per_kernel[0] == per_kernel[1] > 50 and sum(per_kernel) == outcomes["passed"], (per_kernel, out)
    properties = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    for kernel in fetched:
        assert any(value == kernel.release for value in properties.values()), properties

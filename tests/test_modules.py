"""Unit tests of the kernel modules a guest inserts (modules.py), with a fake module directory."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from pytest_syscall_irl.core.errors import ConfigError
from pytest_syscall_irl.lab.image import GUEST_MODULE_DIR, initramfs_entries
from pytest_syscall_irl.kernel.modules import (GuestModules, guest_modules, load_order, module_name, parse_modules_dep,
                                        vermagic)

RELEASE = "6.12.117+deb12-cloud-amd64"
# As Debian's 6.1 cloud kernel has it: virtio_pci needs four modules, isofs needs cdrom.
MODULES_DEP = """\
kernel/arch/x86/kernel/msr.ko.xz:
kernel/fs/isofs/isofs.ko.xz: kernel/drivers/cdrom/cdrom.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz \
kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/cdrom/cdrom.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz
"""


def _module(release: str) -> bytes:
    return b"\x7fELF...\0license=GPL\0vermagic=" + release.encode() + b" SMP mod_unload modversions \0"


def _module_dir(tmp_path: Path, release: str = RELEASE) -> Path:
    for line in MODULES_DEP.splitlines():
        path = tmp_path / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(_module(release)))
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    return tmp_path


def test_module_names_drop_the_suffix_and_use_underscores() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("kernel/arch/x86/kernel/msr.ko") == "msr"


def test_load_order_puts_each_dependency_first_and_once() -> None:
    order = [module_name(path) for path in load_order(parse_modules_dep(MODULES_DEP), ["virtio_pci", "virtio_blk",
                                                                                       "isofs", "absent"])]
    assert sorted(order) == sorted(set(order)) == ["cdrom", "isofs", "virtio", "virtio_blk", "virtio_pci",
                                                   "virtio_pci_legacy_dev", "virtio_ring"]
    for module, needs in [("virtio", "virtio_ring"), ("virtio_pci", "virtio"), ("virtio_pci", "virtio_pci_legacy_dev"),
                          ("virtio_blk", "virtio"), ("isofs", "cdrom")]:
        assert order.index(needs) < order.index(module), order


def test_vermagic_is_read_from_the_modinfo() -> None:
    assert vermagic(_module(RELEASE)) == f"{RELEASE} SMP mod_unload modversions "
    assert vermagic(b"\x7fELF no modinfo") is None


def test_guest_modules_are_decompressed_numbered_in_load_order(tmp_path: Path) -> None:
    modules = GuestModules.read(_module_dir(tmp_path), RELEASE)
    names = [name for name, _ in modules.files]
    assert names[0].startswith("01-") and names == sorted(names)  # the guest's init inserts them in name order
    assert {name.split("-", 1)[1] for name in names} >= {"msr.ko", "isofs.ko", "virtio_blk.ko", "virtio_pci.ko"}
    assert all(data == _module(RELEASE) for _, data in modules.files)
    assert modules.provided == {"msr", "isofs", "virtio_blk", "virtio_pci"}
    assert modules.covers(["CONFIG_ISO9660_FS", "CONFIG_VIRTIO_BLK"]) and not modules.covers(["CONFIG_EXT4_FS"])
    entries = {entry.name: entry for entry in initramfs_entries("/bin/busybox", b"", b"", None, modules)}
    assert entries[f"{GUEST_MODULE_DIR}/{names[0]}"].data == _module(RELEASE)


def test_modules_of_another_release_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"built for kernel 6\.1\.0-57-cloud-amd64, not 6\.12"):
        GuestModules.read(_module_dir(tmp_path, "6.1.0-57-cloud-amd64"), RELEASE)


def test_a_directory_without_modules_dep_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no modules.dep.*--modules=none"):
        GuestModules.read(tmp_path, RELEASE)


def test_none_means_no_modules_and_a_missing_default_too(tmp_path: Path) -> None:
    assert guest_modules(RELEASE, Path("none")).files == ()
    assert guest_modules("0.0.0-no-such-release", None).files == ()
    assert guest_modules(RELEASE, _module_dir(tmp_path)).directory == tmp_path


def test_a_missing_module_directory_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"module directory .*/nowhere does not exist: pass the kernel's module "
                                          r"directory .* or --modules=none"):
        guest_modules("6.1.0", tmp_path / "nowhere")


def test_a_file_given_as_module_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"module directory .*/file is not a directory"):
        guest_modules("6.1.0", tmp_path / "file")

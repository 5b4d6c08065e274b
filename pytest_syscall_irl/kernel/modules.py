"""Kernel modules the guest needs, for kernels that build its drivers as modules.

Distribution kernels (Debian's among them) build the MSR driver, ISO9660 and the virtio
block driver as modules: without them the MSR tests cannot read an MSR and the payloads
cannot travel on the ISO. Given the kernel's module directory (/lib/modules/<release>),
this picks those modules and their dependencies from modules.dep, in load order, and
decompresses them on the host (the guest's busybox insmod is given plain .ko files).

    modules = GuestModules.read(Path("/lib/modules/6.12.117+deb12-cloud-amd64"), "6.12.117+deb12-cloud-amd64")
    modules.files          # (("01-virtio_ring.ko", b"\\x7fELF..."), ...)

No pytest here.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError, ImageError

# What the guest loads when the kernel has it as a module, and the option building it.
WANTED: Mapping[str, str] = {
    "msr": "CONFIG_X86_MSR",  # /dev/cpu/N/msr: the MSR tests
    "virtio_pci": "CONFIG_VIRTIO_PCI",  # the payload disk's PCI transport
    "virtio_blk": "CONFIG_VIRTIO_BLK",  # the payload disk
    "isofs": "CONFIG_ISO9660_FS",  # the payload disk's file system
}
_SUFFIX = re.compile(r"\.ko(\.(xz|zst|gz))?$")


def module_name(path: str) -> str:
    """The module name of a modules.dep path: kernel/drivers/char/hw_random/virtio-rng.ko.xz -> virtio_rng."""
    return _SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep: module name -> (its path, the paths of the modules it needs)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, sep, needs = line.partition(":")
        if sep:
            table[module_name(path)] = (path.strip(), needs.split())
    return table


def load_order(dep: Mapping[str, tuple[str, list[str]]], names: Iterable[str]) -> list[str]:
    """The module paths to load, dependencies first, each once, for the modules *names*
    that modules.dep lists (the others are built in or absent)."""
    order: list[str] = []

    def visit(name: str) -> None:
        path, needs = dep[name]
        for need in needs:
            if need not in order:
                visit(module_name(need))
        if path not in order:
            order.append(path)

    for name in names:
        if name in dep:
            visit(name)
    return order


def decompress(path: Path) -> bytes:
    """A module file's ELF bytes, whatever compression the distribution chose."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ImageError(f"{path} is zstd-compressed: pip install zstandard "
                             f"(or pass --modules=none to do without the modules)") from None
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


def vermagic(module: bytes) -> str | None:
    """The `vermagic=` string of a module's .modinfo ("6.1.0-57-cloud-amd64 SMP mod_unload modversions ")."""
    match = re.search(rb"vermagic=([^\0]*)\0", module)
    return match.group(1).decode(errors="replace") if match else None


@dataclass(frozen=True)
class GuestModules:
    """The module files the guest inserts, in order, and which wanted modules they are."""

    directory: Path | None = None
    files: tuple[tuple[str, bytes], ...] = ()
    provided: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def read(cls, directory: Path, release: str) -> GuestModules:
        """The modules WANTED needs from *directory* (built-in ones need nothing).
        ConfigError if *directory* is not a module directory of *release*."""
        dep_file = directory / "modules.dep"
        fix = "pass the kernel's module directory (/lib/modules/<release>) or --modules=none"
        if not directory.exists():
            raise ConfigError(f"module directory {directory} does not exist: {fix}")
        if not directory.is_dir():
            raise ConfigError(f"module directory {directory} is not a directory: {fix}")
        if not dep_file.is_file():
            raise ConfigError(f"{directory} has no modules.dep: pass the kernel's module directory "
                              f"(/lib/modules/<release>, run depmod there) or --modules=none")
        dep = parse_modules_dep(dep_file.read_text())
        files = []
        for number, path in enumerate(load_order(dep, WANTED), start=1):
            data = decompress(directory / path)
            magic = vermagic(data) or ""
            if magic.split(" ", 1)[0] != release:
                raise ConfigError(f"{directory / path} is built for kernel {magic.split(' ', 1)[0] or '?'}, "
                                  f"not {release}: pass the module directory of this kernel build (--modules)")
            files.append((f"{number:02d}-{module_name(path)}.ko", data))
        return cls(directory, tuple(files), frozenset(name for name in WANTED if name in dep))

    @property
    def digest(self) -> bytes:
        """What the guest image cache key needs to know of these modules."""
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.digest()

    def covers(self, options: Iterable[str]) -> bool:
        """True if every config option of *options* is provided by a module loaded here."""
        by_option = {option: name for name, option in WANTED.items()}
        return all(by_option.get(option) in self.provided for option in options)

    def __str__(self) -> str:
        if not self.files:
            return "none"
        return f"{', '.join(sorted(self.provided))} from {self.directory} ({len(self.files)} files with dependencies)"


def default_directory(release: str) -> Path | None:
    """/lib/modules/<release> when it holds a modules.dep, else None."""
    directory = Path("/lib/modules") / release
    return directory if (directory / "modules.dep").is_file() else None


def guest_modules(release: str, choice: Path | None) -> GuestModules:
    """The modules for a kernel of *release*: from directory *choice*, none if it is
    Path("none"), from default_directory(release) if it is None (and none without one)."""
    if choice == Path("none"):
        return GuestModules()
    directory = choice if choice is not None else default_directory(release)
    return GuestModules() if directory is None else GuestModules.read(directory, release)

"""Kernel artifacts: a bzImage and its vmlinux, read without starting GDB.

    kernel = Kernel.load("linux/arch/x86/boot/bzImage")   # finds linux/vmlinux
    kernel.vmlinux.symbol("entry_SYSCALL_64")              # 0xffffffff81200040

Builds of the reference kernel are in kernel_build.py. No pytest here: the plugin turns
ConfigError into a usage error.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Union

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..core.errors import ConfigError, KernelError

log = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]

ELF_MAGIC = b"\x7fELF"
REQUIRED_SYMBOLS = ("entry_SYSCALL_64", "linux_banner")
# Static objects that exist in vmlinux only when their driver is built in (=y, not =m).
ISO_PAYLOAD_SYMBOLS = {
    "iso9660_fs_type": "CONFIG_ISO9660_FS",  # fs/isofs/inode.c
    "virtio_blk": "CONFIG_VIRTIO_BLK",  # drivers/block/virtio_blk.c
    "virtio_pci_driver": "CONFIG_VIRTIO_PCI",  # drivers/virtio/virtio_pci_common.c
}
_FIX_KERNEL = "pass the bzImage of a kernel build (arch/x86/boot/bzImage), or run `syscall-irl kernel build`"


class BuildId(NamedTuple):
    """What identifies one build in both version strings; None where a string did not parse."""

    release: str
    builder: str | None  # "user@host"
    uts_version: str | None  # "#1 SMP PREEMPT_DYNAMIC Mon Nov 23 10:46:24 UTC 2026"


def _paren_group(text: str) -> tuple[str, str] | None:
    """Split "(a (b) c) rest" into ("a (b) c", "rest"); None if *text* does not start a group."""
    if not text.startswith("("):
        return None
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[1:i], text[i + 1 :].lstrip()
    return None


def parse_version_string(text: str, *, has_compiler: bool) -> BuildId:
    """Parse a bzImage version ("R (by@host) UTS") or a banner body ("R (by@host) (cc) UTS")."""
    release, _, rest = text.strip().partition(" ")
    builder = _paren_group(rest)
    if builder is None:
        return BuildId(release, None, None)
    by, rest = builder
    if has_compiler:
        compiler = _paren_group(rest)
        if compiler is None:
            return BuildId(release, by, None)
        rest = compiler[1]
    return BuildId(release, by, rest.strip())


def banner_compiler(banner: str) -> str | None:
    """The compiler group of a banner ("Linux version R (by@host) (gcc ..., GNU ld ...) #1 ..."),
    None if the banner has none (a bzImage's version string never has one)."""
    rest = banner.strip().removeprefix("Linux version ").partition(" ")[2]
    builder = _paren_group(rest)
    compiler = _paren_group(builder[1]) if builder else None
    return compiler[0] if compiler else None


def version_tuple(release: str) -> tuple[int, int, int]:
    """(6, 1, 192) for "6.1.192", (6, 8, 0) for "6.8-rc1", (6, 1, 0) for "6.1.0-13-amd64"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if match is None:
        raise ConfigError(f"cannot parse kernel release {release!r}: expected MAJOR.MINOR[.PATCH]")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def split_cmdline(cmdline: str) -> list[tuple[str, str | None]]:
    """(param, value) pairs of a kernel command line, split as the kernel does
    (next_arg() in lib/cmdline.c): double quotes group spaces (`param="a b"` or
    `"param=a b"`) and are dropped from the value; a parameter without `=` has value None.
    ConfigError for an unbalanced quote, which would swallow the rest of the line."""
    pairs: list[tuple[str, str | None]] = []
    rest = cmdline.strip()
    while rest:
        word, in_quote, i = "", False, 0
        while i < len(rest) and (in_quote or not rest[i].isspace()):
            in_quote ^= rest[i] == '"'
            word, i = word + rest[i], i + 1
        if in_quote:
            raise ConfigError(f"unbalanced double quote in {word!r}: the kernel would take everything after it "
                              "as one value; close the quote (param=\"a b\")")
        param, equals, value = word.partition("=")
        pairs.append((param.replace('"', ""), value.removeprefix('"').removesuffix('"') if equals else None))
        rest = rest[i:].lstrip()
    return pairs


def _read_head(path: Path, what: str, size: int, fix: str) -> bytes:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist: {fix}")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory: {fix}")
    try:
        with path.open("rb") as f:
            return f.read(size)
    except PermissionError as exc:
        raise ConfigError(f"cannot read {what} {path}: permission denied: make it readable "
                          f"(chmod a+r {path}) or run as a user who may read it") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}: {fix}") from exc


def _describe(head: bytes) -> str:
    if not head:
        return "it is empty"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip data"
    if b"\0" not in head[:4096]:
        return "it looks like a text file"
    return "unknown format, starts with " + head[:8].hex(" ")


@dataclass(frozen=True)
class BzImage:
    """An x86 boot image, identified by the version string in its setup header."""

    path: Path
    version: str  # "6.1.192 (root@host) #1 SMP PREEMPT_DYNAMIC Mon ..."

    @classmethod
    def read(cls, path: StrPath) -> BzImage:
        """Read the setup header of *path*; ConfigError if it is missing or not a bzImage."""
        path = Path(path)
        head = _read_head(path, "kernel image", 0x10200 + 512, _FIX_KERNEL)
        if head.startswith(ELF_MAGIC):
            raise ConfigError(
                f"{path}: this is an ELF file (vmlinux?), --kernel wants arch/x86/boot/bzImage"
            )
        if len(head) < 0x210 or head[0x1FE:0x200] != b"\x55\xaa" or head[0x202:0x206] != b"HdrS":
            raise ConfigError(
                f"{path} is not an x86 bzImage (no 0xAA55 boot flag and 'HdrS' setup header; "
                f"{_describe(head)}): --kernel wants arch/x86/boot/bzImage"
            )
        image = cls(path, _setup_version(path, head))
        _check_layout(path, head)
        _check_crc(path, head)
        return image

    @property
    def release(self) -> str:
        """UTS_RELEASE, e.g. "6.1.192"."""
        return self.version.split(" ", 1)[0]

    @property
    def build_id(self) -> BuildId:
        """Release, user@host and UTS_VERSION of this build."""
        return parse_version_string(self.version, has_compiler=False)


def _setup_version(path: Path, head: bytes) -> str:
    (pointer,) = struct.unpack_from("<H", head, 0x20E)
    start = pointer + 0x200
    end = head.find(b"\0", start, start + 512)
    if pointer == 0 or end < 0:
        raise ConfigError(f"{path}: bzImage without a readable kernel_version string (truncated?)")
    text = head[start:end].decode("ascii", "replace")
    if not text[:1].isdigit():
        raise ConfigError(f"{path}: bzImage kernel_version string {text[:60]!r} is not a version")
    return text


# The compressed kernel's formats (arch/x86/boot/compressed/Makefile, lib/decompress.c magics).
PAYLOAD_MAGICS = {
    b"\x1f\x8b": "gzip", b"\x1f\x9e": "gzip", b"BZh": "bzip2", b"\x5d\x00\x00": "lzma",
    b"\xfd7zXZ\x00": "xz", b"\x89LZO": "lzo", b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd",
}
_TRUNCATED_FIX = "copy it again from the build tree (arch/x86/boot/bzImage), or rebuild it"


def _check_layout(path: Path, head: bytes) -> None:
    """ConfigError if the file is shorter than its setup header says, or its compressed
    kernel does not start with a known compression header (boot protocol 2.08+).

    Documentation/arch/x86/boot.rst: the protected-mode kernel starts after
    (setup_sects + 1) sectors (setup_sects 0 means 4) and is syssize 16-byte paragraphs
    long; payload_offset/payload_length locate the compressed kernel inside it. A signed
    kernel carries its signature after that, so the file may be longer, never shorter.
    """
    setup_sects = head[0x1F1] or 4
    (syssize,) = struct.unpack_from("<I", head, 0x1F4)
    (protocol,) = struct.unpack_from("<H", head, 0x206)
    pm_start = (setup_sects + 1) * 512
    expected, size = pm_start + syssize * 16, path.stat().st_size
    if size < expected:
        raise ConfigError(f"{path} is truncated: {size} bytes, its setup header says {expected} "
                          f"({setup_sects} setup sectors + {syssize * 16} bytes of kernel): {_TRUNCATED_FIX}")
    if protocol < 0x208:
        return
    offset, length = struct.unpack_from("<II", head, 0x248)
    start = pm_start + offset
    if length == 0 or start + length > size:
        raise ConfigError(f"{path}: its compressed kernel ({length} bytes at offset {start}) does not fit in "
                          f"the file ({size} bytes): {_TRUNCATED_FIX}")
    with path.open("rb") as f:
        f.seek(start)
        magic = f.read(8)
    if not any(magic.startswith(known) for known in PAYLOAD_MAGICS):
        raise ConfigError(f"{path}: its compressed kernel at offset {start} starts with {magic[:6].hex(' ')}, "
                          f"not a gzip, bzip2, lzma, xz, lzo, lz4 or zstd header (damaged?): {_TRUNCATED_FIX}")


# CRC-32 of an intact image (its trailer included), as zlib computes it: build.c appends the
# CRC register (polynomial 0xEDB88320, initial 0xffffffff) without the final inversion, so
# the finalised CRC of the whole image is the CRC-32 residue of the inverted register.
CRC_RESIDUE = 0xFFFFFFFF
# Offsets from "PE\0\0": the optional header's checksum, and its certificate table entry
# (data directory 4) in a PE32+ and a PE32 optional header.
_PE_CHECKSUM, _PE_CERT_DIRECTORY = 0x58, (0xA8, 0x98)


def image_crc(data: bytes) -> int:
    """zlib's CRC-32 of *data*, the bzImage from its first byte to its CRC trailer: an intact
    image gives CRC_RESIDUE. A signed (Authenticode) image gives it once its signer's edits
    of the PE header (the checksum and the certificate table's entry) are undone."""
    crc = zlib.crc32(data)
    if crc == CRC_RESIDUE or len(data) < 0x40 or data[0x3C:0x40] == b"\0\0\0\0":
        return crc
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if pe + 0xB0 > len(data) or data[pe : pe + 4] != b"PE\0\0":
        return crc
    (magic,) = struct.unpack_from("<H", data, pe + 0x18)
    directory = pe + _PE_CERT_DIRECTORY[0 if magic == 0x20B else 1]
    if struct.unpack_from("<II", data, directory)[1] == 0:  # not signed
        return crc
    unsigned = bytearray(data)
    struct.pack_into("<I", unsigned, pe + _PE_CHECKSUM, 0)
    struct.pack_into("<II", unsigned, directory, 0, 0)
    return zlib.crc32(unsigned)


def _check_crc(path: Path, head: bytes) -> None:
    """ConfigError if the image's body does not match its CRC-32 trailer (see image_crc):
    a zeroed or overwritten body behind an intact header boots into a triple fault, which
    QEMU reports as a clean exit, once per test."""
    setup_sects = head[0x1F1] or 4
    (syssize,) = struct.unpack_from("<I", head, 0x1F4)
    length = (setup_sects + 1) * 512 + syssize * 16  # the signature of a signed image follows
    with path.open("rb") as f:
        data = f.read(length)
    if image_crc(data) != CRC_RESIDUE:
        (trailer,) = struct.unpack_from("<I", data, length - 4)
        computed = zlib.crc32(data[:-4]) ^ 0xFFFFFFFF  # the register build.c would have written
        raise ConfigError(f"{path} is damaged: its contents do not match the CRC-32 its kernel build appended "
                          f"(the trailer at byte {length - 4} says {trailer:#010x}, the {length - 4} bytes "
                          f"before it give {computed:#010x}): {_TRUNCATED_FIX}")


class _Segment(NamedTuple):
    vaddr: int
    offset: int
    filesz: int
    memsz: int


class _SymtabLocation(NamedTuple):
    offset: int
    size: int
    str_offset: int
    str_size: int


# Elf{64,32}_Sym layouts, and the positions of st_name, st_info, st_value in each.
# Elf64_Sym / Elf32_Sym: struct format, and the indices of (st_name, st_info, st_value, st_size).
_SYM_LAYOUTS = {64: ("IBBHQQ", (0, 1, 4, 5)), 32: ("IIIBBH", (0, 3, 1, 2))}
_STT_SECTION, _STT_FILE, _STB_LOCAL = 3, 4, 0


class Vmlinux:
    """The ELF image of a kernel build, with its symbol table: addresses and static contents."""

    def __init__(self, path: Path, elf: ELFFile) -> None:
        self.path = path
        self.machine: str = str(elf["e_machine"])  # "EM_X86_64": which architecture describes it
        self.section_names: tuple[str, ...] = tuple(s.name for s in elf.iter_sections() if s.name)
        self._segments = [
            _Segment(seg["p_vaddr"], seg["p_offset"], seg["p_filesz"], seg["p_memsz"])
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        ]
        self._sym_format = ("<" if elf.little_endian else ">") + _SYM_LAYOUTS[elf.elfclass][0]
        self._sym_fields = _SYM_LAYOUTS[elf.elfclass][1]
        self._symtab = _symtab_location(elf)

    @classmethod
    def open(cls, path: StrPath) -> Vmlinux:
        """Open *path*; ConfigError if it is missing, not ELF, or has no kernel symbols."""
        path = Path(path)
        fix = "pass the vmlinux at the top of the same kernel build tree (--vmlinux)"
        if _read_head(path, "vmlinux", 4, fix) != ELF_MAGIC:
            raise ConfigError(f"{path} is not an ELF file: {fix}")
        try:
            with path.open("rb") as f:
                vmlinux = cls(path, ELFFile(f))
        except (ELFError, struct.error, KeyError) as exc:
            raise ConfigError(f"{path} is not a readable ELF file ({exc}): {fix}") from exc
        vmlinux._require_symbols()
        return vmlinux

    def _require_symbols(self) -> None:
        missing = [name for name in REQUIRED_SYMBOLS if not self.has_symbol(name)]
        if missing:
            raise ConfigError(
                f"{self.path}: vmlinux without symbols (stripped?): no {', '.join(missing)}; "
                "pass the unstripped vmlinux from the top of the kernel build tree (--vmlinux), "
                "not a stripped copy or vmlinux.bin"
            )

    @cached_property
    def symbols(self) -> dict[str, int]:
        """Name -> address of every symbol in .symtab; a global wins over a local of the same name."""
        return {name: address for name, (address, _) in self._symtab_entries.items()}

    @cached_property
    def _symtab_entries(self) -> dict[str, tuple[int, int]]:
        """Name -> (address, size) of every symbol in .symtab; a global wins over a local."""
        if self._symtab is None:
            return {}
        started = time.perf_counter()
        data, strtab = self._pread(self._symtab.offset, self._symtab.size), self._pread(
            self._symtab.str_offset, self._symtab.str_size
        )
        name_at, info_at, value_at, size_at = self._sym_fields
        table: dict[str, tuple[int, int]] = {}
        is_global: set[str] = set()
        for entry in struct.iter_unpack(self._sym_format, data):
            offset, info = entry[name_at], entry[info_at]
            if offset == 0 or info & 0xF in (_STT_SECTION, _STT_FILE):
                continue
            name = strtab[offset : strtab.index(b"\0", offset)].decode("utf-8", "replace")
            if info >> 4 == _STB_LOCAL:
                table.setdefault(name, (entry[value_at], entry[size_at]))
            elif name not in is_global:
                table[name] = (entry[value_at], entry[size_at])
                is_global.add(name)
        log.debug("%s: %d symbols in %.3f s", self.path, len(table), time.perf_counter() - started)
        return table

    @cached_property
    def _names_by_address(self) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for name, address in self.symbols.items():
            found.setdefault(address, []).append(name)
        return found

    def names_at(self, address: int) -> list[str]:
        """Every symbol at *address*, sorted (aliases share an address)."""
        return sorted(self._names_by_address.get(address, ()))

    def symbol_size(self, name: str) -> int:
        """st_size of *name* (bytes of a function or object); KernelError if absent."""
        self.symbol(name)
        return self._symtab_entries[name][1]

    def has_symbol(self, name: str) -> bool:
        """True if .symtab has *name*."""
        return name in self.symbols

    def symbol(self, name: str) -> int:
        """Address of *name*; KernelError if this kernel has no such symbol."""
        try:
            return self.symbols[name]
        except KeyError as exc:
            raise KernelError(f"{self.path} has no symbol {name!r}") from exc

    @property
    def has_dwarf(self) -> bool:
        """True if the image carries DWARF debug info (GDB can see types and locals)."""
        return ".debug_info" in self.section_names or ".zdebug_info" in self.section_names

    def read(self, address: int, size: int) -> bytes:
        """The *size* bytes at virtual *address* as stored in the image (.bss reads as zeros)."""
        segment = self._segment(address, size)
        start = address - segment.vaddr
        stored = self._pread(segment.offset + start, max(0, min(size, segment.filesz - start)))
        return stored + b"\0" * (size - len(stored))

    def read_string(self, address: int, limit: int = 4096) -> str:
        """The NUL-terminated string at *address* (at most *limit* bytes)."""
        segment = self._segment(address, 1)
        data = self.read(address, min(limit, segment.vaddr + segment.memsz - address))
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    @cached_property
    def banner(self) -> str:
        """linux_banner: "Linux version 6.1.192 (root@host) (gcc ...) #1 SMP ...\\n"."""
        return self.read_string(self.symbol("linux_banner"))

    @property
    def release(self) -> str:
        """UTS_RELEASE from the banner, e.g. "6.1.192"."""
        return self.build_id.release

    @property
    def build_id(self) -> BuildId:
        """Release, user@host and UTS_VERSION from the banner."""
        return parse_version_string(self.banner.removeprefix("Linux version "), has_compiler=True)

    def _segment(self, address: int, size: int) -> _Segment:
        for seg in self._segments:
            if seg.vaddr <= address and address + size <= seg.vaddr + seg.memsz:
                return seg
        raise KernelError(f"{self.path}: {address:#x}+{size} is not in a loadable segment")

    def _pread(self, offset: int, size: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(size)


def _symtab_location(elf: ELFFile) -> _SymtabLocation | None:
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return None
    strtab = elf.get_section(symtab["sh_link"])
    return _SymtabLocation(
        symtab["sh_offset"], symtab["sh_size"], strtab["sh_offset"], strtab["sh_size"]
    )


def find_vmlinux(bzimage: Path) -> Path:
    """The vmlinux of the build tree (tree/arch/x86/boot/bzImage) or beside the bzImage."""
    candidates: list[Path] = []
    for path in dict.fromkeys([bzimage, bzimage.resolve()]):
        if path.parent.parts[-3:] == ("arch", "x86", "boot"):
            candidates.append(path.parents[3] / "vmlinux")
        candidates.append(path.parent / "vmlinux")
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(
        f"no vmlinux found for {bzimage} (looked for {looked}): "
        "pass --vmlinux with the vmlinux of the same build"
    )


@dataclass(frozen=True)
class Kernel:
    """A bzImage to boot and the vmlinux of the same build, for GDB and static checks."""

    bzimage: BzImage
    vmlinux: Vmlinux

    @classmethod
    def load(cls, bzimage_path: StrPath, vmlinux_path: StrPath | None = None) -> Kernel:
        """Read both artifacts (finding vmlinux if not given) and check they are from one build."""
        bzimage = BzImage.read(bzimage_path)
        path = Path(vmlinux_path) if vmlinux_path is not None else find_vmlinux(bzimage.path)
        vmlinux = Vmlinux.open(path)
        _check_same_build(bzimage, vmlinux)
        log.info("kernel %s: %s + %s", bzimage.release, bzimage.path, vmlinux.path)
        return cls(bzimage, vmlinux)

    @property
    def release(self) -> str:
        """UTS_RELEASE, e.g. "6.1.192"."""
        return self.bzimage.release

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        """(6, 1, 192): compare with tuples to select version-dependent invariants."""
        return version_tuple(self.release)

    @property
    def dwarf(self) -> bool:
        """True if vmlinux has DWARF, so GDB knows types (struct pt_regs) and not just symbols."""
        return self.vmlinux.has_dwarf

    @property
    def missing_for_iso(self) -> list[str]:
        """Config options (=y) this kernel lacks to mount an ISO9660 image on a virtio-blk disk."""
        return [opt for sym, opt in ISO_PAYLOAD_SYMBOLS.items() if not self.vmlinux.has_symbol(sym)]

    @property
    def payloads_on_iso(self) -> bool:
        """True if built-in drivers can mount an ISO9660 payload disk (virtio-pci, virtio-blk)."""
        return not self.missing_for_iso


def _check_same_build(bzimage: BzImage, vmlinux: Vmlinux) -> None:
    ours, theirs = bzimage.build_id, vmlinux.build_id
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    if any(a != b for a, b in pairs):
        raise ConfigError(
            f"{bzimage.path} and {vmlinux.path} are from different builds:\n"
            f"  bzImage: {bzimage.version}\n  vmlinux: {vmlinux.banner.strip()}\n"
            "pass the vmlinux built together with this bzImage (--vmlinux)"
        )

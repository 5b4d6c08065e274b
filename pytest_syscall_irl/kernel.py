"""Kernel artifacts: a bzImage, its vmlinux, and the cached build of the reference kernel.

    kernel = Kernel.load("linux/arch/x86/boot/bzImage")   # finds linux/vmlinux
    kernel.vmlinux.symbol("entry_SYSCALL_64")              # 0xffffffff81200040
    KernelBuild().build()                                  # <cache>/kernels/<key>/bzImage

No pytest here: the plugin turns ConfigError into a usage error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, NamedTuple, Union

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from filelock import FileLock, Timeout

from . import procs
from .errors import ConfigError, KernelError, SyscallIrlError, tail

log = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]
Progress = Callable[[str], None]

ELF_MAGIC = b"\x7fELF"
REQUIRED_SYMBOLS = ("entry_SYSCALL_64", "linux_banner")
# Static objects that exist in vmlinux only when their driver is built in (=y, not =m).
ISO_PAYLOAD_SYMBOLS = {
    "iso9660_fs_type": "CONFIG_ISO9660_FS",  # fs/isofs/inode.c
    "virtio_blk": "CONFIG_VIRTIO_BLK",  # drivers/block/virtio_blk.c
    "virtio_pci_driver": "CONFIG_VIRTIO_PCI",  # drivers/virtio/virtio_pci_common.c
}
DEBIAN_PACKAGE = "linux-source-6.1"
DEBIAN_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
               "cpio": "cpio", "xz": "xz-utils", "tar": "tar"}
BUILD_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
LOCK_TIMEOUT = 3600.0  # a whole build of another process, with margin
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


def version_tuple(release: str) -> tuple[int, int, int]:
    """(6, 1, 192) for "6.1.192", (6, 8, 0) for "6.8-rc1", (6, 1, 0) for "6.1.0-13-amd64"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if match is None:
        raise ConfigError(f"cannot parse kernel release {release!r}: expected MAJOR.MINOR[.PATCH]")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def _read_head(path: Path, what: str, size: int, fix: str) -> bytes:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist: {fix}")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory: {fix}")
    try:
        with path.open("rb") as f:
            return f.read(size)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


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
        return cls(path, _setup_version(path, head))

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
_SYM_LAYOUTS = {64: ("IBBHQQ", (0, 1, 4)), 32: ("IIIBBH", (0, 3, 1))}
_STT_SECTION, _STT_FILE, _STB_LOCAL = 3, 4, 0


class Vmlinux:
    """The ELF image of a kernel build, with its symbol table: addresses and static contents."""

    def __init__(self, path: Path, elf: ELFFile) -> None:
        self.path = path
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
        if self._symtab is None:
            return {}
        started = time.perf_counter()
        data, strtab = self._pread(self._symtab.offset, self._symtab.size), self._pread(
            self._symtab.str_offset, self._symtab.str_size
        )
        name_at, info_at, value_at = self._sym_fields
        table: dict[str, int] = {}
        is_global: set[str] = set()
        for entry in struct.iter_unpack(self._sym_format, data):
            offset, info = entry[name_at], entry[info_at]
            if offset == 0 or info & 0xF in (_STT_SECTION, _STT_FILE):
                continue
            name = strtab[offset : strtab.index(b"\0", offset)].decode("utf-8", "replace")
            if info >> 4 == _STB_LOCAL:
                table.setdefault(name, entry[value_at])
            elif name not in is_global:
                table[name] = entry[value_at]
                is_global.add(name)
        log.debug("%s: %d symbols in %.3f s", self.path, len(table), time.perf_counter() - started)
        return table

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


# --- the build cache ------------------------------------------------------------------------


def cache_dir() -> Path:
    """$SYSCALL_IRL_CACHE, else $XDG_CACHE_HOME/pytest-syscall-irl, else ~/.cache/pytest-syscall-irl."""
    if os.environ.get("SYSCALL_IRL_CACHE"):
        return Path(os.environ["SYSCALL_IRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-syscall-irl"


def default_fragment() -> Path:
    """The reference config fragment shipped in the repository (guest/kernel.config)."""
    return Path(__file__).resolve().parent.parent / "guest" / "kernel.config"


def _output(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def debian_source_version() -> str | None:
    """The installed version of Debian's linux-source-6.1 ("6.1.192-2"), None if not installed."""
    return _output(["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE]) or None


def compiler_id() -> str:
    """First line of `gcc --version`: a new compiler means a new cache key."""
    out = _output(["gcc", "--version"])
    if not out:
        raise KernelError("`gcc --version` failed: apt-get install build-essential")
    return out.splitlines()[0]


def tree_identity(tree: Path) -> str:
    """realpath + `make -s kernelversion` of a kernel source tree."""
    if not (tree / "Makefile").is_file() or not (tree / "arch" / "x86").is_dir():
        raise ConfigError(f"{tree} is not a Linux source tree (no Makefile and arch/x86): fix --tree")
    version = _output(["make", "-s", "-C", str(tree), "kernelversion"])
    if not version:
        raise ConfigError(f"`make -s kernelversion` failed in {tree}: is it a Linux source tree?")
    return f"{os.path.realpath(tree)}={version.splitlines()[-1]}"


def build_key(source_identity: str, fragment_text: str, compiler: str) -> str:
    """The cache key of one build: 16 hex digits of sha256(source, fragment, compiler)."""
    digest = hashlib.sha256("\0".join((source_identity, fragment_text, compiler)).encode())
    return digest.hexdigest()[:16]


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value of a .config or fragment; "# CONFIG_X is not set" -> "n"."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if unset:
            values[unset[1]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
    return values


def dropped_options(fragment_text: str, config_text: str) -> list[str]:
    """Options of the fragment that the final .config does not have as requested."""
    final = parse_config(config_text)
    return [
        f"{name}={want} (final .config: {'is not set' if final.get(name, 'n') == 'n' else final[name]})"
        for name, want in parse_config(fragment_text).items()
        if final.get(name, "n") != want
    ]


def missing_build_deps() -> list[str]:
    """Debian packages whose tools or headers a kernel build needs and this machine lacks."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [pkg for header, pkg in BUILD_HEADERS.items() if not Path(header).exists()]
    return sorted(set(missing))


def reference_kernel(cache: Path | None = None) -> Path | None:
    """The cached bzImage of Debian's source + the default fragment if built, else None (fast)."""
    try:
        build = KernelBuild(cache=cache)
        return build.bzimage if build.is_complete() else None
    except SyscallIrlError as exc:
        log.debug("no reference kernel: %s", exc)
        return None


def _atomic_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temporary)
    shutil.copymode(source, temporary)
    os.replace(temporary, target)


def _atomic_write(target: Path, text: str) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


class KernelBuild:
    """One kernel build in the cache: a source (Debian's tarball or a tree), a fragment, a compiler.

        build = KernelBuild(jobs=2, on_stage=print, on_output=print)
        bzimage = build.build()   # reused at once when the cache already holds it
    """

    def __init__(
        self,
        tree: StrPath | None = None,
        fragment: StrPath | None = None,
        *,
        jobs: int | None = None,
        cache: Path | None = None,
        on_stage: Progress | None = None,
        on_output: Progress | None = None,
    ) -> None:
        self.tree = Path(tree) if tree is not None else None
        self.fragment = Path(fragment) if fragment is not None else default_fragment()
        self.jobs = jobs or os.cpu_count() or 1
        self.cache = cache if cache is not None else cache_dir()
        self._on_stage = on_stage
        self._on_output = on_output

    @cached_property
    def fragment_text(self) -> str:
        """Contents of the config fragment."""
        try:
            return self.fragment.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config fragment {self.fragment}: {exc}") from exc

    @cached_property
    def source_identity(self) -> str:
        """"debian-linux-source-6.1=<version>", or "<realpath>=<kernelversion>" for a tree."""
        if self.tree is not None:
            return tree_identity(self.tree)
        version = debian_source_version()
        if version is None:
            raise KernelError(f"{DEBIAN_PACKAGE} is not installed: apt-get install {DEBIAN_PACKAGE}")
        return f"debian-{DEBIAN_PACKAGE}={version}"

    @cached_property
    def key(self) -> str:
        """The cache key (see build_key)."""
        return build_key(self.source_identity, self.fragment_text, compiler_id())

    @property
    def directory(self) -> Path:
        """<cache>/kernels/<key>: bzImage, vmlinux, config, build.log, obj/, complete."""
        return self.cache / "kernels" / self.key

    @property
    def bzimage(self) -> Path:
        """Where the built bzImage is (or will be)."""
        return self.directory / "bzImage"

    @property
    def vmlinux(self) -> Path:
        """Where the built vmlinux is (or will be)."""
        return self.directory / "vmlinux"

    @property
    def log_path(self) -> Path:
        """The log of the last build of this key."""
        return self.directory / "build.log"

    def is_complete(self) -> bool:
        """True if a build of this key finished and its artifacts are in place."""
        return all((self.directory / name).is_file() for name in ("complete", "bzImage", "vmlinux"))

    def build(self) -> Path:
        """Build unless the cache has it (Debian source) and return the bzImage path.

        A tree given explicitly is always re-made (incrementally): its sources may have changed.
        """
        if self.tree is None and self.is_complete():
            self._stage(f"reusing {self.directory}")
            return self.bzimage
        self._check_deps()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked(self.directory.with_name(f"{self.key}.lock"), f"building {self.key}"):
            if self.tree is None and self.is_complete():
                self._stage(f"reusing {self.directory}, built meanwhile by another process")
                return self.bzimage
            self._build_locked()
        return self.bzimage

    def _build_locked(self) -> None:
        started = time.monotonic()
        (self.directory / "complete").unlink(missing_ok=True)
        with self.log_path.open("w") as build_log:
            source = self.tree if self.tree is not None else self._debian_tree(build_log)
            self._configure(source, build_log)
            self._stage(f"building bzImage with {self.jobs} jobs (log: {self.log_path})")
            self._run(build_log, self._make(source, f"-j{self.jobs}", "bzImage"))
        self._install()
        self._stage(f"built {self.bzimage} in {time.monotonic() - started:.0f} s")

    def _configure(self, source: Path, build_log: IO[str]) -> None:
        obj = self.directory / "obj"
        obj.mkdir(exist_ok=True)
        self._stage(f"configuring {source} (tinyconfig + {self.fragment})")
        self._run(build_log, self._make(source, "tinyconfig"))
        merge = ["scripts/kconfig/merge_config.sh", "-m", "-O", str(obj), str(obj / ".config"),
                 str(self.fragment.resolve())]
        self._run(build_log, merge, cwd=source)
        self._run(build_log, self._make(source, "olddefconfig"))
        dropped = dropped_options(self.fragment_text, (obj / ".config").read_text())
        if dropped:
            raise KernelError(
                f"options of {self.fragment} did not survive `make olddefconfig` (a dependency is "
                "off; e.g. RANDOMIZE_BASE needs RELOCATABLE): add what they depend on:\n  "
                + "\n  ".join(dropped)
            )

    def _make(self, source: Path, *targets: str) -> list[str]:
        return ["make", "-C", str(source), f"O={self.directory / 'obj'}", *targets]

    def _install(self) -> None:
        obj = self.directory / "obj"
        _atomic_copy(obj / "arch" / "x86" / "boot" / "bzImage", self.bzimage)
        _atomic_copy(obj / "vmlinux", self.vmlinux)
        _atomic_copy(obj / ".config", self.directory / "config")
        try:
            kernel = Kernel.load(self.bzimage)
        except ConfigError as exc:
            raise KernelError(f"the build produced unusable artifacts: {exc.message}") from exc
        record = {"source": self.source_identity, "fragment": str(self.fragment),
                  "fragment_sha256": hashlib.sha256(self.fragment_text.encode()).hexdigest(),
                  "compiler": compiler_id(), "version": kernel.bzimage.version}
        _atomic_write(self.directory / "complete", json.dumps(record, indent=1) + "\n")

    def _debian_tree(self, build_log: IO[str]) -> Path:
        version = self.source_identity.rpartition("=")[2]
        target = self.cache / "src" / f"{DEBIAN_PACKAGE}-{version}"
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(target.with_name(f"{target.name}.lock"), f"extracting {DEBIAN_TARBALL}"):
            if not target.is_dir():
                self._extract(target, build_log)
        return target

    def _extract(self, target: Path, build_log: IO[str]) -> None:
        if not DEBIAN_TARBALL.is_file():
            raise KernelError(f"{DEBIAN_TARBALL} is missing: apt-get install {DEBIAN_PACKAGE}")
        self._stage(f"extracting {DEBIAN_TARBALL} to {target}")
        scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
        try:
            self._run(build_log, ["tar", "-xf", str(DEBIAN_TARBALL), "-C", str(scratch)])
            # The rename makes the tree appear whole or not at all.
            os.rename(scratch / DEBIAN_PACKAGE, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check_deps(self) -> None:
        missing = missing_build_deps()
        if missing:
            raise KernelError(f"building a kernel needs: apt-get install {' '.join(missing)}")

    def _run(self, build_log: IO[str], command: list[str], cwd: Path | None = None) -> None:
        build_log.write(f"$ {' '.join(command)}\n")
        build_log.flush()
        env = {k: v for k, v in os.environ.items() if k not in ("KCONFIG_CONFIG", "KCONFIG_ALLCONFIG")}
        proc = procs.spawn(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                build_log.write(line)
                if self._on_output is not None:
                    self._on_output(line.rstrip("\n"))
            code = proc.wait()
        finally:
            _stop_group(proc)
        build_log.flush()
        if code != 0:
            raise KernelError(f"kernel build step failed (log: {self.log_path})", command=command,
                              exit_code=code, log_tail=tail(self.log_path.read_text()))

    @contextmanager
    def _locked(self, path: Path, what: str) -> Iterator[None]:
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self._stage(f"waiting for another process {what} (lock {path})")
            try:
                lock.acquire(timeout=LOCK_TIMEOUT)
            except Timeout as exc:
                raise KernelError(f"gave up after {LOCK_TIMEOUT:.0f} s waiting for {path}") from exc
        try:
            yield
        finally:
            lock.release()

    def _stage(self, message: str) -> None:
        log.info("%s", message)
        if self._on_stage is not None:
            self._on_stage(message)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill make and its compilers (their own process group) if we leave early (Ctrl-C, error)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    procs.stop(proc)

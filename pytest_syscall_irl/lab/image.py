"""The guest image: a busybox initramfs, guest payloads compiled with musl-gcc, and an
ISO9660 image carrying the payloads (built with pycdlib).

Everything is cached by content hash under the cache directory (`core.cache`): built
once under a file lock, however many xdist workers or runs ask, appearing whole by
atomic rename, and built again (with a warning) when a file no longer matches its record.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pycdlib
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import InterpSegment

from ..core import shipped
from ..core.cache import CacheEntry
from ..core.errors import ImageError
from ..kernel.modules import GuestModules

log = logging.getLogger(__name__)

GUEST_DIR = shipped.GUEST_DIR
BUSYBOX = "/bin/busybox"
MUSL_GCC = "musl-gcc"
ISO_VOLUME = "SIRL_PAYLOADS"
AGENT = "sirl-agent"
# Static programs of the host's Debian packages that travel as payloads when installed:
# bash (bash-static) has the history support Debian's busybox ash lacks.
HOST_PAYLOADS = {"bash": "/bin/bash-static"}
# Bump when what a cached directory holds changes (2: each has a manifest; 3: the manifest
# is core.cache's record, which keeps mtimes and nests the files under "files").
CACHE_FORMAT = b"sirl-cache-3"


GUEST_PAYLOAD_DIR = "/payloads"
GUEST_MODULE_DIR = "lib/modules/sirl"  # guest/init inserts every .ko here, in name order


@dataclass(frozen=True)
class Payload:
    """A guest program: its binary on the host and its path in the guest."""

    name: str
    path: Path

    @property
    def guest_path(self) -> str:
        return f"{GUEST_PAYLOAD_DIR}/{self.name}"

    @property
    def bits(self) -> int:
        """64 for an x86_64 program, 32 for an i386 one (its ELF class)."""
        with open(self.path, "rb") as f:
            return int(ELFFile(f).elfclass)

    @property
    def entry(self) -> int:
        """The program's entry point (ELF e_entry): where execve starts it."""
        with open(self.path, "rb") as f:
            return int(ELFFile(f).header["e_entry"])

    def symbol(self, name: str) -> int:
        """Address of symbol *name* (payloads are static and non-PIE: the address in the guest)."""
        with open(self.path, "rb") as f:
            symtab = ELFFile(f).get_section_by_name(".symtab")
            found = symtab.get_symbol_by_name(name) if isinstance(symtab, SymbolTableSection) else None
        if not found:
            raise ImageError(f"payload {self.name} has no symbol {name!r}")
        return int(found[0]["st_value"])

    def read(self, address: int, size: int) -> bytes:
        """*size* bytes of the program image at *address* (from its loadable segments)."""
        with open(self.path, "rb") as f:
            for segment in ELFFile(f).iter_segments():
                start, filesz = segment["p_vaddr"], segment["p_filesz"]
                if segment["p_type"] == "PT_LOAD" and start <= address and address + size <= start + filesz:
                    f.seek(segment["p_offset"] + address - start)
                    return f.read(size)
        raise ImageError(f"payload {self.name}: {address:#x}+{size} is not in a loaded segment")


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what QEMU gets as -initrd and, with delivery "iso", -drive."""

    initramfs: Path
    iso: Path | None
    payloads: dict[str, Path]

    @property
    def delivery(self) -> str:
        """Where the guest finds its payloads: "iso" or "initramfs"."""
        return "iso" if self.iso is not None else "initramfs"

    def payload(self, name: str) -> Payload:
        """The payload compiled from guest/payloads/<name>.c."""
        if name not in self.payloads:
            raise ImageError(f"no guest payload {name!r}: add {name}.c to guest/payloads/ or to a directory "
                             f"given with --syscall-irl-payloads "
                             f"(have: {', '.join(sorted(self.payloads))})")
        return Payload(name, self.payloads[name])


# --- cpio (newc) -----------------------------------------------------------------

@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive; mode includes the file type bits."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _cpio_header(ino: int, entry: CpioEntry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0]
    header = b"070701" + b"".join(b"%08X" % value for value in fields) + name
    return header + b"\0" * (-len(header) % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc cpio archive (the initramfs format) with uid/gid 0 and mtime 0."""
    out = io.BytesIO()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        out.write(_cpio_header(ino, entry))
        out.write(entry.data + b"\0" * (-len(entry.data) % 4))
    return out.getvalue()


def _directory(name: str) -> CpioEntry:
    return CpioEntry(name, 0o040755)


def _file(name: str, data: bytes, mode: int = 0o755) -> CpioEntry:
    return CpioEntry(name, 0o100000 | mode, data)


def _symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, 0o120777, target.encode())


def _busybox_applets(busybox: str) -> list[str]:
    result = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True)
    return sorted(line for line in result.stdout.split() if line)


def initramfs_entries(busybox: str, init: bytes, agent: bytes, payloads: dict[str, Path] | None,
                      modules: GuestModules = GuestModules()) -> list[CpioEntry]:
    """Initramfs members: busybox with its applet links, /init, the agent, /dev/console,
    the kernel modules the guest inserts, and the payloads if they are embedded."""
    entries = [_directory(d) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc",
                                        "sys", "tmp", "root", "payloads")]
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    entries.append(CpioEntry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(_file("bin/busybox", Path(busybox).read_bytes()))
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            entries.append(_symlink(applet, "/bin/busybox"))
    entries.append(_file("init", init))
    entries.append(_file(f"bin/{AGENT}", agent))
    if modules.files:
        entries += [_directory("lib"), _directory("lib/modules"), _directory(GUEST_MODULE_DIR)]
        entries += [_file(f"{GUEST_MODULE_DIR}/{name}", data, 0o644) for name, data in modules.files]
    if payloads is not None:
        entries.append(_file("payloads/.embedded", b""))
        entries += [_file(f"payloads/{name}", path.read_bytes()) for name, path in sorted(payloads.items())]
    return entries


# --- payloads and ISO --------------------------------------------------------------

I386_SUFFIX = ".i386.c"
# i386 programs are freestanding (guest/payloads/sirl32.h has their _start): musl-gcc
# builds only x86_64, and gcc -m32 needs no 32-bit libraries when nothing is linked in.
I386_FLAGS = ["-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pic", "-no-pie", "-fno-stack-protector",
              "-fno-asynchronous-unwind-tables"]
COMMON_FLAGS = ["-O2", "-g", "-Wall", "-Werror"]


@dataclass(frozen=True)
class ProgramSource:
    """A guest program to build (a C file) or to ship as it is (a static ELF file)."""

    name: str
    path: Path

    @property
    def prebuilt(self) -> bool:
        return not self.path.name.endswith(".c")

    @property
    def i386(self) -> bool:
        return self.path.name.endswith(I386_SUFFIX)


def _program_name(path: Path) -> str | None:
    """The guest name of a file of a payload directory, None if it is not a program:
    NAME.c (x86_64, musl), NAME.i386.c (i386, freestanding), or a file without a suffix,
    a static ELF program (ImageError if it is not one: shipped, it would fail in the guest
    as "not found" or "Exec format error", far from the cause). Other files (headers) are
    what the sources include."""
    if path.name.endswith(I386_SUFFIX):
        return path.name[: -len(I386_SUFFIX)]
    if path.suffix == ".c":
        return path.stem
    if path.suffix or not path.is_file() or path.name.startswith("."):
        return None
    problem = static_elf_problem(path)
    if problem is not None:
        raise ImageError(f"guest program {path} {problem}: the guest has no dynamic loader nor libraries, so "
                         f"ship a static x86_64 or i386 ELF (gcc -static, musl-gcc -static), or its C source "
                         f"as {path.name}.c; other files of a payload directory need a suffix (NAME.h)")
    return path.name


def static_elf_problem(path: Path) -> str | None:
    """None if *path* is a static ELF program; else what it is instead ("is not an ELF
    file", "is dynamically linked (needs /lib64/ld-linux-x86-64.so.2)")."""
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return "is not an ELF file"
        f.seek(0)
        try:
            elf = ELFFile(f)
            interp = next((seg.get_interp_name() for seg in elf.iter_segments() if isinstance(seg, InterpSegment)),
                          None)
            dynamic = elf.get_section_by_name(".dynamic")
            tags = dynamic.iter_tags() if isinstance(dynamic, DynamicSection) else []
            needed = [str(getattr(tag, "needed", "?")) for tag in tags if tag.entry.d_tag == "DT_NEEDED"]
        except (ELFError, struct.error) as exc:
            return f"is not a readable ELF file ({exc})"
    if interp is not None:
        return f"is dynamically linked (needs {interp})"
    if needed:
        return f"is dynamically linked (needs {', '.join(needed)})"
    return None


def payload_sources(guest_dir: Path = GUEST_DIR, extra_dirs: Iterable[Path] = ()) -> dict[str, ProgramSource]:
    """The guest payloads by program name: guest/payloads/ and every extra directory.
    Two programs of one name are an error: which one a test means would be a guess."""
    found: dict[str, ProgramSource] = {}
    for directory in [guest_dir / "payloads", *extra_dirs]:
        if not directory.is_dir():
            raise ImageError(f"payload directory {directory} does not exist: pass a directory of C files "
                             f"(NAME.c, NAME{I386_SUFFIX}) or static ELF programs")
        for path in sorted(directory.iterdir()):
            name = _program_name(path)
            if name is None:
                continue
            if name in found:
                raise ImageError(f"two guest programs named {name!r}: {found[name].path} and {path}; rename one")
            found[name] = ProgramSource(name, path)
    return found


def _compile(musl_gcc: str, program: ProgramSource, out: Path, include: Path) -> None:
    if program.prebuilt:
        shutil.copyfile(program.path, out)
        os.chmod(out, 0o755)
        return
    if program.i386:
        command = ["gcc", *I386_FLAGS, *COMMON_FLAGS, f"-I{include}", "-o", str(out), str(program.path)]
    else:
        command = [musl_gcc, "-static", *COMMON_FLAGS, f"-I{include}", "-o", str(out), str(program.path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"cannot compile guest program {program.path}", command=command,
                         exit_code=result.returncode, log_tail=result.stderr)


def build_iso(payloads: dict[str, Path], out: Path) -> None:
    """An ISO9660 (Rock Ridge) image with each payload executable at its top level."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", vol_ident=ISO_VOLUME)
    try:
        for name, path in sorted(payloads.items()):
            data = path.read_bytes()
            iso_name = "/" + name.upper().replace("-", "_")[:30] + ".;1"
            # Without file_mode the guest gets "Permission denied" (exit 126).
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, file_mode=0o100555)
        iso.write(str(out))
    finally:
        iso.close()


# --- cache -------------------------------------------------------------------------

def _digest(*parts: bytes) -> str:
    h = hashlib.sha256(CACHE_FORMAT)
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _tool_identity(command: list[str]) -> bytes:
    try:
        return subprocess.run(command, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"{command[0]} is not usable: install it (apt-get install musl-tools "
                         f"busybox-static)", command=command) from exc


def _entry(directory: Path, what: str) -> CacheEntry:
    return CacheEntry(directory, what, error=ImageError)


def build_programs(cache: Path, guest_dir: Path = GUEST_DIR, musl_gcc: str = MUSL_GCC,
                   extra_dirs: Iterable[Path] = ()) -> dict[str, Path]:
    """Compile the guest agent and every payload (x86_64 static with musl, i386
    freestanding), from guest/payloads/ and *extra_dirs*; cached by sources and
    compilers. Returns the payloads by name, and the agent as AGENT."""
    extra_dirs = [Path(d) for d in extra_dirs]
    programs = {**payload_sources(guest_dir, extra_dirs), AGENT: ProgramSource(AGENT, guest_dir / "agent.c")}
    if shutil.which(musl_gcc) is None:
        raise ImageError(f"{musl_gcc} not found: install it with `apt-get install musl-tools`")
    # Every file of the payload directories counts: the programs share headers.
    inputs = [p for d in [guest_dir / "payloads", *extra_dirs] for p in sorted(d.iterdir()) if p.is_file()]
    key = _digest(_tool_identity([musl_gcc, "--version"]), _tool_identity(["gcc", "--version"]),
                  *(p.name.encode() + p.read_bytes() for p in [*inputs, guest_dir / "agent.c"]))
    directory = cache / "programs" / key

    def compile_all(staging: Path) -> None:
        for name, program in programs.items():
            log.info("building guest program %s", name)
            _compile(musl_gcc, program, staging / name, guest_dir / "payloads")

    _entry(directory, "guest programs").ensure(compile_all)
    return {name: directory / name for name in programs}


def check_payloads(cache: Path, extra_dirs: Iterable[Path], guest_dir: Path = GUEST_DIR,
                   musl_gcc: str = MUSL_GCC) -> None:
    """Everything `build_programs` would find wrong with the payload directories, found once
    before the first test: two programs of one name, a file that is not a static program,
    a source that does not compile (compiled here, into the cache the guests then use).
    ImageError says what and where."""
    build_programs(cache, guest_dir, musl_gcc, extra_dirs)


def build_guest_image(cache: Path, *, payloads_on_iso: bool, guest_dir: Path = GUEST_DIR,
                      busybox: str = BUSYBOX, musl_gcc: str = MUSL_GCC,
                      payload_dirs: Iterable[Path] = (), modules: GuestModules = GuestModules()) -> GuestImage:
    """Build (or reuse) the guest image for a kernel that can (or cannot) mount the ISO,
    with the built-in payloads and those of *payload_dirs*, and the kernel *modules* its
    init inserts first."""
    if not os.access(busybox, os.X_OK):
        raise ImageError(f"{busybox} not found: install it with `apt-get install busybox-static`")
    programs = build_programs(cache, guest_dir, musl_gcc, payload_dirs)
    agent = programs.pop(AGENT).read_bytes()
    payloads = {**programs, **{name: Path(path) for name, path in HOST_PAYLOADS.items() if os.path.exists(path)}}
    init = (guest_dir / "init").read_bytes()
    key = _digest(b"iso" if payloads_on_iso else b"initramfs", init, agent, Path(busybox).read_bytes(),
                  *(name.encode() + p.read_bytes() for name, p in sorted(payloads.items())),
                  *([modules.digest] if modules.files else []))
    directory = cache / "images" / key

    def build(staging: Path) -> None:
        embedded = None if payloads_on_iso else payloads
        archive = cpio_newc(initramfs_entries(busybox, init, agent, embedded, modules))
        (staging / "initramfs.cpio.gz").write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
        if payloads_on_iso:
            build_iso(payloads, staging / "payloads.iso")

    _entry(directory, "guest image").ensure(build)
    iso = directory / "payloads.iso"
    return GuestImage(directory / "initramfs.cpio.gz", iso if iso.exists() else None, payloads)

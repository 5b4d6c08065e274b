"""What a run tests with, said once for the report header, the JUnit testsuite properties and
the HTML page: each kernel (release, bzImage, vmlinux, and its identity: `KernelIdentity`),
QEMU and GDB versions, the accelerator. The pytest layer writes them (plugin/header.py).

A kernel's identity is what tells two builds of one release apart: the bzImage's SHA-256, the
`Linux version` banner, the SHA-256 of the config it was built with (and where that was found),
and, for a bzImage inside a kernel's git work tree, its commit and whether tracked files
changed. `kernel_identity(kernel)` computes it once per kernel per process (a few ms: see
`tests/test_identity.py`); `.as_dict()` is what a diff of two runs compares.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import subprocess
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..kernel.artifacts import BzImage, Kernel

if TYPE_CHECKING:
    from ..lab.settings import LabSettings

log = logging.getLogger(__name__)

# git answers in milliseconds; a status over a cold kernel tree on a slow disk can take seconds.
# Past this, the identity says "unknown" rather than hold up the run.
GIT_TIMEOUT = 20.0
BANNER_FROM_VMLINUX = "vmlinux linux_banner"
BANNER_FROM_BZIMAGE = "bzImage kernel_version (no compiler)"


# JUnit property names (after "syscall-irl kernel[<id>] ") of a kernel's identity; a property
# whose value is unknown is left out.
IDENTITY_PROPERTIES = {"bzimage_sha256": "bzImage sha256", "banner": "banner", "banner_source": "banner source",
                       "config_sha256": "config sha256", "config_source": "config source", "git_tree": "git tree",
                       "git_commit": "git commit", "git_dirty": "git dirty"}


@dataclass(frozen=True)
class KernelIdentity:
    """Which kernel a run tested, beyond its release. None where a thing is unknown: no config
    found, the bzImage not in a kernel's git work tree, git missing or too slow."""

    release: str
    bzimage: str  # its path
    bzimage_sha256: str
    banner: str  # "Linux version 6.1.192 (root@host) (gcc ...) #1 SMP ..."
    banner_source: str  # BANNER_FROM_VMLINUX or BANNER_FROM_BZIMAGE
    config_sha256: str | None = None
    config_source: str | None = None  # a path, or "IKCONFIG in <vmlinux>"
    git_tree: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None  # tracked files differ from the commit

    def as_dict(self) -> dict[str, str | bool | None]:
        """Plain data (JSON-able, picklable): what a diff of two runs compares."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelIdentity:
        """The identity `as_dict` gave (after a trip through JSON, from an xdist worker)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @property
    def short(self) -> str:
        """The bzImage's SHA-256, 12 digits (as git abbreviates a commit)."""
        return self.bzimage_sha256[:12]

    @property
    def git_text(self) -> str:
        """The git state in words, for the header."""
        if self.git_commit is None:
            return "not built in a kernel git work tree"
        dirty = {True: "dirty: tracked files changed", False: "clean", None: "dirty or not: git status failed"}
        return f"git {self.git_commit} ({dirty[self.git_dirty]}) in {self.git_tree}"

    @property
    def config_text(self) -> str:
        """The config's hash and where it was found, in words."""
        if self.config_sha256 is None:
            return "config: none found (no IKCONFIG, .config, config beside the bzImage or /boot/config-<release>)"
        return f"config sha256 {self.config_sha256} ({self.config_source})"

    def header_lines(self, name: str) -> list[str]:
        """The header's lines of the identity of the kernel called *name* ("kernel", "kernel[<id>]",
        "syscall-irl: baseline"): its banner, and its hashes and git state."""
        return [f"{name} {self.banner} (from the {self.banner_source})",
                f"{name} bzImage sha256 {self.bzimage_sha256}; {self.config_text}; {self.git_text}"]

    def properties(self) -> dict[str, str]:
        """The identity as JUnit property values by name (IDENTITY_PROPERTIES); an unknown one is
        left out, a bool is "true"/"false"."""
        data = self.as_dict()
        return {name: str(data[key]).lower() if isinstance(data[key], bool) else str(data[key])
                for key, name in IDENTITY_PROPERTIES.items() if data[key] is not None}


def kernel_identity(kernel: Kernel) -> KernelIdentity:
    """The identity of *kernel*, computed once per process for each bzImage as it is on disk
    (path, mtime, size): a run asks for it in its header, its JUnit properties and its reports."""
    stat = kernel.bzimage.path.stat()
    return _cached_identity(kernel, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _cached_identity(kernel: Kernel, mtime_ns: int, size: int) -> KernelIdentity:
    return identity_of(kernel.bzimage, kernel.vmlinux)


class SymbolImage(Protocol):
    """What the identity reads of a vmlinux (`kernel.artifacts.Vmlinux`)."""

    path: Path

    @property
    def banner(self) -> str: ...

    def has_symbol(self, name: str) -> bool: ...

    def symbol(self, name: str) -> int: ...

    def read(self, address: int, size: int) -> bytes: ...


def identity_of(bzimage: BzImage, vmlinux: SymbolImage | None) -> KernelIdentity:
    """The identity of a bzImage and (if there is one) its vmlinux; see KernelIdentity."""
    if vmlinux is not None:
        banner, banner_source = vmlinux.banner.strip(), BANNER_FROM_VMLINUX
    else:
        banner, banner_source = f"Linux version {bzimage.version}", BANNER_FROM_BZIMAGE
    config = find_config(bzimage.path, vmlinux, bzimage.release)
    git = git_state(bzimage.path)
    return KernelIdentity(
        release=bzimage.release, bzimage=str(bzimage.path), bzimage_sha256=file_sha256(bzimage.path),
        banner=banner, banner_source=banner_source,
        config_sha256=hashlib.sha256(config[0]).hexdigest() if config else None,
        config_source=config[1] if config else None,
        git_tree=git.tree if git else None, git_commit=git.commit if git else None,
        git_dirty=git.dirty if git else None)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's contents, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ikconfig(vmlinux: SymbolImage) -> bytes | None:
    """The config embedded by CONFIG_IKCONFIG (kernel/configs.c, 5.1+: the gzipped .config between
    the symbols kernel_config_data and kernel_config_data_end); None if there is none."""
    if not (vmlinux.has_symbol("kernel_config_data") and vmlinux.has_symbol("kernel_config_data_end")):
        return None
    start = vmlinux.symbol("kernel_config_data")
    size = vmlinux.symbol("kernel_config_data_end") - start
    if not 0 < size < 1 << 24:
        return None
    try:
        return gzip.decompress(vmlinux.read(start, size))
    except (OSError, EOFError, zlib.error):
        log.warning("%s: IKCONFIG data at %#x does not decompress", vmlinux.path, start)
        return None


def config_candidates(bzimage: Path, vmlinux: Path | None, release: str) -> list[Path]:
    """Where a bzImage's config may be, best first: the build tree's .config (the bzImage at
    tree/arch/x86/boot/bzImage, or the vmlinux at the top of the tree), a `config` beside the
    bzImage (a cache entry of `syscall-irl kernel build`) or `config-<release>` (a distribution's
    /boot), then the running system's /boot/config-<release>."""
    found: list[Path] = []
    for path in dict.fromkeys([bzimage, bzimage.resolve()]):
        if path.parent.parts[-3:] == ("arch", "x86", "boot"):
            found.append(path.parents[3] / ".config")
    if vmlinux is not None:
        found.append(vmlinux.parent / ".config")
    for path in dict.fromkeys([bzimage, bzimage.resolve()]):
        found += [path.parent / "config", path.parent / f"config-{release}"]
    found.append(Path("/boot") / f"config-{release}")
    return list(dict.fromkeys(found))


def find_config(bzimage: Path, vmlinux: SymbolImage | None, release: str) -> tuple[bytes, str] | None:
    """(the config's text, where it came from): IKCONFIG first, since it is the very config the
    image was built with (a build tree's .config may have been edited since), then the files of
    `config_candidates`; None if there is none."""
    if vmlinux is not None:
        embedded = ikconfig(vmlinux)
        if embedded is not None:
            return embedded, f"IKCONFIG in {vmlinux.path}"
    for candidate in config_candidates(bzimage, vmlinux.path if vmlinux else None, release):
        try:
            return candidate.read_bytes(), str(candidate)
        except OSError:
            continue
    return None


class GitState(NamedTuple):
    """The kernel git work tree a bzImage was built in."""

    tree: str
    commit: str
    dirty: bool | None  # None: `git status` failed or took too long


def _git(directory: Path, *args: str) -> str | None:
    """git's output, stripped; None if git is missing, fails, or takes longer than GIT_TIMEOUT.
    No optional locks: a status must not write the index of a tree someone is working in."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(directory), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("git %s in %s: %s", " ".join(args), directory, exc)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(bzimage: Path) -> GitState | None:
    """The kernel git work tree holding *bzimage* (or, for an O= build, the source tree its build
    directory links to as `source`), its HEAD and whether tracked files changed (untracked ones,
    build products included, do not count). A git work tree that is not a kernel source tree
    (no Kbuild at its top: a CI workspace holding a copied bzImage) is not the kernel's commit."""
    resolved = bzimage.resolve()
    directories = [resolved.parent]
    if resolved.parent.parts[-3:] == ("arch", "x86", "boot"):
        directories.append(resolved.parents[3] / "source")
    for directory in directories:
        top = _git(directory, "rev-parse", "--show-toplevel") if directory.is_dir() else None
        if top and (Path(top) / "Kbuild").is_file():
            commit = _git(Path(top), "rev-parse", "HEAD")
            if commit:
                status = _git(Path(top), "status", "--porcelain", "--untracked-files=no")
                return GitState(top, commit, None if status is None else bool(status))
    return None


# --- the run's description: header lines, JUnit properties, suite name ----------------------

class RunIdentity(NamedTuple):
    """What a run says of itself: its header lines, its JUnit testsuite properties, and the JUnit
    suite name that keeps its report apart from other CI jobs' when reports are merged."""

    lines: list[str]
    properties: list[tuple[str, str]]
    suite_name: str


def version_line(program: str) -> str:
    """The first line of `program --version` (the program's path if it prints nothing)."""
    out = subprocess.run([program, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else program


def describe(every: Sequence[LabSettings]) -> RunIdentity:
    """The identity of a run with these settings, one per kernel under test (QEMU, GDB and
    the accelerator are the run's)."""
    from ..lab.accel import decide_accel  # QEMU's modules load only when needed
    settings = every[0]
    accel, why = decide_accel(settings)
    qemu, gdb = version_line(settings.qemu), version_line(settings.gdb)
    lines = [
        *(f"syscall-irl: {line}" for line in kernel_lines(every)),
        f"syscall-irl: {qemu}; {gdb}",
        f"syscall-irl: accelerator {accel} ({why})",
        "syscall-irl: guests " + (f"restored from a saved ready guest ({settings.cache / 'snapshots'})"
                                  if settings.snapshots else "cold-booted (--syscall-irl-no-snapshots)"),
    ]
    properties = [*kernel_properties(every), ("syscall-irl qemu", qemu), ("syscall-irl gdb", gdb),
                  ("syscall-irl accelerator", accel)]
    return RunIdentity(lines, properties, suite_name(every))


def kernel_lines(settings: Sequence[LabSettings]) -> list[str]:
    """What a report header says of each kernel under test (named by its id when there are several)."""
    from ..lab.settings import kernel_ids  # here: the KCIDB option's module imports this one at startup

    lines = []
    for kernel_id, one in zip(kernel_ids(settings), settings):
        about, identity = one.describe(), kernel_identity(one.kernel)
        name = f"kernel[{kernel_id}]" if len(settings) > 1 else "kernel"
        lines += [f"{name} {about['release']} ({about['bzImage']})",
                  *identity.header_lines(name),
                  f"{name} vmlinux {about['vmlinux']}; modules {about['modules']}; payloads via {about['payloads']}",
                  f"{name} {channel_line(one)}"]
    return lines


def channel_line(settings: LabSettings) -> str:
    """Where the guest's commands travel: the agent's own serial port, or (the fallback, for a
    kernel that drives one 8250 port) the kernel's console, where output is cleaned by pattern."""
    from ..kernel.check import command_channel
    if command_channel(settings.kernel) == "ttyS1":
        return "commands on ttyS1, a serial port of their own: output byte-exact"
    return ("commands on ttyS0, shared with the kernel's messages (the kernel drives one 8250 port: "
            "CONFIG_SERIAL_8250_RUNTIME_UARTS < 2): output cleaned by pattern, a program printing Oops or BUG "
            "counts as a kernel crash")


def kernel_properties(settings: Sequence[LabSettings]) -> list[tuple[str, str]]:
    """Each kernel under test, its identity and its options as (name, value) pairs, for JUnit's
    testsuite properties: `syscall-irl kernel[<id>] <name>`. Values are plain: `vmlinux` is the
    path, whether it has DWARF is `vmlinux DWARF` (yes/no)."""
    from ..lab.settings import kernel_ids

    found = []
    for kernel_id, one in zip(kernel_ids(settings), settings):
        about = {**one.describe(), "vmlinux": str(one.kernel.vmlinux.path),
                 "vmlinux DWARF": "yes" if one.kernel.dwarf else "no", **kernel_identity(one.kernel).properties()}
        found += [(f"syscall-irl kernel[{kernel_id}] {name}", value) for name, value in about.items()]
    return found


def suite_name(settings: Sequence[LabSettings]) -> str:
    """The JUnit suite name of a run: its kernels (release and bzImage hash, joined by "+"), and a
    hash of the boot arguments when there are some, so that the reports of several CI jobs (a
    matrix of kernels and boot arguments) merge without two suites of one name."""
    kernels = "+".join(f"{one.kernel.release}.{kernel_identity(one.kernel).short}" for one in settings)
    boot_args = settings[0].boot_args if settings else ""
    args = f".args-{hashlib.sha256(boot_args.encode()).hexdigest()[:8]}" if boot_args else ""
    return f"syscall-irl.{kernels}{args}"

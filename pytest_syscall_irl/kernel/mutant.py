"""Kernel mutants: the reference kernel with one small patch, to prove a test can fail.

A mutant patch is a header and a unified diff against the kernel source root:

    Mutant: every 64-bit syscall leaves by IRET
    Table: 64-sysret-used
    Tests: test_sysret_eligibility.py::test_an_eligible_syscall_leaves_by_sysretq
    ---
    --- a/arch/x86/entry/entry_64.S
    +++ b/arch/x86/entry/entry_64.S
    ...

    MutantBuild(MutantPatch.load("x.patch")).build()   # <cache>/mutants/<key>/bzImage (+ vmlinux)

A mutant is built in the reference build's own tree (its obj/ and Debian's source under the
cache), under the reference's lock: patched, `make bzImage` with the reference's arguments
(only the patched file recompiles and vmlinux relinks: ~20 s, where a copy of the tree
rebuilds everything), copied out, and the source restored (see patching.py). The mutant is
cached by the reference's key and the SHA-256 of its diff, as the reference is: bzImage and
vmlinux side by side, recorded, checked on each use, rebuilt when damaged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..core import procs
from ..core.cache import CacheEntry
from ..core.errors import ConfigError, KernelError, tail
from .artifacts import Kernel
from .build import ARTIFACTS, RECORD, KernelBuild, Progress
from .patching import patched, pristine

log = logging.getLogger(__name__)

HEADER = ("Mutant", "Table", "Tests")
SEPARATOR = "---"
TABLE_ID = re.compile(r"[a-z0-9][a-z0-9.-]*")
# A suite test id relative to test_suites/x86_64: file::function, with a parameter id if any.
TEST_ID = re.compile(r"test_\w+\.py::test_\w+(\[[^\]\s]+\])?")
MAKE_TIMEOUT = 1800.0  # a patch to a header the whole kernel includes rebuilds it all: minutes
EXAMPLE = ("Mutant: <what is broken>\nTable: <id in docs/entry-audit.md>\n"
           "Tests: <file.py::test_name ...>\n---\n<unified diff, a/ b/ paths>")


@dataclass(frozen=True)
class MutantPatch:
    """A parsed mutant patch: what it breaks, its audit table line, its tests, its diff."""

    path: Path
    mutant: str
    table: str
    tests: tuple[str, ...]
    diff: str

    @property
    def name(self) -> str:
        """The patch's stem: its test id and how people name it."""
        return self.path.stem

    @property
    def sha256(self) -> str:
        """SHA-256 of the diff (the header names tests; only the diff makes the kernel)."""
        return hashlib.sha256(self.diff.encode()).hexdigest()

    @classmethod
    def load(cls, path: Path) -> MutantPatch:
        """Read and parse *path*; ConfigError naming the file and the problem."""
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the mutant patch {path}: {exc}") from exc
        return parse_patch(path, text)


def parse_patch(path: Path, text: str) -> MutantPatch:
    """The MutantPatch of *text* (the contents of *path*); ConfigError with the fix when its
    header is missing, incomplete or names bad ids."""
    lines = text.splitlines(keepends=True)
    try:
        end = next(i for i, line in enumerate(lines) if line.rstrip("\n") == SEPARATOR)
    except StopIteration:
        raise ConfigError(f"{path}: no `{SEPARATOR}` line ends a header; a mutant patch reads:\n{EXAMPLE}") from None
    fields = _header_fields(path, lines[:end])
    diff = "".join(lines[end + 1:])
    if not re.search(r"^--- ", diff, re.MULTILINE) or not re.search(r"^\+\+\+ ", diff, re.MULTILINE):
        raise ConfigError(f"{path}: no unified diff (--- a/FILE, +++ b/FILE) after the `{SEPARATOR}` line")
    if not TABLE_ID.fullmatch(fields["Table"]):
        raise ConfigError(f"{path}: Table: {fields['Table']!r} is not an id of docs/entry-audit.md "
                          "(lower-case letters, digits, dashes, e.g. 64-sysret-used)")
    tests = tuple(fields["Tests"].split())
    bad = [test for test in tests if not TEST_ID.fullmatch(test)]
    if bad or not tests:
        raise ConfigError(f"{path}: Tests: {' '.join(bad) or '(none)'}: name suite tests relative to "
                          "test_suites/x86_64, space separated, e.g. "
                          "test_sysret_eligibility.py::test_rf_set_leaves_by_iret")
    return MutantPatch(path, fields["Mutant"], fields["Table"], tests, diff)


def _header_fields(path: Path, lines: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines:
        key, colon, value = line.partition(":")
        if not line.strip():
            continue
        if not colon or key not in HEADER or key in fields:
            raise ConfigError(f"{path}: header line {line.strip()!r}: expected each of "
                              f"{', '.join(f'{k}:' for k in HEADER)} once, then `{SEPARATOR}`")
        fields[key] = value.strip()
    missing = [key for key in HEADER if not fields.get(key)]
    if missing:
        raise ConfigError(f"{path}: the header lacks {', '.join(f'{k}:' for k in missing)}; a mutant patch "
                          f"reads:\n{EXAMPLE}")
    return fields


class MutantBuild:
    """One mutant of a KernelBuild (default: the reference) in the cache.

        mutant = MutantBuild(MutantPatch.load(path), on_stage=print)
        mutant.build()        # the bzImage; reused when cached
        mutant.from_cache, mutant.seconds
    """

    def __init__(self, patch: MutantPatch, reference: KernelBuild | None = None, *,
                 on_stage: Progress | None = None) -> None:
        self.patch = patch
        self.reference = reference if reference is not None else KernelBuild(on_stage=on_stage)
        if self.reference.tree is not None:
            raise ConfigError(f"mutants are built from Debian's source in the cache, not from a tree "
                              f"({self.reference.tree})")
        self._on_stage = on_stage
        self.from_cache = True  # False once build() has built it
        self.seconds = 0.0  # how long build() took to patch, make and restore (0 when cached)

    @property
    def key(self) -> str:
        """The reference's key and 16 hex digits of the diff's SHA-256."""
        return f"{self.reference.key}-{self.patch.sha256[:16]}"

    @property
    def directory(self) -> Path:
        """<cache>/mutants/<key>: bzImage and vmlinux side by side, and the record."""
        return self.reference.cache / "mutants" / self.key

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def log_path(self) -> Path:
        """The log of the last build of this mutant, beside the entry: a failed build keeps it."""
        return self.directory.with_name(f"{self.key}.build.log")

    @property
    def entry(self) -> CacheEntry:
        """The mutant in the cache, recorded like the reference (the bzImage's SHA-256 checked
        on each use, the vmlinux's by size and mtime)."""
        return CacheEntry(self.directory, f"kernel mutant {self.patch.name}", record=RECORD, field="artifacts",
                          digest=lambda name: name == "bzImage", error=KernelError)

    def build(self) -> Path:
        """The mutant's bzImage, built unless the cache holds it intact (the reference first)."""
        if self.entry.problem() is not None:
            self.reference.build()  # reused at once when cached
            self.from_cache = not self.entry.ensure(self._build_into, say=self._stage)
        if self.from_cache:
            self._stage(f"reusing {self.directory}")
        return self.bzimage

    def _build_into(self, staging: Path) -> dict[str, object]:
        reference = self.reference
        obj, source = reference.directory / "obj", reference.debian_tree
        with reference.entry.lock(self._stage), pristine(source, self._stage):
            started = time.monotonic()  # not the wait for the other worker's mutant
            if not (obj / ".config").is_file():
                raise KernelError(f"the reference build {reference.directory} has no build tree (obj/.config): "
                                  f"delete {reference.directory} and run `syscall-irl kernel build`")
            staging.chmod(0o755)  # as the reference's directory, not mkdtemp's 0700
            with patched(source, self.patch.diff, str(self.patch.path)) as files:
                self._stage(f"building mutant {self.patch.name} ({', '.join(files)}; log: {self.log_path})")
                self._make(reference._make(source, f"-j{reference.jobs}", "bzImage"))
                for name, built in zip(ARTIFACTS, (obj / "arch" / "x86" / "boot" / "bzImage", obj / "vmlinux")):
                    _copy(built, staging / name)
        check_artifacts(staging / "bzImage")
        self.seconds = time.monotonic() - started
        self._stage(f"built mutant {self.patch.name} in {self.seconds:.0f} s")
        return {"patch": self.patch.name, "mutant": self.patch.mutant, "diff_sha256": self.patch.sha256,
                "reference": reference.key, "files": files, "seconds": round(self.seconds, 1)}

    def _make(self, command: list[str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("KCONFIG_CONFIG", "KCONFIG_ALLCONFIG")}
        with self.log_path.open("w") as build_log:
            build_log.write(f"$ {' '.join(command)}\n")
            build_log.flush()
            proc = procs.spawn(command, env=env, stdin=subprocess.DEVNULL, stdout=build_log,
                               stderr=subprocess.STDOUT)
            try:
                code = proc.wait(timeout=MAKE_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                procs.stop(proc)  # make and its compilers: their own process group
        if code != 0:
            what = f"did not finish in {MAKE_TIMEOUT:.0f} s" if code is None else "failed to build"
            raise KernelError(f"mutant {self.patch.name} ({self.patch.path}) {what} (log: {self.log_path})",
                              command=command, exit_code=code, log_tail=tail(self.log_path.read_text()))

    def _stage(self, message: str) -> None:
        log.info("%s", message)
        if self._on_stage is not None:
            self._on_stage(message)


def check_artifacts(bzimage: Path) -> None:
    """KernelError unless *bzimage* and the vmlinux beside it load as one build."""
    try:
        Kernel.load(bzimage)
    except ConfigError as exc:
        raise KernelError(f"the mutant build produced unusable artifacts: {exc.message}") from exc


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    shutil.copymode(source, target)

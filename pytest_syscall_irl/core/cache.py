"""The cache: where it lives, and the one protocol every cached thing is made by.

    entry = CacheEntry(cache_dir() / "images" / key, "guest image", error=ImageError)
    entry.ensure(lambda staging: build_into(staging))   # built once, then reused
    entry.path / "initramfs.cpio.gz"

An entry is a directory (or a single small file) named by its key. `ensure` builds it once
under the entry's file lock, so that concurrent processes (xdist workers, several runs) make
it once; the build fills a staging directory beside the entry, which gets a record of its
files (see `integrity`) and appears by one rename, whole or not at all: a build that fails or
is killed publishes nothing. A later use checks the entry against its record; a damaged one
(a file cut short, changed, missing or added) is never trusted: it is built again, once, with
a `SyscallIrlWarning` naming what was damaged, and damage right after that is an error.

Two kinds of entry cannot be renamed into place: a kernel build, whose object tree beside the
artifacts is reused by the next build, and GDB's index, which GDB writes into a directory of
its own. Those are built in place (`members` names the entry's files in its directory), and
their record, written last by atomic rename, is what publishes them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import ConfigError, SyscallIrlError, SyscallIrlWarning
from .integrity import FILES, MANIFEST, read_record, record_problem, tree_files, write_record

log = logging.getLogger(__name__)

NOT_BUILT = "not built"  # `CacheEntry.problem` of an entry nobody has made yet
# How long a process waits for another one making the same entry, whatever it is: the
# longest is a kernel build or a 300 MB download, minutes on a slow machine. A holder past
# this has hung, and its own deadlines (builds, boots, commands) have failed to end it.
LOCK_TIMEOUT = 3600.0

Say = Callable[[str], None]
Make = Callable[[Path], Mapping[str, object] | None]


# Less free space than this in the cache directory fails a run before anything is made:
# one guest snapshot is ~25 MB, a guest image and GDB's index a few MB more each, and a
# run that runs out half-way fails every test in turn with errors that do not say why.
MIN_FREE = 64 << 20
# After a failed build, less than this left free means the disk was full, whatever error the
# build reported (QEMU writing a snapshot through `cat` reports a broken pipe).
FULL = 1 << 20


class CacheFullError(ConfigError):
    """The cache's disk is full: no build can fix that, only space can (a usage error)."""


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):.0f} MB"


def full_disk_error(directory: Path, doing: str, needed: int | None = None, state: str = "is full") -> CacheFullError:
    """The error for a full disk under *directory* while *doing* something, with the figures
    of `shutil.disk_usage` and, if known, what was *needed*."""
    try:
        usage = shutil.disk_usage(directory)
        figures = f"{_megabytes(usage.free)} free of {_megabytes(usage.total)}"
    except OSError:
        figures = "its free space unknown"
    need = f"; {doing} needs more than {_megabytes(needed)}" if needed else ""
    return CacheFullError(f"the cache directory {directory} {state} ({figures}{need}): free some space there, "
                          "or point $SYSCALL_IRL_CACHE at a disk with room")


def cache_dir() -> Path:
    """$SYSCALL_IRL_CACHE, else $XDG_CACHE_HOME/pytest-syscall-irl, else ~/.cache/pytest-syscall-irl."""
    if os.environ.get("SYSCALL_IRL_CACHE"):
        return Path(os.environ["SYSCALL_IRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-syscall-irl"


def check_cache_dir(directory: Path) -> Path:
    """*directory*, created if need be; ConfigError with the fix if it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise full_disk_error(directory, "making anything", MIN_FREE) from exc
        raise ConfigError(f"cannot write to the cache directory {directory} ({exc.strerror or exc}): make it "
                          "writable, or point $SYSCALL_IRL_CACHE at a directory you may write") from exc
    if shutil.disk_usage(directory).free < MIN_FREE:
        raise full_disk_error(directory, "a run (guest images and snapshots)", MIN_FREE, "has too little room")
    return directory


def lock_path(entry: Path) -> Path:
    """The file lock of the entry *entry*: beside it, never inside (a rebuild replaces the inside)."""
    return entry.with_name(entry.name + ".lock")


@contextmanager
def waiting_lock(path: Path, what: str, say: Say | None = None, timeout: float = LOCK_TIMEOUT,
                 error: type[SyscallIrlError] = SyscallIrlError) -> Iterator[None]:
    """Hold the file lock *path*; if another process holds it (making *what*), say so and
    wait for it up to *timeout* seconds (*error* after that)."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        # A wait of minutes (another process building a kernel) must not look like a hang.
        message = f"waiting for another process making {what} (lock {path})"
        log.info("%s", message)
        if say is not None:
            say(message)
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise error(f"gave up after {timeout:.0f} s waiting for another process making {what} "
                        f"(lock {path}): if no such process runs, delete the lock file") from exc
    try:
        yield
    finally:
        lock.release()


def _every_file(name: str) -> bool:
    return True


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: made once under its lock, recorded, checked on every use.

    *record* names the record file in the entry (None: the entry has none, and a whole one
    is all its rename promises); *field* is the record's field of file records; *digest*
    says which files (by path relative to the entry) are checked by SHA-256, the others by
    size and mtime. *members* makes the entry one built in place: it lists the entry's files
    among those of its directory. *check* is a further check of an entry that matches its
    record (its files parse); *is_file* makes the entry one file with no record (*check*
    reads it). *error* is the error class of the owner's layer.
    """

    path: Path
    what: str
    record: str | None = MANIFEST
    field: str = FILES
    digest: Callable[[str], bool] = _every_file
    members: Callable[[Path], Iterable[Path]] | None = None
    check: Callable[[Path], str | None] | None = None
    is_file: bool = False
    error: type[SyscallIrlError] = SyscallIrlError
    timeout: float = LOCK_TIMEOUT

    def __post_init__(self) -> None:
        if self.is_file and self.record is not None:
            raise ValueError("a file entry has no record: its check reads it (see CacheEntry.file)")
        if self.members is not None and self.record is None:
            raise ValueError("an entry built in place is published by its record: name one")

    @classmethod
    def file(cls, path: Path, what: str, check: Callable[[Path], str | None],
             error: type[SyscallIrlError] = SyscallIrlError) -> CacheEntry:
        """An entry that is one small file, damaged when *check* says so (it does not parse)."""
        return cls(path, what, record=None, check=check, is_file=True, error=error)

    @property
    def in_place(self) -> bool:
        return self.members is not None

    # -- reading -----------------------------------------------------------------------------

    def problem(self) -> str | None:
        """None if the entry is whole and as made; NOT_BUILT if there is none; else what is damaged."""
        if self.in_place:
            if not (self.path / str(self.record)).exists():
                return NOT_BUILT
        elif not self.path.exists():
            return NOT_BUILT
        if self.record is not None:
            problem = record_problem(self.path / self.record, self.path, self._files(self.path), self.field)
            if problem is not None:
                return problem
        return self.check(self.path) if self.check is not None else None

    def meta(self) -> dict[str, object]:
        """What the build kept in the record beside the files (see `ensure`); {} if nothing."""
        read = read_record(self.path / self.record, self.field) if self.record is not None else None
        return read[0] if read is not None else {}

    # -- making ------------------------------------------------------------------------------

    @contextmanager
    def lock(self, say: Say | None = None) -> Iterator[None]:
        """Hold this entry's file lock (see `waiting_lock`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with waiting_lock(lock_path(self.path), f"{self.what} {self.path.name}", say, self.timeout, self.error):
            yield

    def ensure(self, make: Make, *, say: Say | None = None, again: bool = False) -> bool:
        """Make the entry unless it is whole and as made; True if this call made it.

        `make(staging)` fills *staging* (a new directory, or for a file entry the path to
        write) and returns what the record keeps beside the files, or None. *again* makes it
        even when it is intact (a kernel tree whose sources may have changed).
        """
        if not again and self.problem() is None:
            return False  # the common case takes no lock
        with self.lock(say):
            problem = self.problem()
            if problem is None and not again:
                return False  # made meanwhile by another process
            if problem not in (None, NOT_BUILT) and not again:
                warnings.warn(SyscallIrlWarning(f"cached {self.what} {self.path} is damaged ({problem}): "
                                                "building it again"), stacklevel=2)
            self.discard()
            self._sweep()
            self._make(make)
            problem = self.problem()
            if problem is not None:
                self.discard()
                raise self.error(f"cached {self.what} {self.path} is damaged right after it was built ({problem})")
        return True

    def discard(self) -> None:
        """Remove the entry, so that the next `ensure` makes it; the caller holds its lock.

        A directory is renamed aside first, so that no reader sees it half-deleted.
        """
        if self.in_place:
            (self.path / str(self.record)).unlink(missing_ok=True)  # unpublished first
            for path in self._files(self.path):
                path.unlink(missing_ok=True)
        elif self.is_file:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.discarded.", dir=self.path.parent))
            os.rename(self.path, trash / self.path.name)
            shutil.rmtree(trash, ignore_errors=True)

    def seal(self, meta: Mapping[str, object] | None = None) -> None:
        """Record the entry's files as they are now (tests: a change made on purpose, matched)."""
        if self.record is not None:
            write_record(self.path / self.record, self.path, self._files(self.path), self.digest, meta, self.field)

    def _sweep(self) -> None:
        """Remove what a build killed mid-way (SIGKILL, a crash) left beside the entry: its
        staging and discarded copies, which only the holder of the lock makes."""
        if self.in_place:
            return  # nothing is staged beside it
        for path in self.path.parent.iterdir():
            if path.name.startswith(f".{self.path.name}."):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _full(self, exc: BaseException, written: int | None) -> CacheFullError | None:
        """The full-disk error if *exc* (or its cause) is ENOSPC, or if the disk is full now;
        *written*: what the build had written when it failed (the space it needed, at least).

        One clear error in place of what the builder saw of a full disk ("Broken pipe" from
        QEMU saving a snapshot, a raw OSError from a library), which would come at each use."""
        if isinstance(exc, CacheFullError) or not isinstance(exc, Exception):
            return None
        chain: list[BaseException] = [exc]
        while chain[-1].__cause__ is not None and len(chain) < 8:
            chain.append(chain[-1].__cause__)
        no_space = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
        try:
            no_space = no_space or shutil.disk_usage(self.path.parent).free < FULL
        except OSError:
            pass
        doing = f"making {self.what} {self.path.name}"
        return full_disk_error(self.path.parent, doing, written) if no_space else None

    def _files(self, directory: Path) -> list[Path]:
        if not directory.is_dir():
            return []
        if self.members is not None:
            return [p for p in self.members(directory) if p.is_file() and p.name != self.record]
        return tree_files(directory, [self.record] if self.record is not None else [])

    def _make(self, make: Make) -> None:
        if self.in_place:
            self.path.mkdir(parents=True, exist_ok=True)
            # Nothing is published until the record is written: a build cut short leaves "not built".
            try:
                self.seal(make(self.path))
            except BaseException as exc:
                full = self._full(exc, None)
                if full is not None:
                    raise full from exc
                raise
            return
        if self.is_file:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            os.close(fd)
            staging = Path(name)
        else:
            staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.staging.", dir=self.path.parent))
        try:
            meta = make(staging)
            if self.record is not None:
                write_record(staging / self.record, staging, self._files(staging), self.digest, meta, self.field)
            os.rename(staging, self.path)  # whole or not at all
        except BaseException as exc:
            full = self._full(exc, _size(staging))  # measured before the staging goes
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink(missing_ok=True)
            if full is not None:
                raise full from exc
            raise


def _size(path: Path) -> int:
    """Bytes under *path* (a file or a directory), 0 if it is gone."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in tree_files(path) if p.is_file()) if path.is_dir() else 0

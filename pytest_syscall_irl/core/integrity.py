"""Files the cache holds, written whole and checked before they are trusted.

Every cached artifact appears by atomic rename, so a crash never leaves it half-written;
what can still happen is damage afterwards (a full disk, a copy cut short, a hand edit).
A manifest records the size and SHA-256 of each file of a cached directory when it is
made; `manifest_problem` says what no longer matches, and the owner rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import KernelError

MANIFEST = "MANIFEST.json"


def file_digest(path: Path) -> bytes:
    """SHA-256 of the contents of *path*."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def atomic_write(target: Path, text: str) -> None:
    """Write *text* to *target* so that readers see the old file or the whole new one."""
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def quick_record(path: Path, digest: bool = False) -> list[object]:
    """[size, mtime_ns] of *path*, and with *digest* its SHA-256: what a cache checks on every
    use without reading big files (a 590 MB vmlinux), the digest kept for small ones."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns] + ([file_digest(path).hex()] if digest else [])


def quick_record_problem(path: Path, recorded: list[object]) -> str | None:
    """How *path* differs from *recorded* (a quick_record): None, "stat" (size or mtime) or
    "content" (same size and mtime, another SHA-256)."""
    try:
        st = path.stat()
    except OSError:
        return "stat"
    if not isinstance(recorded, list) or [st.st_size, st.st_mtime_ns] != recorded[:2]:
        return "stat"
    if len(recorded) > 2 and file_digest(path).hex() != recorded[2]:
        return "content"
    return None


def _describe(path: Path) -> list[object]:
    return [path.stat().st_size, file_digest(path).hex()]


def write_manifest(manifest: Path, files: list[Path]) -> None:
    """Record in *manifest* the size and digest of each of *files* (names relative to its directory)."""
    atomic_write(manifest, json.dumps({p.name: _describe(p) for p in files}, indent=1) + "\n")


def manifest_problem(manifest: Path) -> str | None:
    """What differs from *manifest* among the files it names (None: every file is as made)."""
    try:
        recorded = json.loads(manifest.read_text())
        assert isinstance(recorded, dict)
    except (OSError, ValueError, AssertionError):
        return f"{manifest.name} is missing or unreadable"
    for name, (size, digest) in recorded.items():
        path = manifest.parent / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was made"
        if file_digest(path).hex() != digest:
            return f"{name} has changed since it was made (SHA-256 differs)"
    return None


def seal_directory(directory: Path) -> None:
    """Write the manifest of every file directly in *directory*."""
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST]
    write_manifest(directory / MANIFEST, files)


def directory_problem(directory: Path) -> str | None:
    """What in *directory* differs from its manifest (see `seal_directory`)."""
    return manifest_problem(directory / MANIFEST)


@contextmanager
def waiting_lock(path: Path, what: str, say: Callable[[str], None], timeout: float) -> Iterator[None]:
    """Hold the file lock *path*; if another process holds it (doing *what*), say so and wait
    up to *timeout* seconds for it (KernelError after that)."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another process {what} (lock {path})")
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise KernelError(f"gave up after {timeout:.0f} s waiting for {path}") from exc
    try:
        yield
    finally:
        lock.release()

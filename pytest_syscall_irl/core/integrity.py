"""Files the cache holds, written whole and checked before they are trusted: the low-level
half of `cache` (which adds the lock and the build-once protocol).

Every cached file appears by atomic rename, so a crash never leaves it half-written; what
can still happen is damage afterwards (a full disk, a copy cut short, a hand edit). A
record, written when an entry is made, keeps of each of its files the size and mtime, and
the SHA-256 of those small enough to read on every use; `record_problem` says what no
longer matches.

A record is a JSON object: what its owner keeps about the entry (a kernel's release, a
build's compiler) and, under one field, ``{relative path: [size, mtime_ns(, sha256)]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

MANIFEST = "MANIFEST.json"
FILES = "files"  # the record's field holding the file records


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


def file_record(path: Path, digest: bool = False) -> list[object]:
    """[size, mtime_ns] of *path*, and with *digest* its SHA-256: what a cache checks on every
    use without reading big files (a 590 MB vmlinux), the digest kept for small ones."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns] + ([file_digest(path).hex()] if digest else [])


def file_problem(name: str, path: Path, recorded: object) -> str | None:
    """How *path* (called *name*) differs from *recorded* (a `file_record`), None if it does not.

    The size always counts; then the digest where one was kept (a copy with a new mtime is
    the same file), else the mtime (the cheap stand-in for reading a big file).
    """
    if not isinstance(recorded, list) or len(recorded) not in (2, 3):
        return f"the record of {name} is unreadable"
    try:
        st = path.stat()
    except OSError:
        return f"{name} is missing"
    if st.st_size != recorded[0]:
        return f"{name} has {st.st_size} bytes, {recorded[0]} when it was made"
    if len(recorded) == 3:
        if file_digest(path).hex() != recorded[2]:
            return f"{name} has changed since it was made (SHA-256 differs)"
    elif st.st_mtime_ns != recorded[1]:
        return f"{name} was modified since it was made (its mtime differs)"
    return None


def tree_files(directory: Path, leave_out: Iterable[str] = ()) -> list[Path]:
    """Every file under *directory* (symlinks to files too), but the names in *leave_out*."""
    skip = set(leave_out)
    found = []
    for root, _dirs, names in os.walk(directory):
        found += [Path(root, name) for name in sorted(names) if name not in skip]
    return sorted(found)


def write_record(record: Path, directory: Path, files: Iterable[Path], digest: Callable[[str], bool],
                 meta: Mapping[str, object] | None = None, field: str = FILES) -> None:
    """Record *files* (under *directory*) in *record*, beside *meta*; *digest* says by name
    (relative to *directory*) which files' SHA-256 is kept."""
    names = {str(p.relative_to(directory)): p for p in files}
    entries = {name: file_record(path, digest(name)) for name, path in sorted(names.items())}
    atomic_write(record, json.dumps({**(meta or {}), field: entries}, indent=1) + "\n")


def read_record(record: Path, field: str = FILES) -> tuple[dict[str, object], dict[str, object]] | None:
    """(meta, file records) of *record*, None if it is missing or does not parse."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get(field), dict):
        return None
    files = data.pop(field)
    return data, files


def record_problem(record: Path, directory: Path, present: Iterable[Path], field: str = FILES) -> str | None:
    """What of *directory* differs from *record*: a recorded file missing or changed, or a file
    among *present* that was not recorded. None: every file is as made."""
    read = read_record(record, field)
    if read is None:
        return f"{record.name} is missing or unreadable"
    files = read[1]
    for name, recorded in sorted(files.items()):
        problem = file_problem(name, directory / name, recorded)
        if problem is not None:
            return problem
    for name in sorted({str(p.relative_to(directory)) for p in present} - set(files)):
        return f"{name} was not there when it was made"
    return None


def seal_directory(directory: Path) -> None:
    """Record every file under *directory* in its MANIFEST.json, with digests: the record of
    a cache entry of the default kind, as `cache.CacheEntry` writes it (tests use this to
    make a record match a file they changed on purpose)."""
    write_record(directory / MANIFEST, directory, tree_files(directory, [MANIFEST]), lambda name: True)

"""Files the cache holds, written whole and checked before they are trusted: the low-level
half of `cache` (which adds the lock and the build-once protocol).

Every cached file appears by atomic rename, so a crash never leaves it half-written; what
can still happen is damage afterwards (a full disk, a copy cut short, a hand edit). A
record, written when an entry is made, keeps of each of its files the size, the mtime and
the SHA-256; `record_problem` says what no longer matches. Small files are read and their
digest checked on every use; a big one (a 590 MB vmlinux) is checked by size and mtime,
and read only when its mtime differs: a cache restored by tar, zip or `cp -r` (as CI
caches are) keeps no nanoseconds, so its mtimes all differ. A file whose digest still
matches is the same file: its record is refreshed with the new mtime, once.

A record is a JSON object: what its owner keeps about the entry (a kernel's release, a
build's compiler) and, under one field, ``{relative path: [size, mtime_ns, sha256]}`` for a
file checked by digest on every use, ``[size, mtime_ns, sha256, "by-mtime"]`` for one read
only when its mtime differs. (``[size, mtime_ns]``, from records made before digests were
kept for every file, is checked by mtime alone.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FILES = "files"  # the record's field holding the file records
BY_MTIME = "by-mtime"  # a file record's mark: its digest is read only when its mtime differs


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
    """[size, mtime_ns, sha256] of *path*, its digest checked on every use if *digest*
    (small files), else marked BY_MTIME: read only when the mtime differs (big files)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, file_digest(path).hex()] + ([] if digest else [BY_MTIME])


def file_problem(name: str, path: Path, recorded: object) -> str | None:
    """How *path* (called *name*) differs from *recorded* (a `file_record`), None if it does not.

    The size always counts; then the digest where it is checked on every use (a copy with
    a new mtime is the same file), else the mtime, and where it differs the digest if one
    was kept. `record_problem` refreshes the record of a file found the same that way.
    """
    if not isinstance(recorded, list) or len(recorded) not in (2, 3, 4):
        return f"the record of {name} is unreadable"
    try:
        st = path.stat()
    except OSError:
        return f"{name} is missing"
    if st.st_size != recorded[0]:
        return f"{name} has {st.st_size} bytes, {recorded[0]} when it was made"
    if len(recorded) == 2:
        return None if st.st_mtime_ns == recorded[1] else f"{name} was modified since it was made (its mtime differs)"
    if len(recorded) == 4 and st.st_mtime_ns == recorded[1]:
        return None  # the fast path: a big file is not read while its mtime holds
    if file_digest(path).hex() != recorded[2]:
        return f"{name} has changed since it was made (SHA-256 differs)"
    return None


def _moved_mtimes(directory: Path, files: dict[str, object]) -> dict[str, object]:
    """The records among *files* whose file is as made but whose mtime moved (checked by
    `file_problem` already), with the mtime they have now."""
    moved: dict[str, object] = {}
    for name, recorded in files.items():
        if isinstance(recorded, list) and len(recorded) == 4:
            mtime = (directory / name).stat().st_mtime_ns
            if mtime != recorded[1]:
                moved[name] = [recorded[0], mtime, *recorded[2:]]
    return moved


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
    meta, files = read
    for name, recorded in sorted(files.items()):
        problem = file_problem(name, directory / name, recorded)
        if problem is not None:
            return problem
    for name in sorted({str(p.relative_to(directory)) for p in present} - set(files)):
        return f"{name} was not there when it was made"
    moved = _moved_mtimes(directory, files)
    if moved:
        _refresh(record, meta, {**files, **moved}, field, sorted(moved))
    return None


def _refresh(record: Path, meta: dict[str, object], files: dict[str, object], field: str, names: list[str]) -> None:
    # Two processes may refresh at once: both write the same record, each whole. A record
    # that cannot be written (a read-only cache) costs a digest per use, not a failure.
    log.info("%s: %s as made, with new mtimes (restored from a copy?): record refreshed",
             record.parent, ", ".join(names))
    try:
        atomic_write(record, json.dumps({**meta, field: files}, indent=1) + "\n")
    except OSError as exc:
        log.warning("cannot refresh %s (%s): its files are read again on every use", record, exc)


def seal_directory(directory: Path) -> None:
    """Record every file under *directory* in its MANIFEST.json, with digests: the record of
    a cache entry of the default kind, as `cache.CacheEntry` writes it (tests use this to
    make a record match a file they changed on purpose)."""
    write_record(directory / MANIFEST, directory, tree_files(directory, [MANIFEST]), lambda name: True)

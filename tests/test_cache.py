"""The cache primitive (core.cache): one entry made once under its lock, recorded, checked on
every use, built again once (with a warning) when damaged, and published whole or not at all."""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

import pytest_syscall_irl
from pytest_syscall_irl.core import integrity, procs
from pytest_syscall_irl.core.cache import (LOCK_TIMEOUT, NOT_BUILT, CacheEntry, CacheFullError, check_cache_dir,
                                           lock_path)
from pytest_syscall_irl.core.errors import ConfigError, ImageError, SyscallIrlError, SyscallIrlWarning
from pytest_syscall_irl.core.integrity import BY_MTIME


def _maker(calls: list[Path], content: bytes = b"made", delay: float = 0.0) -> Callable[[Path], None]:
    def make(staging: Path) -> None:
        calls.append(staging)
        time.sleep(delay)
        (staging / "sub").mkdir()
        (staging / "sub" / "file").write_bytes(content)

    return make


def _entry(tmp_path: Path, **options: object) -> CacheEntry:
    return CacheEntry(tmp_path / "cache" / "thing" / "key", "test entry", **options)  # type: ignore[arg-type]


def test_an_entry_is_made_once_and_then_reused(tmp_path: Path) -> None:
    entry, calls = _entry(tmp_path), list[Path]()
    assert entry.problem() == NOT_BUILT
    assert entry.ensure(_maker(calls)) is True
    assert entry.ensure(_maker(calls)) is False
    assert len(calls) == 1 and calls[0] != entry.path  # made in a staging directory, renamed
    assert (entry.path / "sub" / "file").read_bytes() == b"made" and entry.problem() is None
    assert sorted(p.name for p in entry.path.parent.iterdir()) == ["key", "key.lock"]


def test_what_the_build_returns_is_kept_in_the_record(tmp_path: Path) -> None:
    entry = _entry(tmp_path)

    def make(staging: Path) -> Mapping[str, object]:
        (staging / "f").write_text("x")
        return {"release": "6.1.0"}

    entry.ensure(make)
    assert entry.meta() == {"release": "6.1.0"}


@pytest.mark.parametrize("harm, problem", [
    (lambda d: (d / "sub" / "file").write_bytes(b"ma"), "sub/file has 2 bytes, 4 when it was made"),
    (lambda d: (d / "sub" / "file").write_bytes(b"MADE"), "sub/file has changed since it was made (SHA-256 differs)"),
    (lambda d: (d / "sub" / "file").unlink(), "sub/file is missing"),
    (lambda d: (d / "sub" / "extra").write_text(""), "sub/extra was not there when it was made"),
    (lambda d: (d / "MANIFEST.json").unlink(), "MANIFEST.json is missing or unreadable"),
])
def test_a_damaged_entry_is_built_again_once_with_a_warning_naming_the_damage(
        tmp_path: Path, harm: Callable[[Path], None], problem: str) -> None:
    entry, calls = _entry(tmp_path), list[Path]()
    entry.ensure(_maker(calls))
    harm(entry.path)
    assert entry.problem() == problem
    with pytest.warns(SyscallIrlWarning) as warned:
        assert entry.ensure(_maker(calls)) is True
    assert [str(w.message) for w in warned] == [
        f"cached test entry {entry.path} is damaged ({problem}): building it again"]
    assert len(calls) == 2 and entry.problem() is None and entry.ensure(_maker(calls)) is False


def test_damage_right_after_the_rebuild_is_an_error_and_nothing_is_kept(tmp_path: Path) -> None:
    entry = _entry(tmp_path, check=lambda d: None if (d / "sub" / "file").read_bytes() == b"good" else "it is bad",
                   error=ImageError)
    with pytest.raises(ImageError, match=r"test entry .* is damaged right after it was built \(it is bad\)"):
        entry.ensure(_maker([], b"bad!"))
    assert entry.problem() == NOT_BUILT
    entry.ensure(_maker([], b"good"))
    assert entry.problem() is None


def test_a_build_that_fails_publishes_nothing(tmp_path: Path) -> None:
    entry = _entry(tmp_path)

    def broken(staging: Path) -> None:
        (staging / "half").write_text("half")
        raise ImageError("compiler failed")

    with pytest.raises(ImageError, match="compiler failed"):
        entry.ensure(broken)
    assert entry.problem() == NOT_BUILT
    assert [p.name for p in entry.path.parent.iterdir()] == ["key.lock"]


KILLED_BUILD = """
import sys, time
from pathlib import Path
from pytest_syscall_irl.core.cache import CacheEntry
def make(staging):
    (staging / "half").write_text("half")
    print("building", flush=True)
    time.sleep(60)
CacheEntry(Path(sys.argv[1]), "test entry").ensure(make)
"""


def test_a_build_killed_midway_publishes_nothing_and_its_leftovers_are_swept(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    child = procs.spawn([sys.executable, "-c", KILLED_BUILD, str(entry.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "building\n"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        procs.stop(child)
    assert entry.problem() == NOT_BUILT
    assert any(p.name.startswith(".key.staging.") for p in entry.path.parent.iterdir())
    entry.ensure(_maker([]))
    assert sorted(p.name for p in entry.path.parent.iterdir()) == ["key", "key.lock"]


HOLDER = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(entry: CacheEntry, seconds: float) -> subprocess.Popen[str]:
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    holder = procs.spawn([sys.executable, "-c", HOLDER, str(lock_path(entry.path)), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
    return holder


def test_a_lock_another_process_holds_is_waited_for_and_said(tmp_path: Path) -> None:
    entry, said, calls = _entry(tmp_path), list[str](), list[Path]()
    holder = _hold_lock(entry, 0.5)
    try:
        assert entry.ensure(_maker(calls), say=said.append) is True
    finally:
        procs.stop(holder)
    assert said == [f"waiting for another process making test entry key (lock {entry.path}.lock)"]
    assert len(calls) == 1


def test_a_lock_held_past_the_timeout_is_an_error_of_the_owners_layer(tmp_path: Path) -> None:
    entry = _entry(tmp_path, timeout=0.3, error=ImageError)
    holder = _hold_lock(entry, 30)
    try:
        with pytest.raises(ImageError, match=r"gave up after 0 s waiting for another process making test entry"):
            entry.ensure(_maker([]))
    finally:
        procs.stop(holder)
    assert entry.problem() == NOT_BUILT


def test_threads_asking_at_once_build_once(tmp_path: Path) -> None:
    entry, calls = _entry(tmp_path), list[Path]()
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(entry.ensure(_maker(calls, delay=0.2))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and sorted(results) == [False, False, False, True]


def test_again_builds_an_intact_entry_without_a_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    entry, calls = _entry(tmp_path), list[Path]()
    entry.ensure(_maker(calls))
    assert entry.ensure(_maker(calls), again=True) is True
    assert len(calls) == 2 and not recwarn.list


# --- an entry built in place (a kernel build's obj/ stays for the next build) -------------------


def _in_place(tmp_path: Path) -> CacheEntry:
    return _entry(tmp_path, record="complete", field="artifacts", digest=lambda name: name == "small",
                  members=lambda d: [d / "small", d / "big"])


def _build_in_place(directory: Path) -> Mapping[str, object]:
    (directory / "obj").mkdir(exist_ok=True)
    (directory / "obj" / "work").write_text("reused by the next build")
    (directory / "small").write_text("bzImage")
    (directory / "big").write_text("vmlinux")
    return {"steps": 2}


def test_an_entry_built_in_place_is_published_by_its_record(tmp_path: Path) -> None:
    entry = _in_place(tmp_path)
    assert entry.ensure(_build_in_place) is True
    assert entry.problem() is None and entry.meta() == {"steps": 2}
    (entry.path / "obj" / "work").write_text("changed by the build")  # not the entry's: no damage
    assert entry.problem() is None
    (entry.path / "big").write_text("VMLINUX")  # same size, new mtime: its digest tells
    assert entry.problem() == "big has changed since it was made (SHA-256 differs)"


def test_an_in_place_build_cut_short_is_not_built_and_keeps_its_work(tmp_path: Path) -> None:
    entry = _in_place(tmp_path)
    entry.ensure(_build_in_place)

    def fails(directory: Path) -> None:
        (directory / "small").write_text("half")
        raise SyscallIrlError("make failed")

    with pytest.raises(SyscallIrlError):
        entry.ensure(fails, again=True)
    assert entry.problem() == NOT_BUILT and (entry.path / "obj" / "work").is_file()


# --- an entry that is one file (a probe's verdict) ----------------------------------------------


def _writer(text: str) -> Callable[[Path], None]:
    def write(staging: Path) -> None:
        staging.write_text(text)

    return write


def test_a_file_entry_that_does_not_parse_is_made_again_with_a_warning(tmp_path: Path) -> None:
    entry = CacheEntry.file(tmp_path / "probe" / "marker", "probe marker",
                            lambda path: None if path.read_text() in ("kvm", "tcg") else "it does not parse")
    entry.ensure(_writer("tcg"))
    assert entry.path.read_text() == "tcg" and entry.problem() is None
    entry.path.write_text("kv")
    with pytest.warns(SyscallIrlWarning, match=r"probe marker .*marker is damaged \(it does not parse\)"):
        entry.ensure(_writer("kvm"))
    assert entry.path.read_text() == "kvm"
    assert sorted(p.name for p in entry.path.parent.iterdir()) == ["marker", "marker.lock"]


# --- one protocol, one lock, one timeout --------------------------------------------------------


def test_no_module_but_the_cache_takes_a_file_lock() -> None:
    package = Path(pytest_syscall_irl.__file__).parent
    lockers = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "filelock" or (
                    isinstance(node, ast.Import) and any(alias.name == "filelock" for alias in node.names)):
                lockers.append(str(path.relative_to(package)))
    assert lockers == ["core/cache.py"]


def test_every_entry_waits_the_same_time_by_default(tmp_path: Path) -> None:
    assert _entry(tmp_path).timeout == LOCK_TIMEOUT
    assert CacheEntry.file(tmp_path / "f", "f", lambda p: None).timeout == LOCK_TIMEOUT


def _restored_by_tar(directory: Path) -> None:
    """What tar, zip or `cp -r` do to a cache: the same bytes, mtimes in whole seconds."""
    for path in directory.rglob("*"):
        if path.is_file():
            os.utime(path, (int(path.stat().st_atime), int(path.stat().st_mtime) - 1))


def test_a_big_file_is_read_only_when_its_mtime_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _entry(tmp_path, digest=lambda name: False)  # every file big: checked by mtime
    entry.ensure(_maker([]))
    record = json.loads((entry.path / "MANIFEST.json").read_text())["files"]["sub/file"]
    assert record[2:] == [hashlib.sha256(b"made").hexdigest(), BY_MTIME]  # the digest is kept all the same
    read: list[Path] = []

    def file_digest(path: Path) -> bytes:
        read.append(path)
        return b""

    monkeypatch.setattr(integrity, "file_digest", file_digest)
    assert entry.problem() is None and read == []  # the fast path reads nothing


def test_a_cache_restored_by_tar_is_used_as_it_is_and_its_record_refreshed(
        tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    entry, calls = _entry(tmp_path, digest=lambda name: False), list[Path]()
    entry.ensure(_maker(calls))
    _restored_by_tar(entry.path)
    assert entry.ensure(_maker(calls)) is False and len(calls) == 1  # not built again
    refreshed = json.loads((entry.path / "MANIFEST.json").read_text())["files"]["sub/file"]
    assert refreshed[1] == (entry.path / "sub" / "file").stat().st_mtime_ns
    assert not recwarn.list


def test_a_big_file_changed_behind_an_old_mtime_is_damaged(tmp_path: Path) -> None:
    entry = _entry(tmp_path, digest=lambda name: False)
    entry.ensure(_maker([]))
    (entry.path / "sub" / "file").write_bytes(b"MADE")  # same size, new mtime
    assert entry.problem() == "sub/file has changed since it was made (SHA-256 differs)"


def test_a_record_without_digests_is_still_checked_by_mtime(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    entry.ensure(_maker([]))
    manifest = entry.path / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data["files"] = {name: record[:2] for name, record in data["files"].items()}  # as records were made before
    manifest.write_text(json.dumps(data))
    assert entry.problem() is None
    _restored_by_tar(entry.path)
    assert entry.problem() == "sub/file was modified since it was made (its mtime differs)"


def test_no_space_left_is_one_error_naming_the_cache_and_the_space(tmp_path: Path) -> None:
    entry = _entry(tmp_path)

    def make(staging: Path) -> None:
        (staging / "half").write_bytes(b"x" * (3 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CacheFullError, match=rf"the cache directory {entry.path.parent} is full \(\d+ MB free of "
                                             r"\d+ MB; making test entry key needs more than 3 MB\)") as raised:
        entry.ensure(make)
    assert isinstance(raised.value, ConfigError)  # the plugin's usage error
    assert entry.problem() == NOT_BUILT and [p.name for p in entry.path.parent.iterdir()] == ["key.lock"]


def test_a_build_that_fails_on_a_full_disk_is_reported_as_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QEMU saving a snapshot through `cat` to a full disk says "Broken pipe", not ENOSPC.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 << 20, 100 << 20, 0))
    entry = _entry(tmp_path)

    def make(staging: Path) -> None:
        raise ImageError("migration failed: Broken pipe")

    with pytest.raises(CacheFullError, match=r"0 MB free of 100 MB") as raised:
        entry.ensure(make)
    assert isinstance(raised.value.__cause__, ImageError)


def test_a_build_that_fails_with_room_left_keeps_its_error(tmp_path: Path) -> None:
    def make(staging: Path) -> None:
        raise ImageError("compiler failed")

    with pytest.raises(ImageError, match="compiler failed"):
        _entry(tmp_path).ensure(make)


def test_a_cache_directory_without_room_is_refused_before_anything_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 10 << 20))
    with pytest.raises(CacheFullError, match=rf"{tmp_path} has too little room \(10 MB free of 1024 MB; a run "
                                             r"\(guest images and snapshots\) needs more than 64 MB\)"):
        check_cache_dir(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root and a kernel that lets it mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_clear_error(small_tmpfs: Path) -> None:
    entry = CacheEntry(small_tmpfs / "images" / "key", "guest image", error=ImageError)

    def make(staging: Path) -> None:
        (staging / "initramfs.cpio.gz").write_bytes(os.urandom(4 << 20))

    with pytest.raises(CacheFullError, match=rf"the cache directory {small_tmpfs / 'images'} is full "
                                             r"\(0 MB free of 2 MB; making guest image key needs more than 2 MB\)"):
        entry.ensure(make)
    assert entry.problem() == NOT_BUILT


def test_a_snapshot_killed_while_it_is_made_leaves_no_directory(tmp_path: Path) -> None:
    # Snapshots are made in a staging directory and renamed (the kind proven above by
    # test_a_build_killed_midway_publishes_nothing_and_its_leftovers_are_swept), not in place.
    from pytest_syscall_irl.lab.snapshot import _entry as snapshot_entry
    entry = snapshot_entry(tmp_path / "snapshots" / "key")
    assert not entry.in_place and entry.record is not None

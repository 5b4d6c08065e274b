"""Saved guest states: boot once, start every further guest from the saved state.

A snapshot is QEMU's migration stream of a guest booted to its ready console (the
agent idle, payloads mounted), written to a file; a new QEMU started with identical
arguments plus ``-incoming`` resumes it in a fraction of a boot. QEMU only accepts a
stream from an identical machine, and a guest resumed from a stale one would run the
old kernel or image, so the cache key covers everything that shapes the machine: the
kernel, initramfs and ISO contents, the QEMU build and the full machine arguments
(sockets, logs and ``-incoming`` aside). Snapshots live in the cache directory like
the guest images and are made by the same protocol (`core.cache`): under a file lock,
appearing by atomic rename, so concurrent xdist workers build one; a damaged one is built
again with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.cache import CacheEntry
from ..core.errors import QemuError
from ..core.integrity import file_digest
from ..machine.qemu import MachineConfig, Sockets, qemu_command

log = logging.getLogger(__name__)

# Bump when what a snapshot holds changes without the inputs changing (e.g. new steps
# before saving), so older snapshots are never resumed.
# 2: the store checks a manifest of the files; 3: core.cache's record; 4: saved only once the
# kernel has left its early clocksource (lab.guest.wait_for_final_clocksource); 5: the agent's
# channel (info.json says which port it talks on)
FORMAT = b"sirl-snapshot-5"
STATE_FILE = "state"
INFO_FILE = "info.json"
# Stand-ins for the per-machine paths, which are no part of the migrated state.
_KEY_SOCKETS = Sockets(Path("/sockets"))
_KEY_CONSOLE_LOG = Path("/console.log")


@dataclass(frozen=True)
class SnapshotInfo:
    """What the guest reported when it became ready, before it was saved."""

    delivery: str  # where the guest found its payloads: "iso" or "initramfs"
    release: str  # uname -r in the guest
    boot_seconds: float  # the cold boot that made the snapshot
    channel: str = "ttyS0"  # the port the agent talks on (its READY line said; none after a restore)


@dataclass(frozen=True)
class Snapshot:
    """A saved ready guest: start it with `MachineConfig(..., incoming=snapshot.state)`."""

    directory: Path
    info: SnapshotInfo
    made: int = 0  # the directory's inode: a rebuild is a new directory (damage in place is not)

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def state(self) -> Path:
        """The migration stream (QEMU's -incoming "exec:cat FILE")."""
        return self.directory / STATE_FILE

    @classmethod
    def read(cls, directory: Path) -> Snapshot | None:
        """The snapshot in *directory*, or None if it is damaged (files deleted by hand)."""
        try:
            data = json.loads((directory / INFO_FILE).read_text())
            info = SnapshotInfo(str(data["delivery"]), str(data["release"]), float(data["boot_seconds"]),
                                str(data.get("channel", "ttyS0")))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            if not (directory / STATE_FILE).is_file():
                return None
            return cls(directory, info, directory.stat().st_ino)
        except OSError:
            return None


# --- the key -------------------------------------------------------------------------------


_qemu_ids: dict[tuple[str, int, int], str] = {}


def qemu_identity(qemu: str) -> str:
    """QEMU's version line and the identity of its binary (path, size, mtime).

    The version alone misses a rebuilt or replaced binary of the same version; hashing
    the ~50 MB binary in every process would cost more than the restore saves.
    """
    found = shutil.which(qemu)
    if found is None:
        raise QemuError(f"QEMU executable {qemu!r} not found: install qemu-system-x86")
    real = os.path.realpath(found)
    st = os.stat(real)
    stamp = (real, st.st_size, st.st_mtime_ns)
    if stamp not in _qemu_ids:
        command = [real, "--version"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise QemuError("QEMU cannot tell its version", command=command, exit_code=result.returncode,
                            log_tail=result.stderr)
        version = result.stdout.splitlines()[0] if result.stdout else ""
        _qemu_ids[stamp] = f"{version}\n{real} {st.st_size} {st.st_mtime_ns}"
    return _qemu_ids[stamp]


def machine_arguments(config: MachineConfig) -> list[str]:
    """The QEMU command line of *config* with per-machine paths replaced by fixed ones."""
    return qemu_command(replace(config, incoming=None), _KEY_SOCKETS, _KEY_CONSOLE_LOG)


def snapshot_key(config: MachineConfig, qemu_id: str) -> str:
    """The cache key of a snapshot of machines of *config* run by the QEMU *qemu_id*
    (see `qemu_identity`): it changes when any input of the saved state changes."""
    files = [config.kernel, config.initrd] + ([config.iso] if config.iso is not None else [])
    h = hashlib.sha256(FORMAT)
    for part in [qemu_id.encode(), "\0".join(machine_arguments(config)).encode(), *map(file_digest, files)]:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


# --- the store -----------------------------------------------------------------------------


def snapshot_dir(cache: Path, key: str) -> Path:
    """Where the snapshot with *key* lives (or will) in the cache directory *cache*."""
    return cache / "snapshots" / key


def _entry(directory: Path) -> CacheEntry:
    return CacheEntry(directory, "guest snapshot", check=_info_problem, error=QemuError)


def _info_problem(directory: Path) -> str | None:
    return f"{INFO_FILE} is unreadable" if Snapshot.read(directory) is None else None


def load_or_build(cache: Path, key: str, build: Callable[[Path], SnapshotInfo]) -> Snapshot:
    """The snapshot with *key*; if the cache has none (or a damaged one), `build(state_path)`
    saves a ready guest to *state_path*. Concurrent callers (threads, processes) build it once."""
    directory = snapshot_dir(cache, key)

    def save(staging: Path) -> None:
        log.info("building guest snapshot %s", key)
        info = build(staging / STATE_FILE)
        data = {"delivery": info.delivery, "release": info.release, "boot_seconds": info.boot_seconds,
                "channel": info.channel}
        (staging / INFO_FILE).write_text(json.dumps(data, indent=1) + "\n")

    _entry(directory).ensure(save)
    snapshot = Snapshot.read(directory)
    if snapshot is None:  # only if another process discarded it in between: rare enough to fail on
        raise QemuError(f"guest snapshot {directory} vanished right after it was checked")
    return snapshot


def discard_unloadable(snapshot: Snapshot) -> None:
    """Remove *snapshot*, whose state QEMU could not load, so that the next
    `load_or_build` builds it again; a rebuild another process made meanwhile stays."""
    entry = _entry(snapshot.directory)
    with entry.lock():
        current = Snapshot.read(snapshot.directory) if snapshot.directory.is_dir() else None
        if current is not None and current.made == snapshot.made:
            entry.discard()

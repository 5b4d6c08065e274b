"""GDB's index cache for the kernel's vmlinux: filled once (one process when several ask),
so every later GDB loads the symbols in a fraction of the time; a damaged index is dropped
and built again, never loaded."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection
from filelock import FileLock

from ..core.errors import SyscallIrlWarning
from ..core.integrity import manifest_problem, write_manifest
from ..machine.gdbmi import GdbSession
from .settings import LabSettings

log = logging.getLogger(__name__)

INDEX_LOCK_TIMEOUT = 600.0


def gnu_build_id(path: Path) -> str | None:
    """The GNU build id of the ELF file *path* in hex (GDB names index cache files by it)."""
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if not isinstance(section, NoteSection):
                continue
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return None


def warm_gdb_index(settings: LabSettings) -> bool:
    """Fill GDB's index cache for the kernel's vmlinux, so every later GDB loads its
    symbols fast. Idempotent, and one process does it when several ask at once.
    True if this call filled it."""
    vmlinux = settings.kernel.vmlinux.path
    build_id = gnu_build_id(vmlinux)
    if build_id is None:
        log.info("%s has no build id: GDB's index cache cannot hold it", vmlinux)
        return False
    directory = settings.gdb_index_cache
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / f"{build_id}.sirl-manifest"
    with FileLock(str(directory) + ".lock", timeout=INDEX_LOCK_TIMEOUT):
        index = sorted(p for p in directory.glob(f"{build_id}.*") if p != manifest)
        if index:
            problem = manifest_problem(manifest)
            if problem is None:
                return False
            # GDB would load a damaged index as it is: drop it, GDB writes a new one.
            warnings.warn(SyscallIrlWarning(f"GDB index cache of {vmlinux} in {directory} is damaged ({problem}): "
                                            "building it again"), stacklevel=2)
            for path in index:
                path.unlink()
        start = time.monotonic()
        GdbSession(vmlinux, gdb=settings.gdb, index_cache_dir=directory).close()
        write_manifest(manifest, sorted(p for p in directory.glob(f"{build_id}.*") if p != manifest))
        log.info("GDB index of %s cached in %.1f s", vmlinux, time.monotonic() - start)
    return True

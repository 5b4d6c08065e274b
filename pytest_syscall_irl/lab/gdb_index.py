"""GDB's index cache for the kernel's vmlinux: filled once (one process when several ask),
so every later GDB loads the symbols in a fraction of the time; a damaged index is dropped
and built again, never loaded (`core.cache`). Each index has a record beside it, named by
the build id like GDB's own files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

from ..core.cache import CacheEntry
from ..core.errors import GdbError
from ..machine.gdbmi import GdbSession
from .settings import LabSettings

log = logging.getLogger(__name__)


def gnu_build_id(path: Path) -> str | None:
    """The GNU build id of the ELF file *path* in hex (GDB names index cache files by it).

    Only a note of owner "GNU": note types are per owner, and a distribution kernel's .notes
    has Xen notes first, one of whose types is also 3 (Debian's 6.1 and 6.12 cloud vmlinux:
    owner "Xen", type 3, 8 bytes), which pyelftools names NT_GNU_BUILD_ID too."""
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if not isinstance(section, NoteSection):
                continue
            for note in section.iter_notes():
                if note["n_name"] == "GNU" and note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return None


def index_entry(directory: Path, build_id: str, vmlinux: Path) -> CacheEntry:
    """The index of the vmlinux with *build_id* in GDB's index cache *directory*: built in
    place (GDB names the files), published by a record beside them."""
    return CacheEntry(directory, f"GDB index of {vmlinux} in", record=f"{build_id}.sirl-record",
                      members=lambda d: [p for p in d.iterdir() if p.name.startswith(build_id)], error=GdbError)


def warm_gdb_index(settings: LabSettings) -> bool:
    """Fill GDB's index cache for the kernel's vmlinux, so every later GDB loads its
    symbols fast. Idempotent, and one process does it when several ask at once; a
    damaged index is dropped (GDB would load it as it is) and built again, with a
    warning. True if this call filled it."""
    vmlinux = settings.kernel.vmlinux.path
    build_id = gnu_build_id(vmlinux)
    if build_id is None:
        log.info("%s has no build id: GDB's index cache cannot hold it", vmlinux)
        return False
    directory = settings.gdb_index_cache

    def index(directory: Path) -> None:
        start = time.monotonic()
        GdbSession(vmlinux, gdb=settings.gdb, index_cache_dir=directory).close()
        log.info("GDB index of %s cached in %.1f s", vmlinux, time.monotonic() - start)

    return index_entry(directory, build_id, vmlinux).ensure(index)

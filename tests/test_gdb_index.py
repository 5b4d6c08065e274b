"""The GNU build id GDB's index cache is keyed by, read from the vmlinux's notes."""

from __future__ import annotations

import struct
from pathlib import Path

from pytest_syscall_irl.lab.gdb_index import gnu_build_id

NT_GNU_BUILD_ID = 3


def _note(owner: bytes, kind: int, desc: bytes) -> bytes:
    def padded(data: bytes) -> bytes:
        return data + b"\0" * (-len(data) % 4)
    return struct.pack("<III", len(owner) + 1, len(desc), kind) + padded(owner + b"\0") + padded(desc)


def _elf_with_notes(path: Path, notes: bytes) -> Path:
    """A minimal ELF64 file with one SHT_NOTE section `.notes` holding *notes*."""
    shstrtab = b"\0.notes\0.shstrtab\0"
    notes_offset = 64
    shstrtab_offset = notes_offset + len(notes)
    sections_offset = shstrtab_offset + len(shstrtab) + (-(shstrtab_offset + len(shstrtab)) % 8)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, sections_offset, 0, 64, 56, 0, 64, 3, 2)

    def section(name: int, kind: int, offset: int, size: int, align: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, align, 0)

    table = (b"\0" * 64 + section(1, 7, notes_offset, len(notes), 4)
             + section(8, 3, shstrtab_offset, len(shstrtab), 1))
    data = header + notes + shstrtab
    path.write_bytes(data + b"\0" * (sections_offset - len(data)) + table)
    return path


def test_the_build_id_is_the_gnu_note_s_not_a_xen_note_of_the_same_type(tmp_path: Path) -> None:
    # Debian's cloud vmlinux: a Xen note of type 3 (8 bytes) comes before the GNU build id.
    build_id = bytes(range(20))
    notes = _note(b"Xen", NT_GNU_BUILD_ID, b"\x00\x00\x00\x80\xff\xff\xff\xff") + \
        _note(b"GNU", NT_GNU_BUILD_ID, build_id)
    assert gnu_build_id(_elf_with_notes(tmp_path / "vmlinux", notes)) == build_id.hex()


def test_a_file_without_a_gnu_build_id_has_none(tmp_path: Path) -> None:
    notes = _note(b"Xen", NT_GNU_BUILD_ID, b"\x00\x00\x00\x80\xff\xff\xff\xff")
    assert gnu_build_id(_elf_with_notes(tmp_path / "vmlinux", notes)) is None

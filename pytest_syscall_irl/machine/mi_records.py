"""GDB/MI records as typed values, and the line parser (pygdbmi's, with a fast path).

No pytest here. The transport that reads them is mi_transport.MiTransport; the session
that gives them meaning is gdbmi.GdbSession.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pygdbmi.gdbmiparser import parse_response


def mi_quote(text: str) -> str:
    """*text* as one MI c-string argument: ``a "b"`` becomes ``"a \\"b\\""``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t") + '"'


def int_or_none(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


@dataclass(frozen=True)
class MiResult:
    """A command's result record, with the stream output GDB printed meanwhile."""

    message: str  # done, running, connected, exit
    payload: dict[str, Any]
    console: str = ""
    log: str = ""


@dataclass(frozen=True)
class StopEvent:
    """A ``*stopped`` record: why and where the target stopped."""

    reason: str | None  # breakpoint-hit, end-stepping-range, signal-received; None on connect
    breakpoint: int | None
    address: int | None
    function: str | None
    thread_id: int | None
    signal: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> StopEvent:
        """Build from the payload of a parsed ``*stopped`` record."""
        frame = payload.get("frame") or {}
        func = frame.get("func")
        return cls(
            reason=payload.get("reason"),
            breakpoint=int_or_none(payload.get("bkptno")),
            address=int_or_none(frame.get("addr")),
            function=None if func in (None, "??") else func,
            thread_id=int_or_none(payload.get("thread-id")),
            signal=payload.get("signal-name"),
            raw=payload,
        )


@dataclass(frozen=True)
class Breakpoint:
    """A breakpoint as ``-break-insert`` reported it."""

    number: int
    type: str  # "breakpoint" or "hw breakpoint"
    address: int | None  # None when pending or with several locations
    function: str | None
    condition: str | None
    temporary: bool
    locations: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False)

    @property
    def hardware(self) -> bool:
        """True for a hardware breakpoint."""
        return self.type.startswith("hw")

    @classmethod
    def from_payload(cls, bkpt: dict[str, Any]) -> Breakpoint:
        """Build from the ``bkpt`` tuple of a ``-break-insert`` result."""
        address = int_or_none(bkpt.get("addr"))
        found = (int_or_none(loc.get("addr")) for loc in bkpt.get("locations") or [])
        locations = tuple(a for a in found if a is not None)
        return cls(
            number=int(bkpt["number"]),
            type=bkpt.get("type", "breakpoint"),
            address=address,
            function=bkpt.get("func"),
            condition=bkpt.get("cond"),
            temporary=bkpt.get("disp") == "del",
            locations=locations or ((address,) if address is not None else ()),
            raw=bkpt,
        )


@dataclass(frozen=True)
class Instruction:
    """One disassembled instruction."""

    address: int
    text: str
    function: str | None
    offset: int | None


@dataclass(frozen=True)
class Frame:
    """One frame of a backtrace, innermost first."""

    level: int
    address: int | None
    function: str | None
    file: str | None
    line: int | None


class RegisterValue(NamedTuple):
    """One register as -data-list-register-values reports it (value in GDB's hex text)."""

    number: int
    name: str
    value: str


_REGISTER_DUMP = re.compile(r"(\d+)\^done,register-values=\[(.*)\]")
_REGISTER_ITEM = re.compile(r'\{number="(\d+)",value="([^"\\]*)"\}')


def parse_line(line: str) -> dict[str, Any]:
    """One MI output line parsed as pygdbmi's ``parse_response`` parses it, faster for
    register dumps: that parser walks the text a character at a time (~0.5 us each),
    so a 3 kB register dump would cost 1.4 ms, more than GDB takes to answer."""
    dump = _REGISTER_DUMP.fullmatch(line)
    if dump is not None and "\\" not in line:
        items = _REGISTER_ITEM.findall(dump[2])
        if len(items) == dump[2].count("{number="):
            values = [{"number": number, "value": value} for number, value in items]
            payload = {"register-values": values}
            return {"type": "result", "message": "done", "payload": payload, "token": int(dump[1])}
    return parse_response(line)


_PTYPE_OFFSET = re.compile(r"^/\*\s*(\d+)(?::\s*\d+)?\s*\|\s*\d+\s*\*/(.*)$")  # /*  136: 0 |  8 */ decl
_PTYPE_SIZE_ONLY = re.compile(r"^/\*\s*\d+\s*\*/(.*)$")  # a union member: /*    8 */ decl
_PTYPE_CLOSE = re.compile(r"^}\s*(\w*)\s*(?:\[[^\]]*\]\s*)*;?$")
_DECL_FUNCTION_POINTER = re.compile(r"\(\s*\*\s*(\w+)\s*\)")
_DECL_NAME = re.compile(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$")


class _Aggregate:
    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.members: dict[str, int] = {}


def parse_ptype_offsets(text: str) -> dict[str, int]:
    """Byte offsets of the members of the struct that GDB's ``ptype/o struct X`` printed,
    as C names them: members of anonymous unions and structs count as the struct's own
    (``regs->cs`` when cs sits in an anonymous union), members of named ones do not.

    Raises ValueError when *text* is not ``ptype/o`` output of an aggregate.
    """
    stack: list[_Aggregate] = []
    root: _Aggregate | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("/* XXX") or (line.startswith("/* total size") and line.endswith("*/")):
            continue
        if root is None:
            if "type = " in line and line.endswith("{"):
                root = _Aggregate(0)
                stack.append(root)
            continue
        if not stack:
            break
        closing = _PTYPE_CLOSE.match(line)
        if closing:
            done = stack.pop()
            if not stack:
                break
            name = closing.group(1)
            if name:
                stack[-1].members.setdefault(name, done.offset)
            else:  # anonymous: its members are the enclosing aggregate's
                for member, offset in done.members.items():
                    stack[-1].members.setdefault(member, offset)
            continue
        with_offset = _PTYPE_OFFSET.match(line)
        size_only = None if with_offset else _PTYPE_SIZE_ONLY.match(line)
        if with_offset:
            offset, decl = int(with_offset.group(1)), with_offset.group(2).strip()
        elif size_only:
            offset, decl = stack[-1].offset, size_only.group(1).strip()
        else:
            continue
        if decl.endswith("{"):
            stack.append(_Aggregate(offset))
            continue
        decl = decl.rstrip(";").split(" : ")[0].strip()  # drop a bit-field width
        name = _DECL_FUNCTION_POINTER.search(decl) or _DECL_NAME.search(decl)
        if name:
            stack[-1].members.setdefault(name.group(1), offset)
    if root is None or stack:
        raise ValueError(f"not the complete ptype/o output of an aggregate: {text[:200]!r}")
    return root.members

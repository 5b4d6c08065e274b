"""The agent's command channel: a serial port of its own (ttyS1), byte-exact and framed.

The agent (guest/agent.c) answers each command with frames: a 12-byte header ("SIR", a
kind byte, the command's id and the payload length, both u32 big-endian), then the
payload. Kinds: BEGIN (empty), OUTPUT (a chunk of the command's stdout and stderr) and
END (the exit status, s32 big-endian). Everything the command prints is payload, whose
length the agent wrote before it, so no output can fake an end; the port is raw on both
ends (no echo, no CR/NL mapping, 8 bits), so the output arrives as the command wrote it.

Reading is linear: each byte is copied a fixed number of times, whatever the output's
size (`FrameParser`).
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConsoleError

HEADER = struct.Struct(">3scII")
MAGIC = b"SIR"
BEGIN, OUTPUT, END = b"B", b"O", b"E"
KINDS = (BEGIN, OUTPUT, END)
# The agent writes chunks of at most 16 KB; a longer frame means the stream is out of step.
MAX_PAYLOAD = 1 << 20
RECV_SIZE = 1 << 20
# A read of this much is output in bulk: wait BULK_PAUSE s before the next (a pipe holds 64 KB,
# ~40 ms of output at the port's ~1.5 MB/s), so that reads are few and large.
BULK = 256
BULK_PAUSE = 0.005


@dataclass(frozen=True)
class Frame:
    """One frame of the agent: its kind, the command's id, the payload."""

    kind: bytes
    ident: int
    payload: bytes

    @property
    def status(self) -> int:
        """The exit status an END frame carries."""
        value: int = struct.unpack(">i", self.payload)[0]
        return value


def encode(kind: bytes, ident: int, payload: bytes = b"") -> bytes:
    """A frame as the agent writes it (for fakes and tests)."""
    return HEADER.pack(MAGIC, kind, ident, len(payload)) + payload


def end_frame(ident: int, status: int) -> bytes:
    """The END frame of command *ident* with exit *status*."""
    return encode(END, ident, struct.pack(">i", status))


class FrameParser:
    """Cuts a byte stream into frames, whatever the pieces it arrives in."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add *data*; returns the frames it completed. A header that is no frame's means
        the stream is out of step (the agent died mid-frame, another writer on the port):
        ConsoleError, since nothing after it can be trusted."""
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        while len(buf) - pos >= HEADER.size:
            magic, kind, ident, length = HEADER.unpack_from(buf, pos)
            if magic != MAGIC or kind not in KINDS or length > MAX_PAYLOAD:
                raise ConsoleError("the command channel is out of step: got "
                                   f"{bytes(buf[pos:pos + HEADER.size])!r} where a frame header belongs")
            end = pos + HEADER.size + length
            if end > len(buf):
                break
            frames.append(Frame(kind, ident, bytes(buf[pos + HEADER.size:end])))
            pos = end
        del buf[:pos]  # bytearray drops a prefix without moving the rest each time
        return frames

    @property
    def pending_bytes(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buf)


class CommandChannel:
    """The host's end of the agent's port: two FIFOs QEMU holds open (``-chardev pipe``),
    PATH.in to the guest and PATH.out from it.

    Not a socket, like the other chardevs: QEMU writes a serial port's output one byte per
    write(), and a unix socket charges each one-byte write a whole buffer's overhead, so
    QEMU's send buffer is full after ~300 bytes and the host has to wake for every few bytes
    to keep it going (10 MB: 12.7 s, 11 s of host CPU). A pipe packs the bytes into pages:
    64 KB wait in it, and the host reads them in a few large reads (10 MB: 6.6 s, 0.03 s of
    host CPU, measured under TCG).
    """

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self._out = out_fd
        self._in = in_fd
        self._parser = FrameParser()
        self.closed = False  # the guest side went away (QEMU exited)

    @classmethod
    def open(cls, path: Path, timeout: float = 10.0) -> CommandChannel:
        """Open PATH.out and PATH.in, once QEMU holds them (it opens both at launch)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                out_fd = os.open(f"{path}.out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConsoleError(f"cannot open the guest's command channel {path}.out") from exc
                time.sleep(0.01)
        while True:
            try:  # without a reader (QEMU) this fails with ENXIO rather than blocking
                in_fd = os.open(f"{path}.in", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.set_blocking(in_fd, True)
                return cls(out_fd, in_fd)
            except OSError as exc:
                if time.monotonic() > deadline:
                    os.close(out_fd)
                    raise ConsoleError(f"cannot open the guest's command channel {path}.in") from exc
                time.sleep(0.01)

    def send(self, data: bytes) -> None:
        """Send *data* (a command line) to the agent."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._in, view):]
        except OSError as exc:
            raise ConsoleError(f"cannot send to the guest's command channel: {exc}") from exc

    def read(self, timeout: float) -> list[Frame]:
        """The frames that arrive within *timeout* s (none if nothing does); on EOF sets
        `closed` and returns what was complete."""
        if self.closed:
            return []
        ready, _, _ = select.select([self._out], [], [], max(timeout, 0.0))
        if not ready:
            return []
        try:
            data = os.read(self._out, RECV_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return []
        if len(data) >= BULK:
            # Output in bulk: let the pipe fill rather than wake for every few bytes.
            time.sleep(BULK_PAUSE)
        return self._parser.feed(data)

    def close(self) -> None:
        """Close the FIFOs (the guest keeps running)."""
        self.closed = True
        for fd in (self._out, self._in):
            if fd >= 0:
                os.close(fd)
        self._out = self._in = -1

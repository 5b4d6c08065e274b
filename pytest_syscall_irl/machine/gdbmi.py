"""GDB driven over the Machine Interface: typed commands over one MI transport.

mi_transport.MiTransport owns the process, the reader threads, the token matching and
the transcript; this module says what the commands mean (breakpoints, registers,
memory, stops). A register file (arch.registers.RegisterFile), handed in by the face
that chose the architecture, names the registers that are views of others: those are
computed here instead of read.

Example (the x86_64 register file comes from arch/x86_64/registers.py)::

    with GdbSession(vmlinux="vmlinux", transcript_path="gdb.log", register_file=X86_64_REGISTERS) as gdb:
        gdb.connect("/tmp/guest/gdb.sock")
        gdb.break_insert("start_kernel", hardware=True)
        stop = gdb.continue_until_stop(timeout=30)
        assert gdb.registers()["rip"] == gdb.symbol_address("start_kernel")
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..arch.registers import RegisterFile
from ..core.errors import GdbError
from .mi_records import (Breakpoint, Frame, Instruction, MiResult, RegisterValue, StopEvent, int_or_none, mi_quote,
                         parse_line, parse_ptype_offsets)
from .mi_transport import (CLOSE_TIMEOUT, DEFAULT_TIMEOUT, GdbCommandError, GdbTimeoutError,
                           MiTransport, PathLike, State)

__all__ = ["Breakpoint", "Frame", "GdbCommandError", "GdbSession", "GdbTimeoutError", "Instruction", "MiResult",
           "StopEvent", "mi_quote", "parse_line", "parse_ptype_offsets"]

log = logging.getLogger(__name__)

LOAD_TIMEOUT = 120.0  # reading a vmlinux's DWARF cold (a distro one takes ~13 s here)
STOP_TIMEOUT = 60.0  # waiting for the guest to hit a breakpoint
INTERRUPT_RETRY = 1.0  # an interrupt not answered by a stop this soon is sent again

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class GdbSession:
    """One GDB process speaking MI 3, driving one target (QEMU's gdbstub)."""

    def __init__(
        self,
        vmlinux: PathLike | None = None,
        *,
        gdb: str = "gdb",
        transcript_path: PathLike | None = None,
        index_cache_dir: PathLike | None = None,
        init_commands: Sequence[str] = (),
        load_timeout: float = LOAD_TIMEOUT,
        background: bool = False,
        register_file: RegisterFile | None = None,
    ) -> None:
        """Start GDB; apply settings and *init_commands*, then load *vmlinux*'s symbols.

        *index_cache_dir* enables GDB's index cache there before the symbols load, so a
        second session on the same vmlinux starts in a fraction of the time.

        *register_file* names the registers that are views of others (x86_64's eax of
        rax): registers() computes those instead of having GDB format them. Without one,
        every register is read as GDB names it (the same values, a little slower).

        With *background*, the settings and the symbol load run on a thread of their own
        and the constructor returns once GDB is started: the caller can start a guest
        meanwhile (GDB's start-up is ~0.1 s, a restore ~0.15 s). The first command, or
        `wait_ready()`, waits for that set-up and raises its error. GDB itself is always
        started by the calling thread: a child dies with the thread that spawned it
        (procs.spawn sets PR_SET_PDEATHSIG).
        """
        self._register_file = register_file
        self._auto_continue: set[int] = set()  # breakpoints whose commands end in continue
        self._register_names: list[str] | None = None
        self._scalar_registers: list[int] | None = None
        # (view, base, shift, mask), learned at the first full read: plain tuples, as
        # every later full read walks ~50 of them.
        self._register_views: list[tuple[str, str, int, int]] = []
        self._setup_thread: threading.Thread | None = None
        self._setup_error: BaseException | None = None
        self._mi = MiTransport(gdb, transcript_path=transcript_path)
        if background:
            self._setup_thread = threading.Thread(
                target=self._background_setup, args=(vmlinux, index_cache_dir, init_commands, load_timeout),
                name="gdbmi-setup", daemon=True)
            self._setup_thread.start()
            return
        try:
            self._setup(vmlinux, index_cache_dir, init_commands, load_timeout)
        except Exception:
            self.close()
            raise

    def _background_setup(self, *args: Any) -> None:
        try:
            self._setup(*args)
        except BaseException as exc:  # handed to whoever waits for the session
            self._setup_error = exc

    def wait_ready(self) -> None:
        """Wait for a background set-up (settings, symbols) to end; on its failure the
        session is closed and the error raised. Returns at once for a foreground one."""
        thread = self._setup_thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join()  # bounded: each set-up command has its own timeout
        self._setup_thread = None
        if self._setup_error is not None:
            self.close()
            raise self._setup_error

    def _setup(
        self,
        vmlinux: PathLike | None,
        index_cache_dir: PathLike | None,
        init_commands: Sequence[str],
        load_timeout: float,
    ) -> None:
        for setting in ("mi-async on", "pagination off", "confirm off", "width 0", "height 0"):
            self._gdb_set(setting)
        if index_cache_dir is not None:
            self._gdb_set(f"index-cache directory {os.fspath(index_cache_dir)}")
            try:
                self._gdb_set("index-cache enabled on")  # GDB 13 syntax
            except GdbCommandError:
                self._gdb_set("index-cache on")  # GDB 12 and older
        for mi in init_commands:
            self.command(mi)
        if vmlinux is not None:
            self.load_symbols(vmlinux, timeout=load_timeout)

    def _gdb_set(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        # -gdb-set hands its raw argument text to the CLI "set": MI quotes would be kept.
        self.command(f"-gdb-set {text}", timeout)

    # ---- the transport -------------------------------------------------------

    def command(self, mi: str, timeout: float = DEFAULT_TIMEOUT) -> MiResult:
        """Send one MI command (no token: one is added) and return its result record.

        Raises GdbCommandError on ``^error``, GdbTimeoutError past *timeout*, GdbError
        if GDB is gone. Example: ``gdb.command("-stack-info-depth").payload["depth"]``.
        """
        self.wait_ready()
        return self._mi.command(mi, timeout)

    @property
    def state(self) -> State:
        """``"running"``, ``"stopped"`` or ``"detached"`` (no target), from GDB's records."""
        return self._mi.state

    def is_alive(self) -> bool:
        """True while GDB runs and the session is not closed."""
        return self._mi.is_alive()

    @property
    def pid(self) -> int:
        """GDB's process id."""
        return self._mi.pid

    @property
    def transcript_path(self) -> Path | None:
        """The file every MI line goes to, or None."""
        return self._mi.transcript_path

    def transcript_tail(self, lines: int = 40) -> str:
        """The last *lines* lines of the MI transcript, each cut to mi_transport.TAIL_LINE_CHARS
        (a disassembly or a register dump is kilobytes on one line; the file keeps it whole)."""
        return self._mi.transcript_tail(lines)

    # ---- target control ------------------------------------------------------

    def load_symbols(self, path: PathLike, timeout: float = LOAD_TIMEOUT) -> None:
        """Load the executable and symbols of *path* (a vmlinux, an ELF)."""
        self.command(f"-file-exec-and-symbols {mi_quote(os.fspath(path))}", timeout)
        self._forget_registers()

    def connect(self, socket_path: PathLike, timeout: float = DEFAULT_TIMEOUT) -> StopEvent:
        """Attach to a gdbstub listening on the unix socket *socket_path* (or host:port).

        The target is stopped afterwards; returns the stop GDB reported on connecting.
        """
        self._mi.drop_stale_stops("connect")
        # -target-select hands its raw text to the CLI "target": MI quotes would stay in the path.
        self.command(f"-target-select remote {os.fspath(socket_path)}", timeout)
        self._forget_registers()
        # GDB 13 prints *stopped before ^connected: it is already queued.
        return self.wait_for_stop(timeout)

    def detach(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Detach from the target, which resumes running on its own. A running target is
        stopped first: GDB refuses to detach from one (all-stop, async)."""
        if self.state == "running":
            try:
                self.interrupt(timeout)
            except GdbCommandError:
                if self.state == "running":  # not a stop that raced the interrupt
                    raise
        self.command("-target-detach", timeout)
        self._mi.mark_detached()
        self._forget_registers()

    def resume(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Continue the target; return once GDB says it runs (``^running``).

        A stop GDB reported before this resume is dropped: wait_for_stop returns a later one.
        """
        self.command("-exec-continue", timeout)

    def wait_for_stop(self, timeout: float = STOP_TIMEOUT) -> StopEvent:
        """The next ``*stopped`` record, including one that arrived during another command."""
        # A breakpoint whose commands end in `continue`: GDB resumes the target itself.
        return self._mi.wait_for_stop(timeout, skip=lambda stop: stop.breakpoint in self._auto_continue)

    def continue_until_stop(self, timeout: float = STOP_TIMEOUT) -> StopEvent:
        """Resume, then wait for the next stop (a breakpoint, a signal, an interrupt)."""
        self.resume()
        return self.wait_for_stop(timeout)

    def stepi(self, timeout: float = DEFAULT_TIMEOUT) -> StopEvent:
        """Execute one machine instruction; return the resulting stop."""
        self.command("-exec-step-instruction", timeout)
        return self.wait_for_stop(timeout)

    def interrupt(self, timeout: float = DEFAULT_TIMEOUT) -> StopEvent:
        """Stop a running target (``-exec-interrupt``) and return the stop.

        An interrupt can be lost: GDB 13 answers ^done, but when it arrives while GDB has
        the target stopped to test a breakpoint condition that turns out false, GDB
        resumes it and no stop follows (seen with a condition hit often, against QEMU
        7.2). So an interrupt with no stop after INTERRUPT_RETRY seconds is sent again."""
        deadline = time.monotonic() + timeout
        while self.state == "running":
            self.command("-exec-interrupt", timeout)
            try:
                return self.wait_for_stop(min(INTERRUPT_RETRY, max(deadline - time.monotonic(), 0.0)))
            except GdbTimeoutError:
                if time.monotonic() >= deadline:
                    raise
                log.warning("an interrupt brought no stop within %.1f s: sending it again", INTERRUPT_RETRY)
        try:  # it may have stopped on its own just now
            return self.wait_for_stop(0.0)
        except GdbTimeoutError:
            raise GdbError(f"interrupt: the target is not running ({self.state})") from None

    # ---- breakpoints ---------------------------------------------------------

    def break_insert(
        self,
        location: str,
        condition: str | None = None,
        hardware: bool = False,
        temporary: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Breakpoint:
        """Insert a breakpoint at *location* (``ksys_write``, ``*0xffffffff81000000``).

        *condition* is a GDB expression (``$rax == 1 && $rdx == 12``).
        """
        args = ["-break-insert"]
        if hardware:
            args.append("-h")
        if temporary:
            args.append("-t")
        if condition is not None:
            args += ["-c", mi_quote(condition)]
        args.append(mi_quote(location))
        return Breakpoint.from_payload(self.command(" ".join(args), timeout).payload["bkpt"])

    def break_commands(self, number: int, commands: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        """Have GDB run *commands* at each hit of breakpoint *number*, with no round trip
        to us; end them with ``continue`` to let the target run on at once."""
        self.command(f"-break-commands {int(number)} " + " ".join(mi_quote(c) for c in commands), timeout)
        if commands and commands[-1].strip() in ("continue", "c"):
            self._auto_continue.add(int(number))
        else:
            self._auto_continue.discard(int(number))

    def delete_breakpoint(self, number: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Delete breakpoint *number*."""
        self.command(f"-break-delete {int(number)}", timeout)
        self._auto_continue.discard(int(number))

    def delete_breakpoints(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Delete every breakpoint."""
        self.command("-break-delete", timeout)
        self._auto_continue.clear()

    # ---- data ----------------------------------------------------------------

    def _forget_registers(self) -> None:
        # The target description (hence the register list) changes with the target.
        self._register_names = None
        self._scalar_registers = None
        self._register_views = []

    def _names(self, timeout: float) -> list[str]:
        if self._register_names is None:
            result = self.command("-data-list-register-names", timeout)
            self._register_names = [str(n) for n in result.payload["register-names"]]
        return self._register_names

    def _register_values(self, numbers: list[int] | None, timeout: float) -> list[RegisterValue]:
        names = self._names(timeout)
        mi = "-data-list-register-values x"
        if numbers is not None:
            mi += "".join(f" {n}" for n in numbers)
        found = []
        for item in self.command(mi, timeout).payload["register-values"]:
            number = int(item["number"])
            if number < len(names) and names[number]:  # unnamed slots are GDB internals
                found.append(RegisterValue(number, names[number], str(item["value"])))
        return found

    def raw_registers(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
        """Every register as GDB prints it in hex (vectors stay GDB's text), one round trip."""
        return {reg.name: reg.value for reg in self._register_values(None, timeout)}

    def registers(
        self, names: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, int]:
        """Integer registers in one round trip: all of them (GPRs, rip, eflags, segments,
        fs/gs bases, cr*, efer, x87 control, GDB's eax/ax/al views), or just *names*.

        Vector registers are left out (see raw_registers). GDB formats each register it
        sends (~10 us apiece), so after the first read the views the session's register
        file names (x86_64: eax, ax, al, ah, r8d, ...) are derived here from their base
        registers instead of read; a full x86_64 read is then ~50 registers.
        ``registers(["rip", "rcx", "r11"])`` is faster still.
        """
        numbers = self._scalar_registers if names is None else self._numbers(names, timeout)
        regs = self._register_values(numbers, timeout)
        values = {reg.number: int_or_none(reg.value) for reg in regs}
        if numbers is None:  # the first full read tells which registers are integers
            self._learn_scalars(regs, values)
        elif names is not None and None in values.values():
            raise GdbError(f"not all of {list(names)} are integer registers: see raw_registers()")
        found = {reg.name: v for reg in regs if (v := values[reg.number]) is not None}
        if names is None and numbers is not None:
            for view, base, shift, mask in self._register_views:
                if base in found:  # GDB gave its value as an integer this time
                    found[view] = (found[base] >> shift) & mask
        return found

    @property
    def derived_views(self) -> list[str]:
        """The registers full reads derive here from others (the register file's views), once
        the first full read has learned which GDB gives as integers; [] before it."""
        return [view for view, _, _, _ in self._register_views]

    def _learn_scalars(self, regs: list[RegisterValue], values: dict[int, int | None]) -> None:
        """The integer registers to read on later full reads, without the views of them
        (named by the register file) that can be derived from a register read with them."""
        scalars = {reg.name: reg.number for reg in regs if values[reg.number] is not None}
        views = self._register_file.derivable(list(scalars)) if self._register_file is not None else []
        derived = {view.name for view in views}
        self._scalar_registers = [number for name, number in scalars.items() if name not in derived]
        self._register_views = [(view.name, view.base, view.offset, view.mask) for view in views]

    def _numbers(self, names: Sequence[str], timeout: float) -> list[int]:
        known = {name: number for number, name in enumerate(self._names(timeout)) if name}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise GdbError(f"no such register: {', '.join(unknown)}")
        return [known[name] for name in names]

    def set_register(self, name: str, value: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Set register *name* (``rax``, ``eflags``, ``cr3``) of the current frame to *value*.

        By number (``-data-write-register-values``): GDB's ``set var $cr3 = ...`` fails
        ("Invalid cast") for registers it types as flag structs."""
        if not _IDENTIFIER.fullmatch(name):
            raise GdbError(f"not a register name: {name!r}")
        number = self._numbers([name], timeout)[0]
        self.command(f"-data-write-register-values x {number} {int(value) % 2**64:#x}", timeout)

    def evaluate(self, expression: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """GDB's value of the C *expression*, as GDB prints it (``evaluate("1+2") == "3"``)."""
        result = self.command(f"-data-evaluate-expression {mi_quote(expression)}", timeout)
        return str(result.payload["value"])

    def symbol_address(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The address of symbol *name*; GdbCommandError if GDB does not know it."""
        # Names such as foo.constprop.0 must be quoted for GDB's expression parser.
        symbol = name if _IDENTIFIER.fullmatch(name) else f"'{name}'"
        value = self.evaluate(f"(unsigned long)&{symbol}", timeout)
        address = int_or_none(value)
        if address is None:
            raise GdbError(f"address of {name!r} is not a number: {value!r}")
        return address

    def read_memory(self, address: int, size: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """*size* bytes of target memory at *address*; GdbError if any are unreadable."""
        mi = f"-data-read-memory-bytes {address:#x} {int(size)}"
        blocks = self.command(mi, timeout).payload.get("memory") or []
        data = b"".join(bytes.fromhex(block["contents"]) for block in blocks)
        if len(data) != size or (blocks and int_or_none(blocks[0]["begin"]) != address):
            raise GdbError(f"read {len(data)} of {size} bytes at {address:#x}", command=[mi])
        return data

    def write_memory(self, address: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Write *data* to target memory at *address*."""
        if data:
            self.command(f"-data-write-memory-bytes {address:#x} {data.hex()}", timeout)

    def disassemble(
        self, start: str | int, end: int | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> list[Instruction]:
        """The instructions of the function containing *start* (a symbol or an address),
        or of the range [start, end) when *end* is given."""
        where = f"{start:#x}" if isinstance(start, int) else mi_quote(start)
        if end is None:
            mi = f"-data-disassemble -a {where} -- 0"
        else:
            mi = f"-data-disassemble -s {where} -e {end:#x} -- 0"
        return [
            Instruction(
                address=int(insn["address"], 16),
                text=str(insn.get("inst", "")),
                function=insn.get("func-name"),
                offset=int_or_none(insn.get("offset")),
            )
            for insn in self.command(mi, timeout).payload.get("asm_insns") or []
        ]

    def backtrace(self, timeout: float = DEFAULT_TIMEOUT) -> list[Frame]:
        """The stack of the current thread, innermost frame first."""
        frames = self.command("-stack-list-frames", timeout).payload.get("stack") or []
        return [
            Frame(
                level=int(frame.get("level", index)),
                address=int_or_none(frame.get("addr")),
                function=None if frame.get("func") in (None, "??") else frame["func"],
                file=frame.get("fullname") or frame.get("file"),
                line=int_or_none(frame.get("line")),
            )
            for index, frame in enumerate(frames)
        ]

    def member_offsets(self, aggregate: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, int]:
        """Byte offsets of the members of *aggregate* (``struct pt_regs``) from DWARF, in one
        type lookup (``ptype/o``); an expression per member costs a lookup each (~14 ms)."""
        try:
            return parse_ptype_offsets(self.cli(f"ptype/o {aggregate}", timeout))
        except ValueError as e:
            raise GdbCommandError(f"ptype/o {aggregate}", str(e), self.transcript_tail()) from e

    def cli(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run a CLI command (``info registers rip``) and return what it printed."""
        return self.command(f"-interpreter-exec console {mi_quote(command)}", timeout).console

    # ---- lifetime ------------------------------------------------------------

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Ask GDB to exit (it detaches, the guest runs on), then stop and reap it. Idempotent."""
        if self._mi.closed:
            return
        ask_to_exit = True
        setup = self._setup_thread
        if setup is not None and setup is not threading.current_thread():
            self._setup_thread = None  # its commands fail once GDB is gone
            if setup.is_alive():
                ask_to_exit = False  # no -gdb-exit behind a symbol load: stop GDB
        self._mi.close(timeout, ask_to_exit=ask_to_exit)

    def __enter__(self) -> GdbSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

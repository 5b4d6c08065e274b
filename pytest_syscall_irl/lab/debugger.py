"""One GDB per worker, attached to each test's guest in turn. No pytest here: the plugin's
`gdb` fixture is a few lines over this class, and a script or the bench can use it too.

    debugger = WorkerDebugger(lab, worker="gw0", register_file=X86_64_REGISTERS)
    session = debugger.attach(guest)   # GDB started on first need, the guest stopped
    ...
    debugger.release(session, guest)   # breakpoints deleted, the guest runs on
    debugger.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import SyscallIrlError
from ..machine.gdbmi import GdbSession
from .gdb_index import warm_gdb_index

if TYPE_CHECKING:
    from ..arch.registers import RegisterFile
    from .guest import Guest, Lab


class WorkerDebugger:
    """The worker's GDB session: the vmlinux symbols load once per worker, not per test. A
    GDB that died is replaced; a session that breaks while a test ends is closed, and the
    guest it held is shut down (it must not stay stopped for the next test). The MI
    transcript is `<log_root>/gdb-<worker>.mi.log` (gw0: a name the report's reader can match)."""

    def __init__(self, lab: Lab, worker: str, register_file: RegisterFile | None = None) -> None:
        self.lab = lab
        self.worker = worker
        self.register_file = register_file
        self._session: GdbSession | None = None

    def session(self) -> GdbSession:
        """The worker's live GDB, started now if there is none or it died. It loads the
        symbols in the background: ask for it before the guest, and both get ready at once."""
        if self._session is not None and not self._session.is_alive():
            self._discard(self._session)
        if self._session is None:
            # The first worker to get here fills GDB's index cache; the others wait and load fast.
            warm_gdb_index(self.lab.settings)
            self.lab.log_root.mkdir(parents=True, exist_ok=True)
            settings = self.lab.settings
            self._session = GdbSession(self.lab.kernel.vmlinux.path, gdb=settings.gdb,
                                       transcript_path=self.lab.log_root / f"gdb-{self.worker}.mi.log",
                                       index_cache_dir=settings.gdb_index_cache, background=True,
                                       register_file=self.register_file)
        return self._session

    def attach(self, guest: Guest) -> GdbSession:
        """The worker's GDB connected to *guest*, which it holds stopped; the guest knows its
        debugger (`Guest.run` lets it run for a command)."""
        session = self.session()
        session.connect(guest.gdb_socket)
        guest.debugger = session
        return session

    def release(self, session: GdbSession, guest: Guest) -> None:
        """After a test: the breakpoints are deleted and the guest runs on. A session that
        fails at that is closed, with the guest."""
        guest.debugger = None
        try:
            session.delete_breakpoints()
            session.detach()
        except SyscallIrlError:
            # A broken session must not leave the guest stopped for the next test.
            self._discard(session)
            guest.shutdown()

    @property
    def started(self) -> bool:
        """True while the worker's GDB runs (started, not yet closed)."""
        return self._session is not None

    def close(self) -> None:
        """Stop the worker's GDB; idempotent (a later `session` starts another)."""
        if self._session is not None:
            self._discard(self._session)

    def _discard(self, session: GdbSession) -> None:
        if self._session is session:
            self._session = None
        session.close()

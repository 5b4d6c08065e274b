"""The baseline: a second kernel that a test compares the kernel under test with
(`--syscall-irl-baseline`). A worker has one, with a shared guest and a GDB of its own, apart
from the kernel under test's: a trace on one kernel never stops, steps or breaks into the
other's guest. No pytest here: the plugin's `baseline` fixture is a few lines over this module.

    baseline = Baseline(Lab(settings, logs / "baseline"), worker="gw0", architecture=X86_64)
    use = baseline.use(PLAIN)        # what one test holds: nothing starts yet
    use.guest.run("uname -r")        # the worker's baseline guest, booted on first need
    use.gdb.registers(["rip"])       # the baseline's GDB, attached to that guest
    use.finish()                     # GDB detached, the guest settled for the next test
    baseline.close()                 # guest and GDB stopped; a later use starts them again

The bound, per worker: at most BASELINE_SHARED_GUESTS shared baseline guest and one baseline
GDB, beside the kernel under test's MAX_SHARED_GUESTS shared guests and one GDB. The plugin
closes the baseline as soon as the worker's next test does not use it, so a worker holds its
processes only while it runs tests that compare.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from ..core.errors import FailureClass, SyscallIrlError, causes, classify
from .debugger import WorkerDebugger
from .pool import SharedGuests
from .variant import PLAIN, GuestVariant

if TYPE_CHECKING:
    from ..arch.base import Architecture
    from ..kernel.artifacts import Kernel
    from ..machine.gdbmi import GdbSession
    from .guest import Guest, Lab

# A comparison needs one baseline guest at a time; a test of another variant (boot arguments,
# CPU model) replaces it (a restore, ~0.3 s) rather than keeping ~150 MB more of QEMU alive.
BASELINE_SHARED_GUESTS = 1
BLAME = "the baseline kernel (not the kernel under test):"


class Witness(Protocol):
    """Who records what a test was handed, for its failure report (the plugin's `Evidence`)."""

    def add_guest(self, guest: Guest, *, under_test: bool = True) -> None: ...

    def add_gdb(self, session: GdbSession) -> None: ...


class Baseline:
    """A worker's baseline kernel: its lab, its shared guest and its GDB, each started on
    first need. Guests are named `baseline-gw0-1` and log under the lab's log root, the GDB/MI
    transcript is `<log_root>/gdb-gw0.mi.log`: apart from the kernel under test's."""

    def __init__(self, lab: Lab, worker: str, architecture: Architecture) -> None:
        self.lab = lab
        self.architecture = architecture  # of the baseline kernel, chosen by the faces (arch.registry)
        self.guests: SharedGuests[Guest] = SharedGuests(lab, worker, keep=BASELINE_SHARED_GUESTS,
                                                        prefix="baseline")
        self.debugger = WorkerDebugger(lab, worker, register_file=self.architecture.register_file)

    @property
    def kernel(self) -> Kernel:
        return self.lab.kernel

    def use(self, variant: GuestVariant = PLAIN, witness: Witness | None = None) -> BaselineUse:
        """What one test holds of the baseline: its guest is of *variant*, as the test's own is."""
        return BaselineUse(self, variant, witness)

    @property
    def processes(self) -> tuple[int, int]:
        """(shared guests, GDBs) of the baseline running now: (0, 0) once closed."""
        return self.guests.running, int(self.debugger.started)

    def close(self) -> None:
        """Stop the baseline's GDB and guests; idempotent, and a later `use` starts them again."""
        self.debugger.close()
        self.guests.close()


class BaselineUse:
    """The baseline as one test sees it: `kernel`, and `guest` and `gdb`, each started when
    the test first asks (a test that only reads `kernel` starts nothing). The guest is shared
    by the worker's tests, like the `guest` fixture's; `finish` hands it back."""

    def __init__(self, baseline: Baseline, variant: GuestVariant, witness: Witness | None) -> None:
        self.baseline = baseline
        self.variant = variant
        self._witness = witness
        self._guest: Guest | None = None
        self._gdb: GdbSession | None = None
        self._mark = 0

    @property
    def kernel(self) -> Kernel:
        """The baseline kernel: its bzImage, vmlinux and release."""
        return self.baseline.kernel

    @property
    def architecture(self) -> Architecture:
        """The description of the baseline kernel's architecture (by its vmlinux's ELF machine)."""
        return self.baseline.architecture

    @property
    def guest(self) -> Guest:
        """The worker's running baseline guest of this test's variant."""
        if self._guest is None:
            with blaming_the_baseline():
                self._guest = self.baseline.guests[self.variant].get()
            self._mark = self._guest.warnings_mark()  # what the boot printed is the boot's
            if self._witness is not None:
                self._witness.add_guest(self._guest, under_test=False)
        return self._guest

    @property
    def gdb(self) -> GdbSession:
        """The baseline's GDB attached to `guest`, which it holds stopped (`guest.run` lets it
        run for a command); after the test its breakpoints are deleted and the guest runs on."""
        if self._gdb is None:
            debugger = self.baseline.debugger
            session = debugger.session()  # first: GDB loads the symbols while the guest gets ready
            guest = self.guest
            if self._witness is not None:
                self._witness.add_gdb(session)  # shown even if attaching fails
            self._gdb = debugger.attach(guest)
        return self._gdb

    def finish(self, *, interrupted: bool = False) -> None:
        """After the test: GDB released, then the guest settled for the next test (a command left
        running is read to its end, a guest that cannot go on is replaced). A kernel WARNING the
        baseline printed meanwhile raises KernelWarning, as the kernel under test's does, but as
        a harness failure (see `blaming_the_baseline`). After Ctrl-C (*interrupted*) nothing
        waits: the baseline's guest and GDB are stopped."""
        guest, session, self._guest, self._gdb = self._guest, self._gdb, None, None
        if guest is None:
            return
        if session is not None:
            self.baseline.debugger.release(session, guest)
        if interrupted:
            self.baseline.close()
            return
        self.baseline.guests[self.variant].settle()
        with blaming_the_baseline():
            guest.check_no_new_warnings(self._mark)


@contextmanager
def blaming_the_baseline() -> Iterator[None]:
    """Whatever goes wrong on the baseline kernel (it does not boot, panics, warns, a command
    fails there) is reported whole, with its type and chain, but blames no kernel under test:
    a bisect of the kernel under test must not count it against a commit. Every error of ours
    in the chain that blames a kernel is re-classed harness (classify reads the instance's
    class), and the message says it was the baseline; any other error that would blame it (an
    AssertionError inside the tracer) is wrapped in a harness error."""
    try:
        yield
    except Exception as exc:
        if not classify(exc).kernel_at_fault:
            raise
        for cause in causes(exc):
            if isinstance(cause, SyscallIrlError) and cause.failure_class.kernel_at_fault:
                cause.failure_class = FailureClass.HARNESS
        if not isinstance(exc, SyscallIrlError):
            raise SyscallIrlError(f"{BLAME} {type(exc).__name__}: {exc}") from exc
        exc.message = f"{BLAME} {exc.message}"
        exc.args = (exc.message, *exc.args[1:])
        raise

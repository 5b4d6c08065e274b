"""Try to break the plugin the ways a user (or a CI runner) does, on the real QEMU, GDB
and reference kernel, and print one line per case: outcome, time to exit, leftovers.

    .venv/bin/python tests/reliability.py            # every case; exit 1 if one is not OK
    .venv/bin/python tests/reliability.py ctrl-c     # the cases whose name contains "ctrl-c"

Each case runs pytest in a process group of its own (a signal to the group is what a
terminal's Ctrl-C does), with its own TMPDIR, so that leftovers are its own: processes
(found by an environment marker every child inherits), socket directories (sirl-*),
and TCP listeners (checked while the guests run, and after). tests/test_reliability.py
runs it in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytest_syscall_irl.kernel.build import cache_dir, reference_kernel
from pytest_syscall_irl.machine.qemu import sweep_socket_dirs

MARKER = "SIRL_RELIABILITY_CASE"
USAGE_ERROR, INTERRUPTED, FAILED, PASSED = 4, 2, 1, 0

# Tests the cases run. STARTED: a file each test touches once its guest runs a command
# that will not end soon (the moment to break the run).
GUEST_SLEEPS = """
import os, time
from pathlib import Path

def test_a(guest):
    guest.console.start("sleep 60")
    Path(os.environ["STARTED"], "a").touch()
    time.sleep(60)

def test_b(guest):
    guest.console.start("sleep 60")
    Path(os.environ["STARTED"], "b").touch()
    time.sleep(60)
"""
WORKER_CRASH = """
import os
from pathlib import Path

def test_crash(guest):
    guest.console.start("sleep 60")
    Path(os.environ["STARTED"], "crash").touch()
    os._exit(1)

def test_fine(guest):
    assert guest.run("echo ok").output == "ok\\n"
"""
GUEST_TIMES_OUT = """
def test_slow(guest):
    guest.run("sleep 60", timeout=120)
"""
GUEST_AND_GDB = """
def test_guest(guest, gdb):
    assert gdb.registers()["rip"] > 0
    assert guest.run("echo ok").output == "ok\\n"
"""
# Twenty tests of a kernel that panics at boot: the first boot's panic is remembered and the
# others fail at once with it (failure class: crash), instead of twenty boots.
BOOT_PANICS = "".join(f"""
def test_{n}(guest):
    guest.run("true")
""" for n in range(20))
# A harness failure in a test's body (GDB timing out; a counted command that is not there)
# is classed harness, not an invariant violated.
HARNESS_FAILS = """
def test_gdb_times_out(guest, gdb):
    gdb.resume()
    gdb.wait_for_stop(0.5)

def test_count_of_a_missing_command(syscall_trace):
    syscall_trace.count_syscalls("/nonexistent", nr="getpid")
"""
# What a program prints never counts as a kernel crash, whatever it looks like (the agent's
# own port, ttyS1); a kernel that crashes while a command waits does, with the kernel's log.
CRASH_LOOKALIKES = r"""
def test_lookalikes(guest):
    result = guest.run("echo 'Oops: 0000 [#1]'; echo 'BUG: expected 1 got 2'; printf '[    1.000000] hi\\r\\n'; "
                       "for i in 1 2 3 4 5 6 7 8 9; do echo SIRL{$i:E:0}; done; exit 5")
    assert result.status == 5 and result.output.count("\n") == 12 and "\r" in result.output
"""
PANIC_MID_COMMAND = """
def test_panic(fresh_guest, gdb):
    pending = fresh_guest.console.start("sleep 30")
    gdb.set_register("rdi", gdb.symbol_address("linux_banner"))
    gdb.set_register("rip", gdb.symbol_address("panic"))
    gdb.resume()
    pending.wait(30)
"""
# A boot argument the lab accepts that makes the reference kernel panic at boot: without
# the initramfs there is no /init, and no root device to mount.
PANIC_AT_BOOT = "--syscall-irl-boot-args=initcall_blacklist=populate_rootfs"


@dataclass
class Run:
    """What one pytest run did."""

    code: int | None
    seconds: float
    output: str
    tcp_while_running: list[str] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)  # socket dirs left after the exit


@dataclass
class Case:
    """One way of giving bad input or ending a run badly, and what must happen."""

    name: str
    args: list[str]
    expect: int | tuple[int, ...]
    says: str = ""  # a regex the output must contain
    test: str = "def test_k(kernel):\n    pass\n"
    ini: str = ""
    env: dict[str, str] = field(default_factory=dict)
    signal: int | None = None  # sent to the run's process group once every test started
    started: int = 0  # how many tests touch STARTED before the signal
    max_seconds: float = 30.0  # from start, or from the signal if there is one
    prepare: Callable[[Path], None] | None = None
    swept: bool = False  # socket directories may stay: the process could not run (swept by the next run)
    private_cache: bool = False
    never: str = ""  # a regex the output must not contain


def _env(case: Case, work: Path, cache: Path) -> dict[str, str]:
    env = {**os.environ, MARKER: f"{os.getpid()}-{case.name}", "TMPDIR": str(work / "t"),
           "STARTED": str(work / "started"), "SYSCALL_IRL_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return {**env, **case.env}


def _ours(marker: str) -> list[int]:
    """Processes whose environment carries *marker* (pytest, its workers, QEMU, GDB)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def _tcp_listeners(pids: list[int]) -> list[str]:
    listening, found = _listening_inodes(), []
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in listening:
                    found.append(f"pid {pid}")
        except OSError:
            continue
    return found


def _run(case: Case, work: Path, cache: Path) -> Run:
    env = _env(case, work, cache)
    (work / "started").mkdir()
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-q", *case.args]
    start = time.monotonic()
    with open(work / "output.txt", "w") as out:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        tcp: list[str] = []
        try:
            if case.signal is not None:
                while len(list((work / "started").iterdir())) < case.started and proc.poll() is None:
                    if time.monotonic() - start > 120:
                        raise TimeoutError("the tests did not start within 120 s")
                    time.sleep(0.05)
                time.sleep(0.3)  # let the guest take the command
                tcp = _tcp_listeners(_ours(env[MARKER]))
                os.killpg(proc.pid, case.signal)
                start = time.monotonic()
            else:
                while proc.poll() is None and time.monotonic() - start < 5:
                    time.sleep(0.05)
                tcp = _tcp_listeners(_ours(env[MARKER]))
            code = proc.wait(timeout=case.max_seconds + 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - start
    return Run(code, seconds, (work / "output.txt").read_text(errors="replace"), tcp)


def _leftovers(case: Case, work: Path, run: Run) -> list[str]:
    marker = _env(case, work, work)[MARKER]
    deadline = time.monotonic() + 3  # children killed by PR_SET_PDEATHSIG take a moment to go
    while _ours(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = [f"process {pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})" for pid in _ours(marker)]
    found += [f"TCP listener ({who})" for who in run.tcp_while_running + _tcp_listeners(_ours(marker))]
    if case.swept:  # what the process could not remove, the next run's sweep must
        sweep_socket_dirs(work / "t")
    found += [f"socket dir {d.name}" for d in sorted((work / "t").glob("sirl-*"))]
    return found


def run_case(case: Case, cache: Path) -> tuple[bool, str]:
    """Run *case*; (ok, the line to print)."""
    work = Path(tempfile.mkdtemp(prefix="sirl-rel-", dir="/tmp"))
    try:
        (work / "t").mkdir()
        own_cache = cache / "private" if case.private_cache else cache
        (work / "test_case.py").write_text(case.test)
        if case.ini:
            (work / "pytest.ini").write_text(f"[pytest]\n{case.ini}\n")
        if case.prepare is not None:
            case.prepare(own_cache)
        run = _run(case, work, own_cache)
        run.stale = sorted((work / "t").glob("sirl-*"))
        leftovers = _leftovers(case, work, run)
        expected = case.expect if isinstance(case.expect, tuple) else (case.expect,)
        problems = []
        if run.code not in expected:
            problems.append(f"exit {run.code}, expected {' or '.join(map(str, expected))}")
        if case.never and re.search(case.never, run.output):
            problems.append(f"output has {case.never!r}")
        if case.says and not re.search(case.says, run.output):
            problems.append(f"output lacks {case.says!r}")
        if run.seconds > case.max_seconds:
            problems.append(f"took more than {case.max_seconds:.0f} s")
        if "Traceback" in run.output and run.code == USAGE_ERROR:
            problems.append("traceback in a usage error")
        swept = f" ({len(run.stale)} socket dirs swept, as the next run does)" if run.stale else ""
        line = (f"{'OK ' if not problems and not leftovers else 'BAD'} {case.name:<28} exit {run.code} in "
                f"{run.seconds:5.1f} s; leftovers: {', '.join(leftovers) or 'none'}{swept}")
        if problems:
            line += "; " + "; ".join(problems) + "\n    " + "\n    ".join(run.output.splitlines()[-15:])
        return not problems and not leftovers, line
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _truncated_kernel(cache: Path) -> str:
    reference = reference_kernel()
    assert reference is not None
    target = cache / "truncated" / "bzImage"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(reference.read_bytes()[:100_000])
    return str(target)


def _damage(pattern: str, how: str) -> Callable[[Path], None]:
    def damage(cache: Path) -> None:
        found = sorted(cache.glob(pattern))
        assert found, f"nothing matches {pattern} in {cache}"
        for path in found:
            if how == "truncate":
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            else:  # a state QEMU cannot load, with a manifest that matches it
                path.write_bytes(b"QEVM" + b"\0" * 4096)
                manifest = path.parent / "MANIFEST.json"
                from pytest_syscall_irl.core.integrity import seal_directory

                if manifest.exists():
                    seal_directory(path.parent)

    return damage


def cases(cache: Path) -> list[Case]:
    """The matrix."""
    kernel = reference_kernel()
    assert kernel is not None, "build the reference kernel first: syscall-irl kernel build"
    vmlinux = str(kernel.parent / "vmlinux")
    explicit = [f"--kernel={kernel}"]
    trunc = _truncated_kernel(cache)
    text = cache / "notes.txt"
    text.write_text("not a kernel\n")
    private = [f"--kernel={kernel}"]
    return [
        Case("truncated bzImage", [f"--kernel={trunc}", f"--syscall-irl-vmlinux={vmlinux}"], USAGE_ERROR,
             r"is truncated"),
        Case("text file as bzImage", [f"--kernel={text}"], USAGE_ERROR, r"not an x86 bzImage"),
        Case("qemu=/bin/false", [*explicit, "--syscall-irl-qemu=/bin/false"], USAGE_ERROR,
             r"not a QEMU system emulator"),
        Case("qemu=/bin/false -n 2", [*explicit, "--syscall-irl-qemu=/bin/false", "-n", "2"], USAGE_ERROR,
             r"not a QEMU system emulator"),
        Case("gdb=/bin/false", [*explicit, "--syscall-irl-gdb=/bin/false"], USAGE_ERROR,
             r"not a GDB that speaks MI"),
        Case("qemu=qemu-system-i386", [*explicit, "--syscall-irl-qemu=qemu-system-i386"], USAGE_ERROR,
             r"emulates i386|not found"),
        Case("accel=kvm", [*explicit, "--syscall-irl-accel=kvm"], (USAGE_ERROR, PASSED),
             r"KVM does not work|passed"),
        Case("unbalanced quote", [*explicit, '--syscall-irl-boot-args=foo="bar quiet'], USAGE_ERROR,
             r"unbalanced double quote"),
        Case("boot-args=kaslr", [*explicit, "--syscall-irl-boot-args=kaslr"], USAGE_ERROR, r"kaslr"),
        Case("ini: bad accel", explicit, USAGE_ERROR, r"syscall_irl_accel = fast in .*pytest.ini",
             ini="syscall_irl_accel = fast"),
        Case("ini: missing kernel", [], USAGE_ERROR, r"syscall_irl_kernel = nope/bzImage in .*pytest.ini",
             ini="syscall_irl_kernel = nope/bzImage"),
        Case("cache not writable", explicit, USAGE_ERROR, r"cannot write to the cache directory",
             env={"SYSCALL_IRL_CACHE": "/dev/null/cache"}),
        # Waiting on the interrupted command would take SETTLE_TIMEOUT (10 s); what remains is
        # xdist's (its workers took 1.9-2.9 s to get the KeyboardInterrupt at load 8-13 here,
        # their teardown 25 ms).
        Case("Ctrl-C -n 2", ["-n", "2"], INTERRUPTED, test=GUEST_SLEEPS, signal=signal.SIGINT, started=2,
             max_seconds=9),
        Case("Ctrl-C", [], INTERRUPTED, test=GUEST_SLEEPS, signal=signal.SIGINT, started=1, max_seconds=5),
        Case("SIGTERM -n 2", ["-n", "2"], (-signal.SIGTERM, INTERRUPTED), test=GUEST_SLEEPS,
             signal=signal.SIGTERM, started=2, max_seconds=5),
        Case("SIGKILL -n 2", ["-n", "2"], (-signal.SIGKILL,), test=GUEST_SLEEPS, signal=signal.SIGKILL,
             started=2, max_seconds=5, swept=True),
        Case("worker crash -n 2", ["-n", "2"], FAILED, r"crashed|worker .* crashed", test=WORKER_CRASH,
             max_seconds=90, swept=True),
        Case("pytest-timeout signal", ["--timeout=5"], FAILED, r"Timeout", test=GUEST_TIMES_OUT, max_seconds=40),
        Case("kernel panics at boot -n 2", [*explicit, PANIC_AT_BOOT, "-n", "2"], FAILED,
             r"(?s)not booted again.*crash \(setup\).*20 errors", test=BOOT_PANICS, max_seconds=60),
        Case("harness failures in a test", explicit, FAILED,
             r"(?s)(harness \(call\).*){2}.*2 failed", test=HARNESS_FAILS, max_seconds=60),
        Case("pytest-timeout thread", ["--timeout=5", "--timeout-method=thread"], (FAILED,), r"Timeout",
             test=GUEST_TIMES_OUT, max_seconds=40, swept=True),
        Case("fresh cache, two runs race", [*private, "-n", "2"], PASSED, r"passed", test=GUEST_AND_GDB,
             max_seconds=240, private_cache=True),
        Case("damaged snapshot", private, PASSED, r"damaged.*building it again", test=GUEST_AND_GDB,
             private_cache=True, prepare=_damage("snapshots/*/state", "truncate"), max_seconds=120),
        Case("unloadable snapshot", private, PASSED, r"QEMU could not load the guest snapshot", test=GUEST_AND_GDB,
             private_cache=True, prepare=_damage("snapshots/*/state", "garbage"), max_seconds=120),
        Case("damaged guest image", private, PASSED, r"images/\w+ is damaged", test=GUEST_AND_GDB,
             private_cache=True, prepare=_damage("images/*/initramfs.cpio.gz", "truncate"), max_seconds=120),
        Case("damaged GDB index", private, PASSED, r"GDB index .* is damaged", test=GUEST_AND_GDB,
             private_cache=True, prepare=_damage("gdb-index-cache/*.gdb-index", "truncate"), max_seconds=120),
        Case("output that looks like a kernel crash", explicit, PASSED, r"1 passed", test=CRASH_LOOKALIKES,
             never=r"GuestPanic|crashed", max_seconds=60),
        Case("kernel panics while a command runs", explicit, FAILED, r"(?s)GuestPanic.*Kernel panic - not syncing",
             test=PANIC_MID_COMMAND, max_seconds=60),
        *verdict_cases(cache, explicit),
    ]


def _script(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _zeroed_kernel(cache: Path) -> str:
    """The reference bzImage with its setup header intact and the rest zeroed (the CRC too)."""
    reference = reference_kernel()
    assert reference is not None
    data = bytearray(reference.read_bytes())
    data[0x10200:] = bytes(len(data) - 0x10200)
    target = cache / "zeroed" / "bzImage"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))
    return str(target)


def _payloads(cache: Path, name: str, files: dict[str, str | bytes]) -> str:
    directory = cache / "payloads" / name
    directory.mkdir(parents=True, exist_ok=True)
    for file, content in files.items():
        (directory / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return f"--syscall-irl-payloads={directory}"


def _dynamic_elf(cache: Path) -> bytes:
    source = cache / "dynamic.c"
    source.write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-o", str(cache / "dynamic"), str(source)], check=True)
    return (cache / "dynamic").read_bytes()


def _restored_by_tar(cache: Path) -> None:
    """A private cache holding a copy of the reference kernel, its record as this version
    makes it, then every mtime cut to whole seconds, as tar, zip and `cp -r` leave them."""
    from pytest_syscall_irl.kernel.build import ARTIFACTS, KernelBuild

    shared, private = KernelBuild(), KernelBuild(cache=cache)
    private.directory.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        shutil.copyfile(shared.directory / name, private.directory / name)
    private.entry.seal(shared.entry.meta())
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (int(path.stat().st_atime), int(path.stat().st_mtime)))


def _small_tmpfs(cache: Path) -> Path | str:
    """An 8 MB tmpfs under *cache*, unmounted at exit; or why there is none (not root)."""
    import atexit

    mount = cache / "full-disk"
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        return done.stderr.strip() or f"mount exit {done.returncode}"

    def unmount() -> None:  # after main's clean-up, which cannot remove a mount point
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(cache, ignore_errors=True)

    atexit.register(unmount)
    return mount


def verdict_cases(cache: Path, explicit: list[str]) -> list[Case]:
    """Bad artifacts refused early, and nothing outliving the run (issue 18)."""
    kernel = reference_kernel()
    assert kernel is not None
    vmlinux = f"--syscall-irl-vmlinux={kernel.parent / 'vmlinux'}"
    qemu = shutil.which("qemu-system-x86_64")
    wrapper = _script(cache / "wrappers" / "qemu-no-exec", f'#!/bin/sh\n{qemu} "$@"\necho done\n')
    hung = _script(cache / "wrappers" / "qemu-hangs", "#!/bin/sh\nsleep 300\n")
    c_file = "int main(void) { return 0; }\n"
    cases = [
        Case("qemu wrapper, SIGKILL", [*explicit, f"--syscall-irl-qemu={wrapper}"], (-signal.SIGKILL,),
             test=GUEST_SLEEPS, signal=signal.SIGKILL, started=1, max_seconds=5, swept=True),
        Case("qemu wrapper hangs", [*explicit, f"--syscall-irl-qemu={hung}"], USAGE_ERROR,
             r"did not finish within 20 s", max_seconds=30),
        Case("zeroed bzImage body", [f"--kernel={_zeroed_kernel(cache)}", vmlinux], USAGE_ERROR,
             r"is damaged: its contents do not match the CRC-32"),
        Case("modules missing", [*explicit, "--syscall-irl-modules=/nonexistent/modules"], USAGE_ERROR,
             r"module directory /nonexistent/modules does not exist"),
        Case("payload: dynamic ELF", [*explicit, _payloads(cache, "dynamic", {"dyn": _dynamic_elf(cache)})],
             USAGE_ERROR, r"payloads/dynamic/dyn is dynamically linked \(needs /lib"),
        Case("payload: not ELF", [*explicit, _payloads(cache, "text", {"script": "#!/bin/sh\n"})], USAGE_ERROR,
             r"payloads/text/script is not an ELF file"),
        Case("payload: duplicate", [*explicit, _payloads(cache, "one", {"same.c": c_file}),
                                    _payloads(cache, "two", {"same.c": c_file})], USAGE_ERROR,
             r"two guest programs named 'same'"),
        Case("payload: compile error", [*explicit, _payloads(cache, "broken", {"broken.c": "int main(void) { x }"})],
             USAGE_ERROR, r"(?s)cannot compile guest program .*broken\.c.*error", max_seconds=60),
        Case("comma in the cache path", explicit, PASSED, r"passed", test=GUEST_AND_GDB, max_seconds=240,
             env={"SYSCALL_IRL_CACHE": str(cache / "with,comma")}),
        Case("cache restored by tar", [], PASSED, r"passed", test=GUEST_AND_GDB, private_cache=True,
             prepare=_restored_by_tar, never=r"damaged|building it again", max_seconds=240),
    ]
    disk = _small_tmpfs(cache)
    if isinstance(disk, Path):
        cases.append(Case("full disk", explicit, USAGE_ERROR,
                          rf"the cache directory {disk} has too little room \(\d+ MB free of 8 MB",
                          env={"SYSCALL_IRL_CACHE": str(disk)}))
    else:
        print(f"SKIP full disk: cannot mount a tmpfs ({disk})", flush=True)
    return cases


def _race(case: Case, cache: Path) -> tuple[bool, str]:
    """Two runs at once on one fresh cache: both pass, having built what they need once."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_case(case, cache), range(2)))
    builds = len(list((cache / "private" / "snapshots").glob("*/MANIFEST.json")))
    ok = all(r[0] for r in results) and builds == 1
    return ok, "\n".join(line for _, line in results) + f"\n    snapshots built: {builds}"


def main(argv: list[str]) -> int:
    cache = Path(tempfile.mkdtemp(prefix="sirl-rel-cache-", dir="/tmp"))
    os.environ.setdefault("SYSCALL_IRL_CACHE", str(cache_dir()))
    shared = Path(os.environ["SYSCALL_IRL_CACHE"])
    all_ok = True
    try:
        for case in cases(cache):
            if argv and not any(word in case.name for word in argv):
                continue
            if case.private_cache:
                ok, line = _race(case, cache) if "race" in case.name else run_case(case, cache)
            else:
                ok, line = run_case(case, shared)
            all_ok &= ok
            print(line, flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({"all_ok": all_ok}))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

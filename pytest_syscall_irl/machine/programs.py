"""Is the program given as QEMU really an x86_64 system emulator, and the one given as
GDB a GDB that speaks MI 3 and knows x86_64? Checked once, before any guest boots.

Each check asks the program itself (QEMU over QMP on stdio, GDB over MI on stdin),
~0.1 s and ~0.3 s; a verdict is kept per binary identity (path, size, mtime) in
memory and in the cache directory, so later processes and runs pay nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..core import procs
from ..core.cache import CacheEntry
from ..core.errors import ConfigError

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 20.0
QMP_SESSION = '{"execute":"qmp_capabilities"}\n{"execute":"query-target"}\n{"execute":"quit"}\n'
MI_SESSION = '-gdb-version\n-interpreter-exec console "set architecture i386:x86-64"\n-gdb-exit\n'

_verdicts: dict[tuple[str, int, int], str] = {}


def _run(command: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    # procs.run, not subprocess.run: a hung wrapper script is killed with whatever it
    # started (its whole group), and nothing it started outlives a killed pytest.
    try:
        return procs.run(command, stdin, CHECK_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"`{' '.join(command)}` did not finish within {CHECK_TIMEOUT:.0f} s") from exc
    except OSError as exc:
        raise ConfigError(f"cannot run {command[0]}: {exc.strerror or exc}") from exc


def _qemu_verdict(qemu: str) -> str:
    """QEMU's version; ConfigError unless it is a system emulator whose target is x86_64."""
    command = [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"]
    fix = "pass --syscall-irl-qemu=PATH of qemu-system-x86_64 (apt-get install qemu-system-x86)"
    done = _run(command, QMP_SESSION)
    replies = []
    for line in done.stdout.splitlines():
        try:
            replies.append(json.loads(line))
        except ValueError:
            continue
    greeting = next((r["QMP"] for r in replies if isinstance(r, dict) and "QMP" in r), None)
    target = next((r["return"] for r in replies if isinstance(r, dict) and "arch" in r.get("return", ())), None)
    if greeting is None or target is None:
        said = (done.stderr or done.stdout).strip().splitlines()[:1] or [f"nothing, exit code {done.returncode}"]
        raise ConfigError(f"{qemu} is not a QEMU system emulator (asked over QMP for its target, it said: "
                          f"{said[0]}): {fix}")
    if target["arch"] != "x86_64":
        raise ConfigError(f"{qemu} emulates {target['arch']}, not x86_64: {fix}")
    version = greeting.get("version", {}).get("qemu", {})
    return "QEMU emulator version {major}.{minor}.{micro}".format(**version) if version else "QEMU"


def _gdb_verdict(gdb: str) -> str:
    """GDB's version line; ConfigError unless it speaks MI 3 and can debug x86_64."""
    done = _run([gdb, "--nx", "--quiet", "--interpreter=mi3"], MI_SESSION)
    fix = "pass --syscall-irl-gdb=PATH of GDB 9 or later built for x86_64 (apt-get install gdb)"
    lines = done.stdout.splitlines()
    version = next((json.loads(line[1:]).strip() for line in lines if line.startswith('~"GNU gdb')), None)
    if version is None or "^done" not in lines[1:]:
        said = (done.stderr or done.stdout).strip().splitlines()[:1] or [f"nothing, exit code {done.returncode}"]
        raise ConfigError(f"{gdb} is not a GDB that speaks MI 3 (asked for -gdb-version, it said: {said[0]}): "
                          f"{fix}")
    if lines.count("^done") < 2:
        raise ConfigError(f"{gdb} ({version.splitlines()[0]}) cannot debug x86_64 (set architecture "
                          f"i386:x86-64 failed): {fix}")
    return str(version.splitlines()[0])


def _checked(program: str, what: str, verdict: Callable[[str], str], cache: Path | None) -> str:
    real = os.path.realpath(program)
    st = os.stat(real)
    stamp = (real, st.st_size, st.st_mtime_ns)
    if stamp in _verdicts:
        return _verdicts[stamp]
    if cache is None:
        _verdicts[stamp] = verdict(program)
        return _verdicts[stamp]
    # One record per binary and check: a program given as QEMU and as GDB is asked both.
    name = hashlib.sha256(repr((stamp, what)).encode()).hexdigest()[:16] + ".json"
    identity = {"what": what, "identity": list(stamp)}

    def saved(record: Path) -> str | None:
        try:
            data = json.loads(record.read_text())
            return str(data["version"]) if {k: data[k] for k in identity} == identity else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ask(staging: Path) -> None:
        staging.write_text(json.dumps({**identity, "version": verdict(program)}))

    entry = CacheEntry.file(cache / "checked-programs" / name, f"verdict on {real}",
                            lambda record: None if saved(record) is not None else "it does not parse", ConfigError)
    entry.ensure(ask)
    _verdicts[stamp] = str(saved(entry.path))
    return _verdicts[stamp]


def _find(program: str, option: str, package: str) -> str:
    found = shutil.which(program)
    if found is not None:
        return found
    if os.path.exists(program) and not os.path.isdir(program):
        raise ConfigError(f"{option} {program!r} is not executable: chmod +x it, or pass {option}=PATH of "
                          f"another one")
    raise ConfigError(f"{option.lstrip('-')} executable {program!r} not found: install it with "
                      f"`apt-get install {package}` or pass {option}=PATH")


def check_qemu(program: str, cache: Path | None = None) -> tuple[str, str]:
    """(path, version) of *program* found on PATH and proven a QEMU x86_64 system emulator."""
    path = _find(program, "--syscall-irl-qemu", "qemu-system-x86")
    return path, _checked(path, "qemu-x86_64", _qemu_verdict, cache)


def check_gdb(program: str, cache: Path | None = None) -> tuple[str, str]:
    """(path, version) of *program* found on PATH and proven a GDB with MI 3 and x86_64."""
    path = _find(program, "--syscall-irl-gdb", "gdb")
    return path, _checked(path, "gdb-mi3-x86_64", _gdb_verdict, cache)

"""`syscall-irl diff BASE PATCHED`: the same traces on two kernels, and what differs.

    syscall-irl diff ref/bzImage patched/bzImage --json diff.json --html diff.html

The face: the request checked before anything boots, then each kernel's side taken by
trace/survey.py (one GDB, one guest per CPU model from the snapshot cache, one trace per road
of the architecture's survey, the facts the suite reads), compared and rendered by
report/diff.py. What to trace and read, and which values are per boot, is the architecture's
(arch/x86_64/survey.py). With --suite, pytest runs the shipped suite on each kernel and the
tests whose outcome changed count too.

Exit status: 0 nothing differs but build-specific addresses; 1 the path or a result changed
(or the work failed: the message says which); 2 the command was asked wrongly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from ..arch.registry import architecture_for
from ..core.errors import ConfigError
from ..kernel.artifacts import Kernel
from ..lab.settings import LabSettings
from ..report import diff
from ..trace.survey import SideTaker


# --- the request, checked before anything boots -------------------------------------------


@contextmanager
def _our_spelling() -> Iterator[None]:
    """The lab names the kernels' options as pytest spells them; here they are BASE PATCHED,
    --vmlinux and --modules."""
    try:
        yield
    except ConfigError as exc:
        message = re.sub(r"--syscall-irl-(vmlinux|modules)\b", r"--\1", exc.message)
        message = message.replace("--syscall-irl-kernel", "kernel (BASE, PATCHED)")
        message = re.sub(r"--kernel\b", "each of BASE and PATCHED", message)
        raise ConfigError(message, command=exc.command, exit_code=exc.exit_code, log_tail=exc.log_tail) from exc


def resolve(args: argparse.Namespace) -> list[LabSettings]:
    """The two kernels' lab settings (ConfigError for anything wrong, before any boot)."""
    from ..kernel.build import cache_dir, check_cache_dir
    from ..kernel.modules import guest_modules
    from ..lab.accel import check_accel
    from ..lab.settings import check_boot_args, pair_by_position
    from ..machine.programs import check_gdb, check_qemu
    # The plugin's option table (it imports no pytest, but its package does: only `diff` pays for that).
    from ..plugin.options import read_options
    cwd = Path.cwd()
    options = read_options(cli={"kernel": [args.base, args.patched], "vmlinux": args.vmlinux or None,
                                "modules": args.modules or None}, env=os.environ, ini={}, ini_file=None,
                           cwd=cwd, rootdir=cwd)
    with _our_spelling():
        vmlinuxes = pair_by_position("vmlinux", options.paths("vmlinux"), 2)
        module_dirs = pair_by_position("modules", options.paths("modules"), 2)
        kernels = [Kernel.load(path, vmlinux) for path, vmlinux in zip(options.paths("kernel"), vmlinuxes)]
    for kernel in kernels:
        architecture_for(kernel.vmlinux.machine, f"the kernel {kernel.bzimage.path}")
    try:
        check_boot_args(args.boot_args)
    except ConfigError as exc:
        raise ConfigError(f"--boot-args: {exc.message}") from None
    for path in (args.json, args.html):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"{path}: its directory does not exist: create it, or name a file in an existing one")
    cache = check_cache_dir(cache_dir())
    qemu = check_qemu(options.value("qemu") or "qemu-system-x86_64", cache)[0]
    gdb = check_gdb(options.value("gdb") or "gdb", cache)[0]
    settings = [LabSettings(kernel=kernel, qemu=qemu, gdb=gdb, accel=options.value("accel") or "auto",
                            boot_args=args.boot_args, cache=cache, modules=guest_modules(kernel.release, directory),
                            snapshots=options.snapshots)  # $SYSCALL_IRL_SNAPSHOTS=0: cold boots, as in pytest
                for kernel, directory in zip(kernels, module_dirs)]
    for one in settings:
        check_accel(one)
    return settings


# --- the command -----------------------------------------------------------------------------


def run_diff(args: argparse.Namespace) -> int:
    """`syscall-irl diff`: both sides, the comparison, the report; the exit status."""
    settings = resolve(args)
    say: Callable[[str], None] = ((lambda message: None) if args.quiet
                                  else (lambda message: print(f"==> {message}", file=sys.stderr, flush=True)))
    work = Path(tempfile.mkdtemp(prefix="syscall-irl-diff-"))
    try:
        takers = [SideTaker(one, architecture_for(one.kernel.vmlinux.machine), work / name,
                            diff.side_identity(one.kernel), say)
                  for one, name in zip(settings, ("base", "patched"))]
        # Both sides at once: each is a QEMU and a GDB of its own (one TCG thread each), so two
        # cores take the two kernels in the time of one.
        with ThreadPoolExecutor(max_workers=len(takers), thread_name_prefix="diff-side") as pool:
            sides = [future.result() for future in [pool.submit(taker.take) for taker in takers]]
        if args.suite:
            extra = shlex.split(args.suite_args or "")
            for index, (side, one) in enumerate(zip(sides, settings)):
                modules = args.modules[min(index, len(args.modules) - 1)] if args.modules else None
                side.suite = diff.suite_outcomes(one.kernel, modules, extra, work, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = diff.compare(*sides)
    print(diff.render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(diff.render_json(report), indent=2) + "\n")
    if args.html:
        Path(args.html).write_text(diff.render_html(report))
    return report.status


def add_diff_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `diff BASE PATCHED`."""
    parser = subparsers.add_parser(
        "diff", help="trace every syscall road on two kernels and report what differs: exit 0 nothing but "
        "build-specific addresses, 1 the path or a result changed, 2 a usage error")
    parser.add_argument("base", metavar="BASE", help="the kernel to compare against (a bzImage)")
    parser.add_argument("patched", metavar="PATCHED", help="the kernel under review (a bzImage)")
    parser.add_argument("--vmlinux", action="append", metavar="PATH",
                        help="vmlinux of BASE, then of PATCHED (default: beside each bzImage or its build tree)")
    parser.add_argument("--modules", action="append", metavar="DIR",
                        help="module directory (or 'none') of BASE, then of PATCHED; once for both "
                             "(default: /lib/modules/<release> if it exists)")
    parser.add_argument("--boot-args", default="", metavar="ARGS", help="extra kernel arguments for both kernels")
    parser.add_argument("--suite", action="store_true",
                        help="also run the shipped suite on both kernels and list the tests whose outcome changed")
    parser.add_argument("--suite-args", metavar="ARGS",
                        help="more pytest arguments for --suite, e.g. \"-k lstar -n 2\"")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON (docs/diff.md)")
    parser.add_argument("--html", metavar="FILE", help="write the report as HTML, the kernels side by side")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the report")
    parser.set_defaults(func=run_diff)

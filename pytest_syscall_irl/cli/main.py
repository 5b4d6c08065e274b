"""The `syscall-irl` command: `kernel build|path|check|fetch|mutant`, `suite-path`, `bisect-run`, `failed-logs`.

Each command group registers itself with a function that takes argparse's subparsers
(see add_kernel_commands); add a group by appending its function to COMMAND_GROUPS.
Progress goes to stderr and results to stdout, so `$(syscall-irl kernel path)` works.
Exit statuses (EPILOG): 2 for a request that cannot be right (argparse's own, and ConfigError),
1 for work that failed; each command's own meanings of 1 are in its help.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ..kernel import build as kernel_build
from ..core import shipped
from ..kernel.progress import BuildProgress, previous_steps
from ..core.errors import ConfigError, SyscallIrlError
from .bisect import ABORT as BISECT_ABORT, Verdict
from .diff import add_diff_commands

USAGE_STATUS = 2  # argparse's status for a bad command line; ours for any ConfigError too
FAILED_STATUS = 1
EPILOG = f"""exit status: 0 done; {FAILED_STATUS} the work failed (a build, a download, a check: the message says \
what); {USAGE_STATUS} the command was asked wrongly (an option, a path, a fragment: the message says the fix); \
130 interrupted. `kernel path` and `kernel check` also exit {FAILED_STATUS} for their answer "none" and "cannot run"; \
`bisect-run` has statuses of its own, for git bisect."""


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors exit with the status the command sets as its default
    `usage_status` (USAGE_STATUS if none): `bisect-run`'s must stop git bisect (128), which would
    read argparse's 2 as "bad" and blame the commit."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.get_default("usage_status") or USAGE_STATUS, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _progress_line(line: str) -> None:
    # On a terminal the line redraws itself; in a CI log each update is a line of its own.
    if sys.stderr.isatty():
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
    else:
        _progress(line)


def _build_output(args: argparse.Namespace) -> tuple[Callable[[str], None] | None, BuildProgress | None]:
    """Where make's output goes: nowhere (--quiet), through (--make-output), or a progress line."""
    if args.quiet:
        return None, None
    if args.make_output:
        return _progress, None
    progress = BuildProgress(_progress_line, interval=1.0 if sys.stderr.isatty() else 15.0)
    return progress.feed, progress


def _set_total(progress: BuildProgress | None, build: kernel_build.KernelBuild) -> None:
    """The progress line's total: the step count of the last build of the same fragment."""
    if progress is None:
        return
    try:
        progress.total = previous_steps(build.cache / "kernels", build.fragment_sha256)
    except SyscallIrlError:
        pass  # an unreadable fragment is reported by the build itself (bisect-run: as a skip)


def _fragment(text: str) -> Path:
    """A --config value: a file, else the fragment of that name shipped with the package.

    The README's recipes name them as in a checkout (`--config guest/fred.config`); an
    installed package has them in its own directory, so the bare name, or guest/NAME where
    no such file is, finds the shipped one (kernel.config, suite-needs.config, fred.config).
    """
    path = Path(text)
    if path.exists() or path.parent not in (Path("."), Path("guest")) or path.suffix != ".config":
        return path
    shipped_fragment = shipped.GUEST_DIR / path.name
    return shipped_fragment if shipped_fragment.is_file() else path


def _fragments(args: argparse.Namespace) -> list[Path] | None:
    # --config "" is the default fragment (handy in CI matrices).
    return [_fragment(text) for text in args.config or [] if text] or None


def _kernel_build(args: argparse.Namespace) -> int:
    if args.dry_run:
        plan = kernel_build.KernelBuild(args.tree, _fragments(args), debian=args.debian, base=args.base,
                                        ccache=args.ccache).plan()
        print("\n".join(["syscall-irl kernel build --dry-run: nothing is built", *plan]))
        return 0
    quiet = bool(args.quiet)
    on_output, progress = _build_output(args)
    build = kernel_build.KernelBuild(
        args.tree,
        _fragments(args),
        debian=args.debian,
        base=args.base,
        jobs=args.jobs,
        on_stage=None if quiet else (lambda message: _progress(f"==> {message}")),
        on_output=on_output,
        ccache=args.ccache,
    )
    _set_total(progress, build)
    try:
        print(build.build())
    finally:
        if progress is not None and progress.steps and sys.stderr.isatty():
            print(file=sys.stderr)  # end the progress line
    if not quiet and build.steps:  # a build ran (a cached one is only reused)
        _progress(f"==> full make output: {build.log_path}")
    return 0


def _source_flags(args: argparse.Namespace) -> list[str]:
    """The --debian/--base/--config flags the user gave, as they would type them again."""
    flags = [] if args.debian == kernel_build.REFERENCE_SOURCE else ["--debian", args.debian]
    flags += [] if args.base == "tinyconfig" else ["--base", args.base]
    for text in args.config or []:
        flags += ["--config", text] if text else []
    return flags


def _kernel_path(args: argparse.Namespace) -> int:
    build = kernel_build.KernelBuild(fragment=_fragments(args), debian=args.debian, base=args.base)
    if build.is_complete():
        print(build.bzimage)
        return 0
    flags = _source_flags(args)
    what = f"no build of {shlex.join(flags)}" if flags else "no reference kernel"
    command = shlex.join(["syscall-irl", "kernel", "build", *flags])
    print(f"syscall-irl: {what} in {kernel_build.cache_dir() / 'kernels'}: build it with `{command}`"
          + ("" if flags else " (about 3 minutes on 2 cores)"), file=sys.stderr)
    return FAILED_STATUS


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_argument(parser)
    parser.add_argument("--debian", metavar="VERSION", default=kernel_build.REFERENCE_SOURCE,
                        help="without --tree: build Debian's /usr/src/linux-source-VERSION.tar.xz "
                             f"(default: {kernel_build.REFERENCE_SOURCE}, the reference kernel)")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    """--config, read by _fragments()."""
    parser.add_argument("--config", metavar="FRAGMENT", action="append",
                        help="config fragment merged over tinyconfig; repeat to merge several in order, e.g. "
                             "--config guest/kernel.config --config guest/fred.config (default: guest/kernel.config); "
                             "a shipped fragment's name (kernel.config, fred.config, suite-needs.config, with or "
                             "without guest/) finds the package's own where no such file is")


def _add_ccache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ccache", action="store_true",
                        help=f"compile through ccache (make CC='{kernel_build.CCACHE_CC}'; its cache is $CCACHE_DIR): "
                             "a CI job whose checkout made every object stale to make rebuilds from ccache's cache; "
                             "the build's cache key stays the compiler's, as without")


def _kernel_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..kernel.artifacts import Kernel
    from ..kernel.check import check, lacking
    from ..kernel.modules import guest_modules

    kernel = Kernel.load(args.kernel, args.vmlinux)
    modules = guest_modules(kernel.release, Path(args.modules) if args.modules else None)
    findings = check(kernel, modules)
    print(f"kernel {kernel.release}: {kernel.bzimage.path} + {kernel.vmlinux.path}; modules: {modules}")
    for finding in findings:
        print(finding)
    missing = lacking(findings)
    print(f"{len(missing)} of {len(findings)} features lacking" + (": the suite cannot run on this kernel"
                                                                   if any(f.fatal for f in missing) else ""))
    return 1 if any(finding.fatal for finding in missing) else 0


def _kernel_fetch(args: argparse.Namespace) -> int:
    from ..kernel.debian import DebianKernel

    say = (lambda message: None) if args.quiet else (lambda message: _progress(f"==> {message}"))
    fetched = DebianKernel(args.package, kernel_build.check_cache_dir(kernel_build.cache_dir()),
                           on_stage=say).fetch()
    if args.print == "directory":
        print(fetched.directory)
    else:
        # Unquoted, for $(...): package names and versions hold no blanks or glob characters
        # (a cache path with blanks needs --print directory).
        print(" ".join(fetched.options()))
    return 0


def _add_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", metavar="tinyconfig|defconfig|FILE", default="tinyconfig",
                        help="the config the fragments merge over: `make tinyconfig` (default, with "
                             "guest/kernel.config), `make defconfig` or a saved .config such as the tree's own or "
                             "/boot/config-<release> (with guest/suite-needs.config: only what the suite needs); "
                             "the options the merge changed are printed")


def add_kernel_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kernel build` and `kernel path`."""
    group = subparsers.add_parser("kernel", help="build or locate the reference kernel")
    commands = group.add_subparsers(dest="kernel_command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build",
        help="build a kernel into the cache (tinyconfig + fragment); prints the bzImage path",
    )
    build.add_argument("--tree", metavar="DIR",
                       help="kernel source tree (default: Debian's linux-source tarball, see --debian)")
    _add_source_arguments(build)
    _add_base_argument(build)
    _add_ccache_argument(build)
    build.add_argument("--jobs", "-j", type=_positive_int, default=None, metavar="N",
                       help="parallel make jobs (default: the number of CPUs)")
    build.add_argument("--quiet", "-q", action="store_true",
                       help="print only the bzImage path, not the stages and the progress line")
    build.add_argument("--make-output", action="store_true",
                       help="show make's output instead of a progress line (it is in build.log either way)")
    build.add_argument("--dry-run", "-n", action="store_true",
                       help="build nothing: print the source, base and fragments it would build, the cache key "
                            "and whether the cache has it (exit 0 once the fragments and base are found)")
    build.set_defaults(func=_kernel_build)
    path = commands.add_parser("path", help="print the cached reference bzImage, or the build of the given "
                               "--debian/--config (exit 1 if none)")
    _add_source_arguments(path)
    _add_base_argument(path)
    path.set_defaults(func=_kernel_path)
    check = commands.add_parser("check", help="list what a kernel lacks for which tests (exit 1 if it cannot "
                                "run the suite at all)")
    check.add_argument("--kernel", required=True, metavar="BZIMAGE", help="the bzImage to check")
    check.add_argument("--vmlinux", metavar="PATH", help="its vmlinux (default: found beside it)")
    check.add_argument("--modules", metavar="DIR", help="its module directory, or 'none' "
                       "(default: /lib/modules/<release> if it exists)")
    check.set_defaults(func=_kernel_check)
    fetch = commands.add_parser(
        "fetch", help="download a Debian kernel image package and its -dbg vmlinux into the cache (nothing is "
        "installed); prints the pytest options that test it: pytest test_suites $(syscall-irl kernel fetch ...)")
    fetch.add_argument("package", metavar="PACKAGE",
                       help="a Debian kernel image package or meta-package, e.g. linux-image-cloud-amd64 or "
                            "linux-image-6.12-cloud-amd64 (apt's package lists must know it)")
    fetch.add_argument("--print", choices=("options", "directory"), default="options",
                       help="print the --kernel/--vmlinux/--modules options (default) or the directory holding "
                            "vmlinuz, vmlinux and modules/")
    fetch.add_argument("--quiet", "-q", action="store_true", help="print only the result, not the stages")
    fetch.set_defaults(func=_kernel_fetch)
    _add_mutant_command(commands)


def _kernel_mutant(args: argparse.Namespace) -> int:
    from ..kernel.mutant import MutantBuild, MutantPatch

    say = None if args.quiet else (lambda message: _progress(f"==> {message}"))
    patches = [MutantPatch.load(Path(path)) for path in args.patches]  # every header checked before a build
    for patch in patches:
        print(MutantBuild(patch, on_stage=say).build(), flush=True)
    return 0


def _add_mutant_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mutant = commands.add_parser(
        "mutant", help="build the reference kernel with each mutant PATCH applied (cached; ~20 s each, in the "
        "reference's build tree); prints each mutant's bzImage path, to run tests with --kernel")
    mutant.add_argument("patches", nargs="+", metavar="PATCH",
                        help="a mutant patch: `Mutant:`, `Table:`, `Tests:` header lines, a `---` line, then a "
                             "unified diff against the kernel source root (patch -p1); see tests/kernel_mutants/")
    mutant.add_argument("--quiet", "-q", action="store_true", help="print only the bzImage paths, not the stages")
    mutant.set_defaults(func=_kernel_mutant)


def _suite_path(args: argparse.Namespace) -> int:
    print(shipped.SUITES_DIR)
    return 0


def add_suite_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `suite-path`: where the shipped conformance suites are (checkout or installed package)."""
    path = subparsers.add_parser("suite-path", help="print the directory of the shipped conformance suites "
                                 "(`pytest $(syscall-irl suite-path)`, or `pytest --pyargs pytest_syscall_irl.suites`)")
    path.set_defaults(func=_suite_path)


def _bisect_run(args: argparse.Namespace) -> int:
    try:
        result = _bisect_verdict(args)
    except ConfigError as exc:  # --base or --tree: the same on every commit
        result = Verdict(BISECT_ABORT, exc.message)
    except Exception as exc:  # a bug of ours would blame every commit: stop instead
        logging.getLogger(__name__).debug("bisect-run failed", exc_info=True)
        result = Verdict(BISECT_ABORT, f"syscall-irl bisect-run itself failed ({exc!r}; -v shows where): "
                                       "please report it")
    _progress(f"syscall-irl bisect-run: exit {result.status}: {result.reason}")
    return result.status


def _bisect_verdict(args: argparse.Namespace) -> Verdict:
    from .bisect import bisect_step
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    say = (lambda message: None) if args.quiet else (lambda message: _progress(f"==> {message}"))
    on_output, progress = _build_output(args)
    build = kernel_build.KernelBuild(args.tree or ".", _fragments(args), base=args.base, jobs=args.jobs,
                                     on_stage=say, on_output=on_output, ccache=args.ccache)
    _set_total(progress, build)
    return bisect_step(build, pytest_args, say)


def _failed_logs(args: argparse.Namespace) -> int:
    from xml.etree import ElementTree

    from ..report.junit import collect_failed_logs
    try:
        ElementTree.parse(args.junit)
    except (OSError, ElementTree.ParseError) as exc:
        # A report that is not there is not "no test failed": pytest may never have written it.
        raise ConfigError(f"cannot read the JUnit report {args.junit}: {exc} (pytest --junitxml={args.junit} "
                          "writes it)") from exc
    copied = collect_failed_logs(Path(args.junit), Path(args.destination))
    _progress(f"syscall-irl: {copied} log(s) of failed tests copied to {args.destination}")
    return 0


def add_ci_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `failed-logs`: the guest and GDB/MI logs of the failed tests of a JUnit report."""
    logs = subparsers.add_parser("failed-logs", help="copy the guest and GDB/MI logs of each failed test named in "
                                 "a JUnit XML report to DEST/<test id>/ (for CI artifacts)")
    logs.add_argument("junit", metavar="JUNIT_XML")
    logs.add_argument("destination", metavar="DEST")
    logs.set_defaults(func=_failed_logs)


def add_bisect_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `bisect-run`, one step of `git bisect run`."""
    bisect = subparsers.add_parser(
        "bisect-run", help="for `git bisect run`: build the tree, run pytest on it; exit 0 good, 1 bad (an "
        "invariant violated or the kernel crashed), 125 skip (build failed, the harness broke, every test skipped), "
        "128 abort (usage error, its own arguments included; no test selected; a build tool missing), "
        "130 interrupted")
    bisect.add_argument("--tree", metavar="DIR", help="kernel source tree (default: the current directory)")
    _add_config_argument(bisect)
    _add_base_argument(bisect)
    _add_ccache_argument(bisect)
    bisect.add_argument("--jobs", "-j", type=_positive_int, default=None, metavar="N",
                        help="parallel make jobs (default: the number of CPUs)")
    bisect.add_argument("--quiet", "-q", action="store_true", help="print only the verdict and pytest's output")
    bisect.add_argument("--make-output", action="store_true",
                        help="show make's output instead of a progress line (it is in build.log either way)")
    bisect.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS",
                        help="arguments for pytest (--syscall-irl-kernel, --syscall-irl-vmlinux and, unless "
                             "given, --junitxml are added; a --junitxml of yours is kept and read)")
    bisect.set_defaults(func=_bisect_run, usage_status=BISECT_ABORT)


COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    add_kernel_commands,
    add_suite_commands,
    add_bisect_commands,
    add_ci_commands,
    add_diff_commands,
]


def installed_version() -> str:
    """The installed distribution's version (pyproject reads it from __version__ at build time;
    the faces do not import the package top, see tests/test_layout.py)."""
    try:
        return importlib.metadata.version("pytest-syscall-irl")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command group."""
    # Typed as argparse's own: the command groups take its subparsers; each is a CommandParser
    # all the same (argparse makes them of the parser's class).
    parser: argparse.ArgumentParser = CommandParser(
        prog="syscall-irl", description="pytest-syscall-irl helper commands", epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log library debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_group in COMMAND_GROUPS:
        add_group(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `syscall-irl`; returns the exit status (EPILOG)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # parse_args's error, with the status of the command they were given to
        parser.print_usage(sys.stderr)
        parser.exit(getattr(args, "usage_status", None) or USAGE_STATUS,
                    f"{parser.prog}: error: unrecognized arguments: {' '.join(unknown)}\n")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.func(args)
    except SyscallIrlError as exc:
        print(f"syscall-irl: error: {exc}", file=sys.stderr)
        return (getattr(args, "usage_status", None) or USAGE_STATUS) if isinstance(exc, ConfigError) \
            else FAILED_STATUS
    except KeyboardInterrupt:
        print("syscall-irl: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The build cache of kernels: Debian's linux-source-6.1 (or a tree) built with a config
fragment, keyed by source, fragment and compiler.

    KernelBuild().build()      # <cache>/kernels/<key>/bzImage (+ vmlinux, config, build.log)
    reference_kernel()         # that bzImage if it is built, else None
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

from . import procs, shipped
from .build_progress import KBUILD_STEP
from .errors import ConfigError, KernelError, SyscallIrlError, tail
from .kernel import Kernel, StrPath

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
DEBIAN_PACKAGE = "linux-source-6.1"
DEBIAN_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
               "cpio": "cpio", "xz": "xz-utils", "tar": "tar"}
BUILD_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
LOCK_TIMEOUT = 3600.0  # a whole build of another process, with margin



def cache_dir() -> Path:
    """$SYSCALL_IRL_CACHE, else $XDG_CACHE_HOME/pytest-syscall-irl, else ~/.cache/pytest-syscall-irl."""
    if os.environ.get("SYSCALL_IRL_CACHE"):
        return Path(os.environ["SYSCALL_IRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-syscall-irl"


def default_fragment() -> Path:
    """The reference config fragment shipped with the package (guest/kernel.config)."""
    return shipped.KERNEL_FRAGMENT


def _output(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def debian_source_version() -> str | None:
    """The installed version of Debian's linux-source-6.1 ("6.1.192-2"), None if not installed."""
    return _output(["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE]) or None


def compiler_id() -> str:
    """First line of `gcc --version`: a new compiler means a new cache key."""
    out = _output(["gcc", "--version"])
    if not out:
        raise KernelError("`gcc --version` failed: apt-get install build-essential")
    return out.splitlines()[0]


def tree_identity(tree: Path) -> str:
    """realpath + `make -s kernelversion` of a kernel source tree."""
    if not (tree / "Makefile").is_file() or not (tree / "arch" / "x86").is_dir():
        raise ConfigError(f"{tree} is not a Linux source tree (no Makefile and arch/x86): fix --tree")
    version = _output(["make", "-s", "-C", str(tree), "kernelversion"])
    if not version:
        raise ConfigError(f"`make -s kernelversion` failed in {tree}: is it a Linux source tree?")
    return f"{os.path.realpath(tree)}={version.splitlines()[-1]}"


def build_key(source_identity: str, fragment_text: str, compiler: str) -> str:
    """The cache key of one build: 16 hex digits of sha256(source, fragment, compiler)."""
    digest = hashlib.sha256("\0".join((source_identity, fragment_text, compiler)).encode())
    return digest.hexdigest()[:16]


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value of a .config or fragment; "# CONFIG_X is not set" -> "n"."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if unset:
            values[unset[1]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
    return values


def dropped_options(fragment_text: str, config_text: str) -> list[str]:
    """Options of the fragment that the final .config does not have as requested."""
    final = parse_config(config_text)
    return [
        f"{name}={want} (final .config: {'is not set' if final.get(name, 'n') == 'n' else final[name]})"
        for name, want in parse_config(fragment_text).items()
        if final.get(name, "n") != want
    ]


def missing_build_deps() -> list[str]:
    """Debian packages whose tools or headers a kernel build needs and this machine lacks."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [pkg for header, pkg in BUILD_HEADERS.items() if not Path(header).exists()]
    return sorted(set(missing))


def reference_kernel(cache: Path | None = None) -> Path | None:
    """The cached bzImage of Debian's source + the default fragment if built, else None (fast)."""
    try:
        build = KernelBuild(cache=cache)
        return build.bzimage if build.is_complete() else None
    except SyscallIrlError as exc:
        log.debug("no reference kernel: %s", exc)
        return None


def _atomic_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temporary)
    shutil.copymode(source, temporary)
    os.replace(temporary, target)


def _atomic_write(target: Path, text: str) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


class KernelBuild:
    """One kernel build in the cache: a source (Debian's tarball or a tree), a fragment, a compiler.

        build = KernelBuild(jobs=2, on_stage=print, on_output=print)
        bzimage = build.build()   # reused at once when the cache already holds it
    """

    def __init__(
        self,
        tree: StrPath | None = None,
        fragment: StrPath | None = None,
        *,
        jobs: int | None = None,
        cache: Path | None = None,
        on_stage: Progress | None = None,
        on_output: Progress | None = None,
    ) -> None:
        self.tree = Path(tree) if tree is not None else None
        self.fragment = Path(fragment) if fragment is not None else default_fragment()
        self.jobs = jobs or os.cpu_count() or 1
        self.cache = cache if cache is not None else cache_dir()
        self._on_stage = on_stage
        self._on_output = on_output
        self.steps = 0  # kbuild steps (`  CC  file.o` lines) of the last build, for progress estimates

    @cached_property
    def fragment_text(self) -> str:
        """Contents of the config fragment."""
        try:
            return self.fragment.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config fragment {self.fragment}: {exc}") from exc

    @property
    def fragment_sha256(self) -> str:
        """sha256 of the fragment's text (build_progress finds earlier builds of it by this)."""
        return hashlib.sha256(self.fragment_text.encode()).hexdigest()

    @cached_property
    def source_identity(self) -> str:
        """"debian-linux-source-6.1=<version>", or "<realpath>=<kernelversion>" for a tree."""
        if self.tree is not None:
            return tree_identity(self.tree)
        version = debian_source_version()
        if version is None:
            raise KernelError(f"{DEBIAN_PACKAGE} is not installed: apt-get install {DEBIAN_PACKAGE}")
        return f"debian-{DEBIAN_PACKAGE}={version}"

    @cached_property
    def key(self) -> str:
        """The cache key (see build_key)."""
        return build_key(self.source_identity, self.fragment_text, compiler_id())

    @property
    def directory(self) -> Path:
        """<cache>/kernels/<key>: bzImage, vmlinux, config, build.log, obj/, complete."""
        return self.cache / "kernels" / self.key

    @property
    def bzimage(self) -> Path:
        """Where the built bzImage is (or will be)."""
        return self.directory / "bzImage"

    @property
    def vmlinux(self) -> Path:
        """Where the built vmlinux is (or will be)."""
        return self.directory / "vmlinux"

    @property
    def log_path(self) -> Path:
        """The log of the last build of this key."""
        return self.directory / "build.log"

    def is_complete(self) -> bool:
        """True if a build of this key finished and its artifacts are in place."""
        return all((self.directory / name).is_file() for name in ("complete", "bzImage", "vmlinux"))

    def build(self) -> Path:
        """Build unless the cache has it (Debian source) and return the bzImage path.

        A tree given explicitly is always re-made (incrementally): its sources may have changed.
        """
        if self.tree is None and self.is_complete():
            self._stage(f"reusing {self.directory}")
            return self.bzimage
        self._check_deps()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked(self.directory.with_name(f"{self.key}.lock"), f"building {self.key}"):
            if self.tree is None and self.is_complete():
                self._stage(f"reusing {self.directory}, built meanwhile by another process")
                return self.bzimage
            self._build_locked()
        return self.bzimage

    def _build_locked(self) -> None:
        started = time.monotonic()
        self.steps = 0
        (self.directory / "complete").unlink(missing_ok=True)
        with self.log_path.open("w") as build_log:
            source = self.tree if self.tree is not None else self._debian_tree(build_log)
            self._configure(source, build_log)
            self._stage(f"building bzImage with {self.jobs} jobs (log: {self.log_path})")
            self._run(build_log, self._make(source, f"-j{self.jobs}", "bzImage"))
        self._install()
        self._stage(f"built {self.bzimage} in {time.monotonic() - started:.0f} s")

    def _configure(self, source: Path, build_log: IO[str]) -> None:
        obj = self.directory / "obj"
        obj.mkdir(exist_ok=True)
        self._stage(f"configuring {source} (tinyconfig + {self.fragment})")
        self._run(build_log, self._make(source, "tinyconfig"))
        merge = ["scripts/kconfig/merge_config.sh", "-m", "-O", str(obj), str(obj / ".config"),
                 str(self.fragment.resolve())]
        self._run(build_log, merge, cwd=source)
        self._run(build_log, self._make(source, "olddefconfig"))
        dropped = dropped_options(self.fragment_text, (obj / ".config").read_text())
        if dropped:
            raise KernelError(
                f"options of {self.fragment} did not survive `make olddefconfig` (a dependency is "
                "off; e.g. RANDOMIZE_BASE needs RELOCATABLE): add what they depend on:\n  "
                + "\n  ".join(dropped)
            )

    def _make(self, source: Path, *targets: str) -> list[str]:
        return ["make", "-C", str(source), f"O={self.directory / 'obj'}", *targets]

    def _install(self) -> None:
        obj = self.directory / "obj"
        _atomic_copy(obj / "arch" / "x86" / "boot" / "bzImage", self.bzimage)
        _atomic_copy(obj / "vmlinux", self.vmlinux)
        _atomic_copy(obj / ".config", self.directory / "config")
        try:
            kernel = Kernel.load(self.bzimage)
        except ConfigError as exc:
            raise KernelError(f"the build produced unusable artifacts: {exc.message}") from exc
        record = {"source": self.source_identity, "fragment": str(self.fragment),
                  "fragment_sha256": self.fragment_sha256, "compiler": compiler_id(),
                  "version": kernel.bzimage.version, "steps": self.steps}
        _atomic_write(self.directory / "complete", json.dumps(record, indent=1) + "\n")

    @property
    def debian_tree(self) -> Path:
        """Where Debian's source is (or will be) extracted: <cache>/src/linux-source-6.1-<version>."""
        version = self.source_identity.rpartition("=")[2]
        return self.cache / "src" / f"{DEBIAN_PACKAGE}-{version}"

    def _debian_tree(self, build_log: IO[str]) -> Path:
        target = self.debian_tree
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(target.with_name(f"{target.name}.lock"), f"extracting {DEBIAN_TARBALL}"):
            if not target.is_dir():
                self._extract(target, build_log)
        return target

    def _extract(self, target: Path, build_log: IO[str]) -> None:
        if not DEBIAN_TARBALL.is_file():
            raise KernelError(f"{DEBIAN_TARBALL} is missing: apt-get install {DEBIAN_PACKAGE}")
        self._stage(f"extracting {DEBIAN_TARBALL} to {target}")
        scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
        try:
            self._run(build_log, ["tar", "-xf", str(DEBIAN_TARBALL), "-C", str(scratch)])
            # The rename makes the tree appear whole or not at all.
            os.rename(scratch / DEBIAN_PACKAGE, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check_deps(self) -> None:
        missing = missing_build_deps()
        if missing:
            raise KernelError(f"building a kernel needs: apt-get install {' '.join(missing)}")

    def _run(self, build_log: IO[str], command: list[str], cwd: Path | None = None) -> None:
        build_log.write(f"$ {' '.join(command)}\n")
        build_log.flush()
        env = {k: v for k, v in os.environ.items() if k not in ("KCONFIG_CONFIG", "KCONFIG_ALLCONFIG")}
        proc = procs.spawn(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                build_log.write(line)
                self.steps += bool(KBUILD_STEP.match(line))
                if self._on_output is not None:
                    self._on_output(line.rstrip("\n"))
            code = proc.wait()
        finally:
            _stop_group(proc)
        build_log.flush()
        if code != 0:
            raise KernelError(f"kernel build step failed (log: {self.log_path})", command=command,
                              exit_code=code, log_tail=tail(self.log_path.read_text()))

    @contextmanager
    def _locked(self, path: Path, what: str) -> Iterator[None]:
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self._stage(f"waiting for another process {what} (lock {path})")
            try:
                lock.acquire(timeout=LOCK_TIMEOUT)
            except Timeout as exc:
                raise KernelError(f"gave up after {LOCK_TIMEOUT:.0f} s waiting for {path}") from exc
        try:
            yield
        finally:
            lock.release()

    def _stage(self, message: str) -> None:
        log.info("%s", message)
        if self._on_stage is not None:
            self._on_stage(message)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill make and its compilers (their own process group) if we leave early (Ctrl-C, error)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    procs.stop(proc)

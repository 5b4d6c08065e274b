"""The build cache of kernels: Debian's linux-source-6.1 (or another Debian source
version, or a tree) built with config fragments, keyed by source, fragments and compiler.

    KernelBuild().build()      # <cache>/kernels/<key>/bzImage (+ vmlinux, config, build.log)
    KernelBuild(debian="6.12", fragment=[default_fragment(), fred_fragment()]).build()
    reference_kernel()         # the first one's bzImage if it is built, else None
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import IO

from ..core import procs
from ..core import shipped
from .progress import KBUILD_STEP
from ..core.cache import NOT_BUILT, CacheEntry
# The cache root lives in core.cache; named here too, where the CLI and plugin find it.
from ..core.cache import cache_dir as cache_dir, check_cache_dir as check_cache_dir
from ..core.errors import ConfigError, KernelError, SyscallIrlError, tail
from .artifacts import Kernel, StrPath
from .patching import pristine

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
REFERENCE_SOURCE = "6.1"  # Debian's linux-source-<this>: the reference kernel
DEBIAN_PACKAGE = f"linux-source-{REFERENCE_SOURCE}"
# Options the fragment names that later kernels renamed (old -> new): a fragment is
# translated for a tree whose Kconfig has only the new name. The x86 mitigation options
# took a MITIGATION_ prefix upstream (6.12 has only MITIGATION_PAGE_TABLE_ISOLATION).
BASE_TARGETS = ("tinyconfig", "defconfig")
RENAMED_OPTIONS = {"CONFIG_PAGE_TABLE_ISOLATION": "CONFIG_MITIGATION_PAGE_TABLE_ISOLATION"}
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
               "cpio": "cpio", "xz": "xz-utils", "tar": "tar"}
BUILD_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev"}
# make's CC with --ccache: ccache hashes each compile's sources and command line, so a tree whose file
# times a checkout reset (every object stale to make) still compiles from the cache. ccache finds
# its directory in $CCACHE_DIR (default ~/.cache/ccache).
CCACHE_CC = "ccache gcc"
ARTIFACTS = ("bzImage", "vmlinux")
RECORD = "complete"  # the build's record (core.cache): its artifacts, source, compiler, steps


def default_fragment() -> Path:
    """The reference config fragment shipped with the package (guest/kernel.config)."""
    return shipped.KERNEL_FRAGMENT


def needs_fragment() -> Path:
    """What the suite needs on top of a full config (defconfig, a distribution's): guest/suite-needs.config."""
    return default_fragment().with_name("suite-needs.config")


def fred_fragment() -> Path:
    """A fragment adding CONFIG_X86_FRED (6.9+), merged after the default one."""
    return default_fragment().with_name("fred.config")


def kconfig_defines(tree: Path, names: Sequence[str]) -> set[str]:
    """Which of the CONFIG_ *names* some Kconfig file of *tree* defines (`config NAME`)."""
    wanted = {name.removeprefix("CONFIG_") for name in names}
    found: set[str] = set()
    for path in tree.rglob("Kconfig*"):
        if path.is_file():
            found.update(re.findall(r"^\s*(?:menu)?config\s+(\w+)\s*$", path.read_text(errors="replace"),
                                    re.MULTILINE))
    return {f"CONFIG_{name}" for name in wanted & found}


def translate_fragment(text: str, defined: set[str]) -> str:
    """*text* with each option of RENAMED_OPTIONS the tree does not define (its new name
    in *defined*) written under its new name."""
    for old, new in RENAMED_OPTIONS.items():
        if old not in defined and new in defined:
            text = re.sub(rf"\b{old}\b", new, text)
    return text


def _output(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def debian_source_version(package: str = DEBIAN_PACKAGE) -> str | None:
    """The installed version of Debian's *package* ("6.1.192-2"), None if not installed."""
    return _output(["dpkg-query", "-W", "-f=${Version}", package]) or None


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


def added_options(fragment_text: str, before: str, after: str) -> list[str]:
    """The fragment's options whose value the merge changed: "CONFIG_X86_MSR=y (was m)"."""
    old, new = parse_config(before), parse_config(after)
    return [f"{name}={new.get(name, 'n')} (was {'not set' if old.get(name, 'n') == 'n' else old[name]})"
            for name in parse_config(fragment_text) if old.get(name, "n") != new.get(name, "n")]


def missing_build_deps() -> list[str]:
    """Debian packages whose tools or headers a kernel build needs and this machine lacks."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [pkg for header, pkg in BUILD_HEADERS.items() if not Path(header).exists()]
    return sorted(set(missing))


def reference_kernel(cache: Path | None = None) -> Path | None:
    """The cached bzImage of Debian's source + the default fragment if built, else None (fast)."""
    return None if reference_damage(cache) else KernelBuild(cache=cache).bzimage


def reference_damage(cache: Path | None = None) -> str | None:
    """None if the reference kernel is built and intact, else why not ("not built", what is damaged)."""
    try:
        build = KernelBuild(cache=cache)
        damage = build.damage()
    except SyscallIrlError as exc:
        log.debug("no reference kernel: %s", exc)
        return "not built"
    return damage if damage in (None, NOT_BUILT) else f"the cached reference kernel in {build.directory} is " \
        f"damaged ({damage}): run `syscall-irl kernel build` to build it again"


def _atomic_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temporary)
    shutil.copymode(source, temporary)
    os.replace(temporary, target)


class KernelBuild:
    """One kernel build in the cache: a source (Debian's tarball or a tree), a fragment, a compiler.

        build = KernelBuild(jobs=2, on_stage=print, on_output=print)
        bzimage = build.build()   # reused at once when the cache already holds it
    """

    def __init__(
        self,
        tree: StrPath | None = None,
        fragment: StrPath | Sequence[StrPath] | None = None,
        *,
        debian: str = REFERENCE_SOURCE,
        base: str = "tinyconfig",
        jobs: int | None = None,
        cache: Path | None = None,
        on_stage: Progress | None = None,
        on_output: Progress | None = None,
        ccache: bool = False,
    ) -> None:
        self.tree = Path(tree) if tree is not None else None
        # The config the fragments merge over: a make target, or a saved .config file.
        self.base = base
        if base not in BASE_TARGETS and not Path(base).is_file():
            raise ConfigError(f"config base {base!r} is neither {' nor '.join(BASE_TARGETS)} nor a .config file")
        if fragment is None or isinstance(fragment, (str, os.PathLike)):
            full = base != "tinyconfig"  # a full config lacks only what the suite needs
            fragment = [fragment if fragment is not None else needs_fragment() if full else default_fragment()]
        self.fragments = [Path(f) for f in fragment]
        self.fragment = self.fragments[0]
        self.package = f"linux-source-{debian}"  # used when no tree is given
        self.jobs = jobs or os.cpu_count() or 1
        self.cache = cache if cache is not None else cache_dir()
        self._on_stage = on_stage
        self._on_output = on_output
        self.steps = 0  # kbuild steps (`  CC  file.o` lines) of the last build, for progress estimates
        # Compile through ccache (CCACHE_CC). Not in the key: ccache runs the same gcc, so a
        # ccache build and a plain one of a config are the same kernel, and share one entry.
        self.ccache = ccache

    @cached_property
    def fragment_text(self) -> str:
        """Contents of the config fragments, in merge order (one fragment: its text, so
        the reference kernel's key does not change with this option)."""
        texts = []
        for fragment in self.fragments:
            try:
                texts.append(fragment.read_text())
            except OSError as exc:
                raise ConfigError(f"cannot read config fragment {fragment}: {exc}") from exc
        return "".join(texts)

    @property
    def tarball(self) -> Path:
        """Debian's source tarball of this build (when no tree is given)."""
        return Path("/usr/src") / f"{self.package}.tar.xz"

    @property
    def fragment_sha256(self) -> str:
        """sha256 of the fragment's text (build_progress finds earlier builds of it by this)."""
        return hashlib.sha256(self.fragment_text.encode()).hexdigest()

    @cached_property
    def source_identity(self) -> str:
        """"debian-linux-source-6.1=<version>", or "<realpath>=<kernelversion>" for a tree."""
        if self.tree is not None:
            return tree_identity(self.tree)
        version = debian_source_version(self.package)
        if version is None:
            raise KernelError(f"{self.package} is not installed: apt-get install {self.package}")
        return f"debian-{self.package}={version}"

    @cached_property
    def key(self) -> str:
        """The cache key (see build_key); a base other than tinyconfig counts as fragment text."""
        if self.base == "tinyconfig":
            return build_key(self.source_identity, self.fragment_text, compiler_id())
        base = self.base if self.base in BASE_TARGETS else Path(self.base).read_text()
        return build_key(self.source_identity, f"base={base}\0{self.fragment_text}", compiler_id())

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

    @property
    def entry(self) -> CacheEntry:
        """This build in the cache: built in place (obj/ serves the next build), published by
        its record, which keeps the SHA-256 of both: the bzImage's checked on every use, the
        60 MB vmlinux's only when its mtime differs (a cache restored by tar: core.integrity)."""
        return CacheEntry(self.directory, "kernel build", record=RECORD, field="artifacts",
                          digest=lambda name: name == "bzImage",
                          members=lambda directory: [directory / name for name in ARTIFACTS], error=KernelError)

    def is_complete(self) -> bool:
        """True if a build of this key finished and its artifacts are in place, as built."""
        return self.damage() is None

    def damage(self) -> str | None:
        """Why the cached build is not usable as it stands ("not built" if it never finished)."""
        return self.entry.problem()

    def plan(self) -> list[str]:
        """What build() would build, as lines to print (`kernel build --dry-run`); builds nothing.

        An unreadable fragment or a bad tree raises ConfigError, as build() would; a source
        or tool that is missing is said, not raised: finding those out is what a plan is for.
        """
        lines = [f"source: {self._source_plan()}", f"base: {self.base}"]
        lines += [f"fragment: {fragment}" for fragment in self.fragments]
        lines.append(f"fragment sha256: {self.fragment_sha256}")
        if self.ccache:
            lines.append(f"compiler: make CC='{CCACHE_CC}' (the key is gcc's, as without --ccache)")
        try:
            lines.append(f"key: {self.key}")
        except KernelError as exc:
            lines.append(f"key: unknown ({exc.message})")
            return lines + self._deps_plan()
        state = self.damage()
        lines.append(f"directory: {self.directory}")
        lines.append("state: " + ("built (a --tree build is re-made incrementally)" if state is None and self.tree
                                  else "built (reused)" if state is None else f"to build ({state})"))
        return lines + self._deps_plan()

    def _source_plan(self) -> str:
        if self.tree is not None:
            return f"tree {self.tree}"
        version = debian_source_version(self.package)
        return f"{self.tarball} ({self.package} {version})" if version else \
            f"{self.tarball} ({self.package} not installed)"

    def missing_deps(self) -> list[str]:
        """missing_build_deps(), and ccache for a build through it."""
        ccache = ["ccache"] if self.ccache and shutil.which("ccache") is None else []
        return sorted({*missing_build_deps(), *ccache})

    def _deps_plan(self) -> list[str]:
        missing = self.missing_deps()
        return [f"missing build tools: apt-get install {' '.join(missing)}"] if missing else []

    def build(self) -> Path:
        """Build unless the cache has it (Debian source) and return the bzImage path; a
        damaged build is built again, with a warning.

        A tree given explicitly is always re-made (incrementally): its sources may have changed.
        """
        if self.tree is None and self.is_complete():
            self._stage(f"reusing {self.directory}")
            return self.bzimage
        self._check_deps()
        if not self.entry.ensure(self._build_into, say=self._stage, again=self.tree is not None):
            self._stage(f"reusing {self.directory}, built meanwhile by another process")
        return self.bzimage

    def _build_into(self, directory: Path) -> dict[str, object]:
        started = time.monotonic()
        self.steps = 0
        with self.log_path.open("w") as build_log, self._source(build_log) as source:
            self._configure(source, build_log)
            self._stage(f"building bzImage with {self.jobs} jobs (log: {self.log_path})")
            self._run(build_log, self._make(source, f"-j{self.jobs}", "bzImage"))
        record = self._install()
        self._stage(f"built {self.bzimage} in {time.monotonic() - started:.0f} s")
        return record

    @contextmanager
    def _source(self, build_log: IO[str]) -> Iterator[Path]:
        """The tree to build from: a given one as it is; Debian's held (no mutant patches it
        meanwhile) and undone of any mutant's patch a killed process left in it (patching.py)."""
        if self.tree is not None:
            yield self.tree
            return
        source = self._debian_tree(build_log)
        with pristine(source, self._stage):
            yield source

    def _configure(self, source: Path, build_log: IO[str]) -> None:
        obj = self.directory / "obj"
        obj.mkdir(exist_ok=True)
        names = " + ".join(str(f) for f in self.fragments)
        self._stage(f"configuring {source} ({self.base} + {names})")
        if self.base in BASE_TARGETS:
            self._run(build_log, self._make(source, self.base))
        else:
            shutil.copyfile(self.base, obj / ".config")
            self._run(build_log, self._make(source, "olddefconfig"))
        before = (obj / ".config").read_text()
        wanted = translate_fragment(self.fragment_text,
                                    kconfig_defines(source, [*RENAMED_OPTIONS, *RENAMED_OPTIONS.values()]))
        merged = obj / "fragment.config"
        merged.write_text(wanted)
        merge = ["scripts/kconfig/merge_config.sh", "-m", "-O", str(obj), str(obj / ".config"), str(merged)]
        self._run(build_log, merge, cwd=source)
        self._run(build_log, self._make(source, "olddefconfig"))
        after = (obj / ".config").read_text()
        for change in added_options(wanted, before, after):
            self._stage(f"added {change}")
        dropped = dropped_options(wanted, after)
        if dropped:
            raise KernelError(
                f"options of {names} did not survive `make olddefconfig` (a dependency is "
                "off; e.g. RANDOMIZE_BASE needs RELOCATABLE): add what they depend on:\n  "
                + "\n  ".join(dropped)
            )

    def _make(self, source: Path, *targets: str) -> list[str]:
        # The same CC for the config targets as for bzImage: Kconfig records the compiler it
        # probed, and a different one at build time would re-run the configuration.
        compiler = [f"CC={CCACHE_CC}"] if self.ccache else []
        return ["make", "-C", str(source), f"O={self.directory / 'obj'}", *compiler, *targets]

    def _install(self) -> dict[str, object]:
        """Copy the artifacts out of obj/; what the record keeps beside them (progress.py reads
        fragment_sha256 and steps)."""
        obj = self.directory / "obj"
        _atomic_copy(obj / "arch" / "x86" / "boot" / "bzImage", self.bzimage)
        _atomic_copy(obj / "vmlinux", self.vmlinux)
        _atomic_copy(obj / ".config", self.directory / "config")
        try:
            kernel = Kernel.load(self.bzimage)
        except ConfigError as exc:
            raise KernelError(f"the build produced unusable artifacts: {exc.message}") from exc
        return {"source": self.source_identity, "fragment": " + ".join(str(f) for f in self.fragments),
                "fragment_sha256": hashlib.sha256(self.fragment_text.encode()).hexdigest(),
                "compiler": compiler_id(), "version": kernel.bzimage.version, "steps": self.steps}

    @property
    def debian_tree(self) -> Path:
        """Where Debian's source is (or will be) extracted: <cache>/src/linux-source-6.1-<version>."""
        version = self.source_identity.rpartition("=")[2]
        return self.cache / "src" / f"{self.package}-{version}"

    def _debian_tree(self, build_log: IO[str]) -> Path:
        # An input, not a product: published whole by rename, not recorded (80,000 files).
        tree = CacheEntry(self.debian_tree, f"{self.package} source tree", record=None, error=KernelError)
        tree.ensure(lambda staging: self._extract(staging, build_log), say=self._stage)
        return tree.path

    def _extract(self, staging: Path, build_log: IO[str]) -> None:
        if not self.tarball.is_file():
            raise KernelError(f"{self.tarball} is missing: apt-get install {self.package}")
        self._stage(f"extracting {self.tarball} to {self.debian_tree}")
        # The tarball holds one directory, linux-source-<version>/: its contents are the tree.
        self._run(build_log, ["tar", "-xf", str(self.tarball), "-C", str(staging), "--strip-components=1"])

    def _check_deps(self) -> None:
        missing = self.missing_deps()
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

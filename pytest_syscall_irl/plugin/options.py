"""Where each setting of the plugin comes from: ini file < environment < command line.

Every option has three spellings that no other plugin would take (`--kernel` has a short
one too, registered only where nothing else has it; see `plugin.kernel_alias`):

    --syscall-irl-kernel (--kernel)    SYSCALL_IRL_KERNEL    syscall_irl_kernel (ini)

As in pytest-timeout, a later source overrides an earlier one and every value remembers its
origin, so an invalid value is reported with where it came from. `read_options` resolves them
all once into a `ResolvedOptions`, which every hook and fixture reads. No pytest here: the
plugin passes in what pytest parsed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

ENV_PREFIX = "SYSCALL_IRL_"
INI_PREFIX = "syscall_irl_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One string-valued setting: its name (`boot_args`), help text and allowed values."""

    name: str
    help: str
    choices: tuple[str, ...] = ()
    repeat: bool = False  # given several times (its environment twin and ini key: space-separated)
    short: bool = False  # also --NAME, where no other plugin or conftest has it (only --kernel)

    @property
    def flag(self) -> str:
        """The prefixed flag that no other plugin would take, `--syscall-irl-boot-args`."""
        return "--syscall-irl-" + self.name.replace("_", "-")

    @property
    def short_flag(self) -> str | None:
        """The product's own short spelling, `--kernel`, for the one option that has one."""
        return "--" + self.name.replace("_", "-") if self.short else None

    @property
    def env(self) -> str:
        """The environment twin, `SYSCALL_IRL_BOOT_ARGS`."""
        return ENV_PREFIX + self.name.upper()

    @property
    def ini(self) -> str:
        """The ini key, `syscall_irl_boot_args`."""
        return INI_PREFIX + self.name


OPTIONS = (
    Option("kernel", "bzImage to boot and test (default: the cached reference kernel); repeat it (or list several "
                     "in the ini key) to run every test on each kernel.", repeat=True, short=True),
    Option("vmlinux", "vmlinux with the kernel's symbols (default: beside the kernel build tree or bzImage); with "
                      "several kernels, one per --syscall-irl-kernel in the same order.", repeat=True),
    Option("modules", "the kernel's module directory, whose msr, virtio and isofs modules (with their dependencies) "
                      "the guest inserts; 'none' to insert none (default: /lib/modules/<release> if it exists); "
                      "with several kernels, one per --syscall-irl-kernel in the same order.", repeat=True),
    Option("payloads", "a directory of your own guest programs (NAME.c, NAME.i386.c, static ELF files), shipped to "
                       "/payloads/ beside the built-in ones; repeat it (or list several in the ini key) "
                       "to ship them all.", repeat=True),
    Option("qemu", "QEMU system emulator (default: qemu-system-x86_64)."),
    Option("gdb", "GDB executable (default: gdb)."),
    Option("accel", "accelerator: auto (KVM where a KVM guest really boots, else TCG), kvm or tcg "
                    "(default: auto).", ("auto", "kvm", "tcg")),
    Option("boot_args", "extra kernel command line arguments, appended to the defaults."),
    Option("baseline", "bzImage of a second kernel that tests compare the kernel under test with (the `baseline` "
                       "and `baseline_syscall_trace` fixtures); not a parameter: every test runs once per "
                       "kernel under test, and each sees this one baseline."),
    Option("baseline_vmlinux", "vmlinux of the --syscall-irl-baseline kernel (default: beside its build tree or "
                               "bzImage)."),
    Option("baseline_modules", "module directory of the --syscall-irl-baseline kernel, or 'none' (default: "
                               "/lib/modules/<release> if it exists)."),
)
BY_NAME = {option.name: option for option in OPTIONS}
SNAPSHOTS_ENV = ENV_PREFIX + "SNAPSHOTS"
NO_SNAPSHOTS_FLAG = "--syscall-irl-no-snapshots"


@dataclass(frozen=True)
class Setting:
    """A value with its origin (`--syscall-irl-kernel`, `$SYSCALL_IRL_KERNEL`, `syscall_irl_kernel in
    /x/pytest.ini`, or `default`) and the directory its relative paths are relative to."""

    value: str | None
    origin: str
    base: Path

    @property
    def given(self) -> bool:
        """True if the user set it anywhere (not the built-in default)."""
        return self.origin != "default"


def pick(option: Option, *, cli: str | None, env: Mapping[str, str], ini: str | None,
         ini_file: Path | None, cwd: Path, rootdir: Path) -> Setting:
    """The setting of *option*: the command line, else the environment, else the ini file.
    A repeatable option's values are joined with spaces (see `values`)."""
    if cli:
        setting = Setting(cli, f"{option.flag}", cwd)
    elif env.get(option.env):
        setting = Setting(env[option.env], f"${option.env}", cwd)
    elif ini:
        where = f"{option.ini} in {ini_file}" if ini_file else option.ini
        setting = Setting(ini, where, ini_file.parent if ini_file else rootdir)
    else:
        return Setting(None, "default", cwd)
    if option.choices and setting.value not in option.choices:
        # An ini value is named as it is written there, with its file.
        shown = (f"{option.ini} = {setting.value} in {ini_file}" if ini and not cli and not env.get(option.env)
                 else f"{setting.origin} = {setting.value!r}")
        raise ConfigError(f"{shown}: use {', '.join(option.choices)}")
    return setting


def pick_snapshots(*, cli: bool | None, env: Mapping[str, str], ini: bool) -> tuple[bool, str]:
    """Whether guests are restored from snapshots, and where that was decided."""
    if cli is not None:
        return cli, NO_SNAPSHOTS_FLAG
    word = env.get(SNAPSHOTS_ENV, "").strip().lower()
    if word:
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ConfigError(f"${SNAPSHOTS_ENV} = {env[SNAPSHOTS_ENV]!r}: use 1 or 0 (true/false, yes/no, on/off)")
        return word in TRUE_WORDS, f"${SNAPSHOTS_ENV}"
    return ini, "ini or default"


def split_values(option: Option, cli: list[str] | None, setting: Setting) -> list[str]:
    """A repeatable option's values: each command-line one, else the environment's or the
    ini key's space-separated ones."""
    if cli:
        return [str(value) for value in cli]
    return (setting.value or "").split()


def given_explicitly(*, cli: Mapping[str, Any], ini: Mapping[str, Any]) -> bool:
    """True if an option of ours was given on the command line or in the ini file (an ini
    `syscall_irl_snapshots` key alone does not count). The environment does not count: a
    variable left set must not wake the plugin in a run of someone else's tests (it is read
    once a collected test uses one of our fixtures)."""
    return (any(cli.get(option.name) or ini.get(option.name) for option in OPTIONS)
            or cli.get("snapshots") is not None)


@dataclass(frozen=True)
class ResolvedOptions:
    """Every option of a run with its origin, resolved once per process: what the hooks and
    fixtures read (ini file < environment < command line, each value checked once).

        options = read_options(cli={"kernel": ["a/bzImage"]}, env=os.environ, ini={},
                               ini_file=None, cwd=Path.cwd(), rootdir=Path.cwd())
        options.paths("kernel")  # [Path("/cwd/a/bzImage")]
    """

    settings: Mapping[str, Setting]  # by option name
    lists: Mapping[str, tuple[str, ...]]  # each repeatable option's values
    snapshots: bool
    explicit: bool  # given on the command line or in the ini file: checked, and the header shown, before collection
    ini_file: Path | None = None
    html: Path | None = None  # --syscall-irl-html, absolute

    def value(self, name: str) -> str | None:
        """The value of the option *name*, None if not given anywhere."""
        return self.settings[name].value

    def values(self, name: str) -> tuple[str, ...]:
        """A repeatable option's values (each --syscall-irl-NAME, else its environment twin's or ini key's words)."""
        return self.lists[name]

    def paths(self, name: str) -> list[Path]:
        """`values` as absolute paths, relative to where they were given; "none" stays "none"."""
        base = self.settings[name].base
        return [Path(value) if value == "none" else (base / os.path.expanduser(value)).resolve()
                for value in self.values(name)]

    def path(self, name: str) -> Path | None:
        """A single-valued option as an absolute path, relative to where it was given; "none"
        stays "none"; None if not given anywhere."""
        value = self.value(name)
        if value is None:
            return None
        return Path(value) if value == "none" else (self.settings[name].base / os.path.expanduser(value)).resolve()

    def given_origin(self, name: str) -> str | None:
        """Where a setting not given on the command line came from ("syscall_irl_NAME = VALUE in
        FILE", "$SYSCALL_IRL_NAME = VALUE"), else None."""
        setting = self.settings[name]
        if not setting.given or setting.origin.startswith("--"):
            return None
        if setting.origin.startswith("$"):
            return f"{setting.origin} = {setting.value}"
        return f"{BY_NAME[name].ini} = {setting.value} in {self.ini_file or 'the ini file'}"

    @contextmanager
    def naming_origin(self, *names: str) -> Iterator[None]:
        """A ConfigError about the settings *names* says which ini file (or environment variable) set them."""
        try:
            yield
        except ConfigError as exc:
            origins = [origin for origin in (self.given_origin(name) for name in names) if origin]
            if origins:
                raise ConfigError(f"{'; '.join(origins)}: {exc.message}") from None
            raise


def read_options(*, cli: Mapping[str, Any], env: Mapping[str, str], ini: Mapping[str, Any], ini_file: Path | None,
                 cwd: Path, rootdir: Path) -> ResolvedOptions:
    """Resolve every option once. *cli* and *ini* hold what pytest parsed, by option name
    (a repeatable option's command-line values as a list), plus "snapshots" (cli: False for
    --syscall-irl-no-snapshots, else None; ini: a bool) and "html" (cli only). ConfigError names the
    first invalid value with its origin, in the order of OPTIONS, then $SYSCALL_IRL_SNAPSHOTS."""
    settings, lists = {}, {}
    for option in OPTIONS:
        given = cli.get(option.name)
        joined = " ".join(given) if isinstance(given, list) else given  # see split_values
        settings[option.name] = pick(option, cli=joined, env=env, ini=ini.get(option.name) or None,
                                     ini_file=ini_file, cwd=cwd, rootdir=rootdir)
        if option.repeat:
            lists[option.name] = tuple(split_values(option, given if isinstance(given, list) else None,
                                                    settings[option.name]))
    snapshots = pick_snapshots(cli=cli.get("snapshots"), env=env, ini=bool(ini.get("snapshots", True)))[0]
    explicit = given_explicitly(cli=cli, ini=ini)
    html = cli.get("html")
    return ResolvedOptions(settings, lists, snapshots, explicit, ini_file, (cwd / html).resolve() if html else None)

"""Where each setting of the plugin comes from: ini file < environment < command line.

Every option has three spellings that cannot clash with another plugin's, plus a short one:

    --kernel / --syscall-irl-kernel    SYSCALL_IRL_KERNEL    syscall_irl_kernel (ini)

As in pytest-timeout, a later source overrides an earlier one and every value remembers its
origin, so an invalid value is reported with where it came from. No pytest here: the plugin
passes in what pytest parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def flag(self) -> str:
        """The short command-line flag, `--boot-args`."""
        return "--" + self.name.replace("_", "-")

    @property
    def long_flag(self) -> str:
        """The prefixed flag that no other plugin can take, `--syscall-irl-boot-args`."""
        return "--syscall-irl-" + self.name.replace("_", "-")

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
                     "in the ini key) to run every test on each kernel.", repeat=True),
    Option("vmlinux", "vmlinux with the kernel's symbols (default: beside the kernel build tree or bzImage); with "
                      "several kernels, one per --kernel in the same order.", repeat=True),
    Option("modules", "the kernel's module directory, whose msr, virtio and isofs modules (with their dependencies) "
                      "the guest inserts; 'none' to insert none (default: /lib/modules/<release> if it exists); "
                      "with several kernels, one per --kernel in the same order.", repeat=True),
    Option("payloads", "a directory of your own guest programs (NAME.c, NAME.i386.c, static ELF files), shipped to "
                       "/payloads/ beside the built-in ones; may be given several times.", repeat=True),
    Option("qemu", "QEMU system emulator (default: qemu-system-x86_64)."),
    Option("gdb", "GDB executable (default: gdb)."),
    Option("accel", "accelerator: auto (KVM where a KVM guest really boots, else TCG), kvm or tcg "
                    "(default: auto).", ("auto", "kvm", "tcg")),
    Option("boot_args", "extra kernel command line arguments, appended to the defaults."),
)
BY_NAME = {option.name: option for option in OPTIONS}
SNAPSHOTS_ENV = ENV_PREFIX + "SNAPSHOTS"


@dataclass(frozen=True)
class Setting:
    """A value with its origin (`--kernel`, `$SYSCALL_IRL_KERNEL`, `syscall_irl_kernel in
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
        return cli, "--no-snapshots"
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


def given_in_env(env: Mapping[str, str]) -> bool:
    """True if any option of ours is set in the environment."""
    return any(env.get(option.env) for option in OPTIONS) or bool(env.get(SNAPSHOTS_ENV))

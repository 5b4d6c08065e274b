"""What a run is asked to test with, resolved once per process and kept on pytest's config:
the options (`ResolvedOptions`), then, on first need, the validated settings of each kernel
under test (`LabSettings`). A bad value is a usage error naming the fix and its origin.
`resolve_settings` needs no pytest: it turns resolved options into settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import pytest

from ..core.errors import ConfigError
from .options import BY_NAME, INI_PREFIX, OPTIONS, ResolvedOptions, given_explicitly, read_options

if TYPE_CHECKING:
    from ..kernel.artifacts import Kernel
    from ..kernel.modules import GuestModules
    from ..lab.settings import LabSettings

# A process's options, or why they are invalid (reported when they are needed).
OPTIONS_KEY = pytest.StashKey[Union[ResolvedOptions, ConfigError]]()
SETTINGS_KEY = pytest.StashKey["list[LabSettings]"]()
BASELINE_KEY = pytest.StashKey["LabSettings | None"]()  # --syscall-irl-baseline, resolved with SETTINGS_KEY
NO_KERNEL = ("no kernel to test: pass --syscall-irl-kernel=path/to/arch/x86/boot/bzImage, or build the reference "
             "kernel once with `syscall-irl kernel build` (it is then used by default)")


def _parsed(config: pytest.Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """What pytest parsed of our options, by name: (command line, ini file)."""
    names = [option.name for option in OPTIONS]
    cli = {name: config.getoption(INI_PREFIX + name, None) for name in [*names, "snapshots", "html"]}
    ini = {name: config.getini(INI_PREFIX + name) for name in [*names, "snapshots"]}
    return cli, ini


def _read(config: pytest.Config) -> ResolvedOptions | ConfigError:
    cli, ini = _parsed(config)
    try:
        return read_options(cli=cli, env=os.environ, ini=ini, ini_file=config.inipath,
                            cwd=config.invocation_params.dir, rootdir=config.rootpath)
    except ConfigError as exc:
        return exc


def _stored(config: pytest.Config) -> ResolvedOptions | ConfigError:
    if OPTIONS_KEY not in config.stash:
        config.stash[OPTIONS_KEY] = _read(config)
    return config.stash[OPTIONS_KEY]


def options_of(config: pytest.Config) -> ResolvedOptions:
    """The options of this process, resolved on first need; an invalid one is a usage error."""
    options = _stored(config)
    if isinstance(options, ConfigError):
        raise pytest.UsageError(str(options)) from options
    return options


def valid_options(config: pytest.Config) -> ResolvedOptions | None:
    """The options of this process, None if one is invalid (`options_of` reports it when needed)."""
    options = _stored(config)
    return None if isinstance(options, ConfigError) else options


def explicit(config: pytest.Config) -> bool:
    """True if the user gave an option of ours on the command line or in the ini file (valid or
    not: `settings_of` reports a wrong one). The environment alone does not count, and is read
    only once a collected test uses one of our fixtures."""
    cli, ini = _parsed(config)
    return given_explicitly(cli=cli, ini=ini)


def settings_resolved(config: pytest.Config) -> bool:
    """True once `settings_of` has resolved the settings in this process."""
    return SETTINGS_KEY in config.stash


def settings_of(config: pytest.Config) -> list[LabSettings]:
    """The settings of this process, one per kernel, resolved on first need; a bad one is
    a usage error."""
    if SETTINGS_KEY not in config.stash:
        options = options_of(config)
        try:
            every = resolve_settings(options)
            # The baseline is checked with the kernels under test: a bad one is a usage error before any boot.
            config.stash[BASELINE_KEY] = resolve_baseline(options, every[0])
            config.stash[SETTINGS_KEY] = every
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from exc
    return config.stash[SETTINGS_KEY]


def baseline_of(config: pytest.Config) -> LabSettings | None:
    """The settings of the --syscall-irl-baseline kernel, None without one; resolved (and a bad
    one reported as a usage error) with `settings_of`."""
    settings_of(config)
    return config.stash[BASELINE_KEY]


def resolve_settings(options: ResolvedOptions) -> list[LabSettings]:
    """Turn the options into validated settings, one per kernel under test; ConfigError
    names the problem, the fix, and the ini file or variable that set it."""
    from ..kernel.build import cache_dir, check_cache_dir
    from ..lab.accel import check_accel
    from ..lab.settings import LabSettings
    from ..machine.programs import check_gdb, check_qemu
    cache = check_cache_dir(cache_dir())
    with options.naming_origin("kernel", "vmlinux", "modules"), _pytest_spelling():
        kernels = _kernels(options)
    with options.naming_origin("qemu"):
        qemu = check_qemu(options.value("qemu") or "qemu-system-x86_64", cache)[0]
    with options.naming_origin("gdb"):
        gdb = check_gdb(options.value("gdb") or "gdb", cache)[0]
    with options.naming_origin("boot_args"):
        boot_args = _boot_args(options)
    with options.naming_origin("payloads"):
        payload_dirs = _payload_dirs(options, cache)
    settings = [LabSettings(kernel=kernel, qemu=qemu, gdb=gdb, accel=options.value("accel") or "auto",
                            boot_args=boot_args, cache=cache, snapshots=options.snapshots, payload_dirs=payload_dirs,
                            modules=modules)
                for kernel, modules in kernels]
    with options.naming_origin("accel"):
        for one in settings:
            check_accel(one)
    return settings


@contextmanager
def _pytest_spelling() -> Iterator[None]:
    """The kernel layer names its options as `syscall-irl kernel check` spells them (--vmlinux,
    --modules); under pytest, they are --syscall-irl-vmlinux and --syscall-irl-modules."""
    try:
        yield
    except ConfigError as exc:
        message = re.sub(r"(?<![\w-])--(vmlinux|modules)\b", r"--syscall-irl-\1", exc.message)
        raise ConfigError(message, command=exc.command, exit_code=exc.exit_code, log_tail=exc.log_tail) from exc


BASELINE_OPTIONS = ("baseline", "baseline_vmlinux", "baseline_modules")


def resolve_baseline(options: ResolvedOptions, like: LabSettings) -> LabSettings | None:
    """The settings of the --syscall-irl-baseline kernel: its bzImage, vmlinux and modules,
    checked as the kernel under test's are, with everything else as *like* (QEMU, GDB, boot
    arguments, payloads: a comparison changes only the kernel). None without a baseline."""
    from dataclasses import replace

    from ..kernel.artifacts import Kernel
    from ..kernel.modules import guest_modules
    from ..lab.accel import check_accel
    bzimage = options.path("baseline")
    if bzimage is None:
        stray = [BY_NAME[name].flag for name in BASELINE_OPTIONS[1:] if options.value(name)]
        if stray:
            with options.naming_origin(*BASELINE_OPTIONS):
                raise ConfigError(f"{stray[0]} without --syscall-irl-baseline: name the baseline's bzImage with "
                                  f"--syscall-irl-baseline=path/to/bzImage, or drop {stray[0]}")
        return None
    with options.naming_origin(*BASELINE_OPTIONS), _baseline_spelling():
        kernel = Kernel.load(bzimage, options.path("baseline_vmlinux"))
        _check_architecture(kernel)
        settings = replace(like, kernel=kernel,
                           modules=guest_modules(kernel.release, options.path("baseline_modules")))
        check_accel(settings)
    return settings


@contextmanager
def _baseline_spelling() -> Iterator[None]:
    """The kernel layer names the kernel's options (--kernel, --vmlinux, --modules); for the
    baseline they are --syscall-irl-baseline, --syscall-irl-baseline-vmlinux and -modules."""
    try:
        yield
    except ConfigError as exc:
        message = re.sub(r"(?<![\w-])--(vmlinux|modules)\b", r"--syscall-irl-baseline-\1", exc.message)
        message = re.sub(r"(?<![\w-])--kernel\b", "--syscall-irl-baseline", message)
        raise ConfigError(f"--syscall-irl-baseline: {message}", command=exc.command, exit_code=exc.exit_code,
                          log_tail=exc.log_tail) from exc


def _check_architecture(kernel: Kernel) -> None:
    """ConfigError before anything boots if no architecture description follows *kernel*."""
    from ..arch.registry import architecture_for
    architecture_for(kernel.vmlinux.machine, f"the kernel {kernel.bzimage.path} (vmlinux {kernel.vmlinux.path})")


def _kernels(options: ResolvedOptions) -> list[tuple[Kernel, GuestModules]]:
    """Each kernel under test with the modules its guests insert, paired by position."""
    from ..arch.registry import architecture_for
    from ..kernel.artifacts import Kernel
    from ..kernel.build import reference_damage, reference_kernel
    from ..kernel.modules import guest_modules
    from ..lab.settings import pair_by_position
    bzimages: list[Path | None] = [*options.paths("kernel")] or [reference_kernel()]
    if None in bzimages:
        damage = reference_damage()
        raise ConfigError(NO_KERNEL if damage in (None, "not built") else str(damage))
    if len(options.values("vmlinux")) == 1 and len(bzimages) > 1:
        raise ConfigError("one --syscall-irl-vmlinux for several kernels: give one --syscall-irl-vmlinux per "
                          "--syscall-irl-kernel, in the same order")
    vmlinuxes = pair_by_position("vmlinux", options.paths("vmlinux"), len(bzimages))
    module_dirs = pair_by_position("modules", options.paths("modules"), len(bzimages))
    kernels = [Kernel.load(bzimage, vmlinux) for bzimage, vmlinux in zip(bzimages, vmlinuxes) if bzimage]
    for kernel in kernels:  # before anything boots: a kernel no description follows is a usage error
        architecture_for(kernel.vmlinux.machine, f"the kernel {kernel.bzimage.path} (vmlinux {kernel.vmlinux.path})")
    return [(kernel, guest_modules(kernel.release, directory)) for kernel, directory in zip(kernels, module_dirs)]


def _boot_args(options: ResolvedOptions) -> str:
    """The --syscall-irl-boot-args every guest boots with, checked as the kernel reads them."""
    from ..lab.settings import check_boot_args
    boot_args = options.value("boot_args") or ""
    try:
        check_boot_args(boot_args)
    except ConfigError as exc:
        raise ConfigError(f"--syscall-irl-boot-args: {exc}") from None
    return boot_args


def _payload_dirs(options: ResolvedOptions, cache: Path) -> tuple[Path, ...]:
    """The --syscall-irl-payloads directories (relative to where they were given); each must be a
    directory of programs that build (checked and compiled once, here: a bad one is one
    usage error, not the same error in every test)."""
    from ..core.errors import ImageError
    from ..lab.image import check_payloads
    dirs = options.paths("payloads")
    for directory in dirs:
        if not directory.is_dir():
            raise ConfigError(f"--syscall-irl-payloads: {directory} is not a directory: name a directory of guest "
                              f"programs (NAME.c, NAME.i386.c or static ELF files)")
    if dirs:
        try:
            check_payloads(cache, dirs)
        except ImageError as exc:
            raise ConfigError(f"--syscall-irl-payloads: {exc}") from exc
    return tuple(dirs)

"""Which architecture description follows a kernel: chosen by its vmlinux's ELF machine.

This is the one list a new architecture is added to (arm64 will be `"EM_AARCH64"`, with
its folder beside x86_64/). Only the faces (plugin, cli) ask it: the layers below are
handed the description they need. No pytest here.
"""

from __future__ import annotations

import importlib

from ..core.errors import ConfigError
from .base import Architecture

# ELF e_machine (as pyelftools names it) -> "module:attribute" of its description.
ARCHITECTURES = {"EM_X86_64": "pytest_syscall_irl.arch.x86_64:X86_64"}


def architecture_for(machine: str, what: str = "the kernel") -> Architecture:
    """The description of the architecture whose ELF machine is *machine*; ConfigError
    naming the supported ones where there is none."""
    try:
        where = ARCHITECTURES[machine]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"{what} is built for {machine}, and pytest-syscall-irl describes only {known}: "
                          "pass an x86_64 kernel") from None
    module, _, name = where.partition(":")
    architecture: Architecture = getattr(importlib.import_module(module), name)
    return architecture

"""pytest-syscall-irl: assert invariants of the x86_64 syscall path of a real kernel, from inside."""

from __future__ import annotations

__version__ = "0.1.0"

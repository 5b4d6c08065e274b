"""The x86_64 register file as GDB's amd64 target names it: the views of the 64-bit
general registers (eax, ax, al, ah, r8d, r8w, r8l, ...).

A full ``GdbSession.registers()`` read has GDB format only the 64-bit registers and
derives these views from them: formatting the 51 views is ~0.4 ms of GDB's ~1.3 ms
for all 101 registers (measured, GDB 13, TCG). No pytest here.

Example::

    X86_64_REGISTERS.view("ah")  # RegisterView(name='ah', base='rax', offset=8, width=8)
"""

from __future__ import annotations

from ..registers import RegisterFile, RegisterView


def _views() -> tuple[RegisterView, ...]:
    """GDB's amd64 pseudo-registers over the 64-bit general registers."""
    views: list[RegisterView] = []
    for letter in "abcd":  # the legacy registers have a high byte too
        base = f"r{letter}x"
        views += [RegisterView(f"e{letter}x", base, 0, 32), RegisterView(f"{letter}x", base, 0, 16),
                  RegisterView(f"{letter}l", base, 0, 8), RegisterView(f"{letter}h", base, 8, 8)]
    for short in ("si", "di", "bp", "sp"):
        base = f"r{short}"
        views += [RegisterView(f"e{short}", base, 0, 32), RegisterView(f"{short}l", base, 0, 8)]
        if short != "sp":  # GDB has no "sp" word view on amd64
            views.append(RegisterView(short, base, 0, 16))
    for n in range(8, 16):
        base = f"r{n}"
        views += [RegisterView(f"r{n}d", base, 0, 32), RegisterView(f"r{n}w", base, 0, 16),
                  RegisterView(f"r{n}l", base, 0, 8)]
    return tuple(views)


X86_64_REGISTERS = RegisterFile("x86_64", _views())

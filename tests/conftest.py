"""Shared set-up of the plugin's own tests."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from pytest_syscall_irl.kernel.build import cache_dir

# A runner that starts us in the background without job control (`nohup cmd &` in a script,
# some CI agents) leaves SIGINT ignored, and every child inherits that: the tests that press
# Ctrl-C on a pytest run need the disposition a user's terminal gives. A Python handler is
# reset to the default at exec, so the children get it back too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The plugin's own tests drive pytest runs; suites and users' runs do not load pytester.
pytest_plugins = ["pytester"]

# pytester moves HOME for the runs it makes: pin the cache (and the reference kernel in it)
# for them, before any test starts.
os.environ.setdefault("SYSCALL_IRL_CACHE", str(cache_dir()))

# A user's suite with its own guest programs: run by test_user_suite.py with --syscall-irl-payloads,
# as a user would run it, not collected with the plugin's own tests.
collect_ignore = ["user_suite"]


# -- kernel mutants: one summary line, from the user properties test_kernel_mutants.py records
# (they reach the xdist controller with each report, whose terminal reporter keeps them all) ---------


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    mutants: list[dict[str, Any]] = []
    reference = "not run"
    for report in (r for reports in terminalreporter.stats.values() for r in reports):
        if getattr(report, "when", None) != "call":
            continue
        for name, value in report.user_properties:
            if name == "kernel mutant":
                mutants.append(json.loads(str(value)))
            elif name == "kernel mutants reference":
                reference = str(value)
    if mutants or reference != "not run":
        terminalreporter.write_line(mutant_summary(mutants, reference))


def mutant_summary(mutants: list[dict[str, Any]], reference: str) -> str:
    """"kernel mutants: 23 built (5 from cache) in 410 s, 23 caught by their named tests, reference passed"."""
    cached = sum(bool(m["from_cache"]) for m in mutants)
    seconds = sum(float(m["build_s"]) for m in mutants if not m["from_cache"])
    parts = [f"kernel mutants: {len(mutants)} built ({cached} from cache) in {seconds:.0f} s",
             f"{sum(m['verdict'] == 'caught' for m in mutants)} caught by their named tests"]
    for verdict in ("not caught", "crashed", "failed to build"):
        names = sorted(m["name"] for m in mutants if m["verdict"] == verdict)
        parts += [f"{len(names)} {verdict} ({', '.join(names)})"] if names else []
    return ", ".join([*parts, f"reference {reference}"])

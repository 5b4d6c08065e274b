"""Shared set-up of the plugin's own tests."""

from __future__ import annotations

import os

from pytest_syscall_irl.kernel.build import cache_dir

# The plugin's own tests drive pytest runs; suites and users' runs do not load pytester.
pytest_plugins = ["pytester"]

# pytester moves HOME for the runs it makes: pin the cache (and the reference kernel in it)
# for them, before any test starts.
os.environ.setdefault("SYSCALL_IRL_CACHE", str(cache_dir()))

# A user's suite with its own guest programs: run by test_user_suite.py with --syscall-irl-payloads,
# as a user would run it, not collected with the plugin's own tests.
collect_ignore = ["user_suite"]

"""A pytest plugin for the benchmark: every test that asks for `guest` gets a fresh one.

Load it with ``-p fresh_guests`` (this directory on PYTHONPATH). The `guest` fixture
becomes the test's own `fresh_guest`, so `gdb` and `syscall_trace` attach to it too:
the suite then runs the way it would if every test started from a pristine guest.
"""

from __future__ import annotations

import pytest

from pytest_syscall_irl.lab.guest import Guest


class FreshGuests:
    """Registered after the syscall_irl plugin, so its `guest` overrides the shared one."""

    @pytest.fixture
    def guest(self, fresh_guest: Guest) -> Guest:
        return fresh_guest


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(FreshGuests(), "syscall-irl-bench-fresh-guests")

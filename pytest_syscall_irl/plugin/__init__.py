"""The pytest layer: options, report header, fixtures. Thin by design: the work is in the
domain layers (machine, lab, trace, report), which import no pytest. This module holds the
hooks; each concern has a module of its own:

    options.py    the option table and where each value comes from (no pytest)
    settings.py   the options resolved once per process, and the LabSettings they mean
    header.py     the report header, relayed from a worker under xdist
    markers.py    @pytest.mark.syscall_irl_boot_args / syscall_irl_cpu read into a GuestVariant;
                  the default pytest-timeout bound of our tests
    fixtures.py   the fixtures, a few lines each over the lab layer's classes
    artifacts.py  what a failing test's report shows of the guests, GDB and traces it used
    kcidb.py      --syscall-irl-kcidb: reports tagged with their kernel, the KCIDB file written

Fixtures: `kernel`, `guest` (shared per xdist worker), `fresh_guest` (the test's own),
`gdb` (attached to the test's guest), `syscall_trace` (one syscall through every stage),
`make_guest` (boot more guests), `baseline` and `baseline_syscall_trace` (a second kernel to
compare with, --syscall-irl-baseline).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from . import kcidb
from .artifacts import attach, record_failure_class
from .fixtures import (LAB_FIXTURE, _shared_guests, _worker_debugger, baseline, baseline_syscall_trace, fresh_guest,
                       gdb, guest, kernel, make_guest, release_idle_baseline, syscall_irl_architecture,
                       syscall_irl_baseline, syscall_irl_lab, syscall_trace)
from .header import KERNEL_TAKEN_KEY, announce, forward_header
from .markers import apply_default_timeout, register_markers, warn_deprecated_markers
from .options import BY_NAME, NO_SNAPSHOTS_FLAG, OPTIONS, SNAPSHOTS_ENV, Option
from .settings import explicit, settings_of, settings_resolved, valid_options

# pytest finds fixtures among a plugin module's attributes: these are the plugin's.
__all__ = ["_shared_guests", "_worker_debugger", "baseline", "baseline_syscall_trace", "fresh_guest", "gdb", "guest",
           "kernel", "make_guest", "syscall_irl_architecture", "syscall_irl_baseline", "syscall_irl_lab",
           "syscall_trace"]

USAGE_ERROR_KEY = pytest.StashKey[str]()
GROUP = "syscall-irl"
USAGE_ERROR_OUTPUT = "syscall_irl_usage_error"


def pytest_addoption(parser: pytest.Parser) -> None:
    # Only prefixed names: a generic --gdb or --qemu would crash any run whose conftest or
    # other plugin has one. --kernel, the product's own spelling, is added later (kernel_alias).
    group = parser.getgroup(GROUP, "x86_64 syscall path conformance (QEMU + GDB)")
    for option in OPTIONS:
        group.addoption(option.flag, **_option_attrs(option))
        parser.addini(option.ini, f"default for {option.flag}: {option.help}")
    group.addoption(NO_SNAPSHOTS_FLAG, dest="syscall_irl_snapshots", action="store_false", default=None,
                    help=f"cold-boot every guest instead of restoring a saved ready guest (default: restore). "
                         f"Also ${SNAPSHOTS_ENV}=0.")
    parser.addini("syscall_irl_snapshots", f"default for {NO_SNAPSHOTS_FLAG}: restore guests from a saved ready "
                  "guest (true) or cold-boot each (false).", type="bool", default=True)
    group.addoption("--syscall-irl-html", dest="syscall_irl_html", metavar="PATH",
                    help="write an HTML page drawing each traced syscall's path through the stages.")
    kcidb.add_options(group)


def _option_attrs(option: Option) -> dict[str, Any]:
    attrs: dict[str, Any] = {"dest": option.ini, "metavar": option.name.upper(),
                             "help": f"{option.help} Also ${option.env}."}
    if option.choices:
        attrs["choices"] = option.choices
    if option.repeat:
        attrs["action"] = "append"
    return attrs


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> Generator[None, None, None]:
    # After the plugins and the initial conftests added their options: --kernel only if none has it.
    yield
    kernel_alias(early_config, parser)


def kernel_alias(config: pytest.Config, parser: pytest.Parser) -> None:
    """Add --kernel (same as --syscall-irl-kernel) unless another plugin or conftest already has it;
    then its owner keeps it, and our header says to use --syscall-irl-kernel."""
    option = BY_NAME["kernel"]
    assert option.short_flag
    taken = _option_names(parser)
    if option.short_flag in taken:
        config.stash[KERNEL_TAKEN_KEY] = taken[option.short_flag]
        return
    parser.getgroup(GROUP).addoption(option.short_flag, **{**_option_attrs(option),
                                                           "help": f"same as {option.flag}."})


def _option_names(parser: pytest.Parser) -> dict[str, str]:
    """Every option string already registered, with its dest. pytest has no public API for this:
    its groups (`_anonymous`, `_groups`) are read defensively, the same way in pytest 8 and 9."""
    groups = [getattr(parser, "_anonymous", None), *getattr(parser, "_groups", ())]
    return {name: str(getattr(argument, "dest", "")) for group in groups if group is not None
            for argument in getattr(group, "options", ()) for name in argument.names()}


def pytest_configure(config: pytest.Config) -> None:
    controller = not hasattr(config, "workerinput")
    if getattr(config.option, "numprocesses", None) and controller:
        from .header import HeaderRelay
        config.pluginmanager.register(HeaderRelay(config), "syscall_irl_header_relay")
    # The command line only: the environment twins are not read before a test needs them.
    html = config.getoption("syscall_irl_html", None)
    if html and controller:
        from ..report.html import HtmlPage
        config.pluginmanager.register(HtmlPage((config.invocation_params.dir / html).resolve()), "syscall_irl_html")
    kcidb.configure(config, controller)
    register_markers(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # Options given explicitly are checked before anything runs, in every process.
    if explicit(session.config):
        settings_of(session.config)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a deselected kernel test needs no kernel
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # Without explicit options, the default kernel is needed only if a test asks for one;
    # only then are the environment twins read.
    ours = [item for item in items if LAB_FIXTURE in getattr(item, "fixturenames", ())]
    if not ours:
        return
    apply_default_timeout(config, ours)
    for item in ours:
        warn_deprecated_markers(item)
    if not hasattr(config, "workerinput"):
        settings_of(config)
        return
    # An xdist worker cannot raise a usage error (its controller would report a crash):
    # it runs nothing and stops the session with the message, which the controller turns
    # back into a usage error (pytest_testnodedown, pytest_sessionfinish).
    try:
        settings_of(config)
    except pytest.UsageError as exc:
        items[:] = []
        session.shouldstop = f"usage error: {exc}"
        config.workeroutput[USAGE_ERROR_OUTPUT] = str(exc)  # type: ignore[attr-defined]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Several kernels: every test using one runs once per kernel. The lab is a session
    # fixture parametrized by kernel, so pytest groups each kernel's tests and, when a
    # worker moves to the next kernel, tears down the last one's lab, guests and GDB.
    if LAB_FIXTURE not in metafunc.fixturenames:
        return
    options = valid_options(metafunc.config)  # an invalid one: the usage error comes after collection
    if options is None or len(options.values("kernel")) < 2:
        return
    from ..lab.settings import kernel_ids
    ids = kernel_ids(settings_of(metafunc.config))
    metafunc.parametrize(LAB_FIXTURE, range(len(ids)), ids=ids, indirect=True, scope="session")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    # After the test's fixtures: the baseline's guest and GDB live only through a run of comparing tests.
    try:
        return (yield)
    finally:
        release_idle_baseline(item.config, nextitem)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    message = getattr(node, "workeroutput", {}).get(USAGE_ERROR_OUTPUT)
    if message:
        node.config.stash[USAGE_ERROR_KEY] = message


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.stash.get(USAGE_ERROR_KEY, None):
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    # Options given: the header (and any usage error) comes before collection. Otherwise it
    # waits until a collected test needs a kernel (pytest_report_collectionfinish): a run of
    # unrelated tests in the same environment starts no program of ours and reads no kernel.
    return announce(config) if explicit(config) else None


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str] | None:
    if explicit(config) or not settings_resolved(config):
        return None
    return announce(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    forward_header(item.config, report)
    attach(item, report)
    kcidb.tag(item, report)
    record_failure_class(item, report, call)
    return report


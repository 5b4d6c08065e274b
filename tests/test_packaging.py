"""The package as users get it: a wheel installed into a new venv outside the checkout runs
the shipped suite, and the oldest dependency versions pyproject allows run the unit tests.

Both install from PyPI (through pip's cache) into fresh venvs; they are slow, so integration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pytest_syscall_irl.kernel.build import cache_dir, reference_kernel

ROOT = Path(__file__).resolve().parent.parent
# ~80 s each on 2 idle cores, 260 s seen at load 10: above the project's 300 s default.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def _run(command: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS")}
    env["SYSCALL_IRL_CACHE"] = str(cache_dir())
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _venv(where: Path) -> Path:
    """A new venv (no system site-packages); its bin directory."""
    _run([sys.executable, "-m", "venv", where], cwd=where.parent)
    _run([where / "bin" / "python", "-m", "pip", "install", "-q", "--upgrade", "pip"], cwd=where.parent)
    return where / "bin"


def test_wheel_installed_outside_the_checkout_runs_the_shipped_suite(tmp_path: Path) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", ROOT], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("pytest_syscall_irl-*.whl")
    bin_dir = _venv(tmp_path / "venv")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    site = str(tmp_path / "venv" / "lib")
    # The guest sources and the suite come from the installed package, not from this checkout.
    assert _run([bin_dir / "syscall-irl", "suite-path"], cwd=outside).startswith(site)
    guest = _run([bin_dir / "python", "-c", "from pytest_syscall_irl.core import shipped; print(shipped.GUEST_DIR)"],
                 cwd=outside)
    assert guest.startswith(site) and (Path(guest.strip()) / "payloads" / "sirl.h").is_file()
    # Same fragment, same cache key: the reference kernel built from the checkout is found.
    assert _run([bin_dir / "syscall-irl", "kernel", "path"], cwd=outside).strip() == str(reference_kernel())
    out = _run([bin_dir / "pytest", "--pyargs", "pytest_syscall_irl.suites", "-k", "test_lstar or test_rpl",
                "-p", "no:cacheprovider", "-q", "-rs", f"--basetemp={tmp_path / 'basetemp'}"], cwd=outside)
    assert " passed" in out and "failed" not in out and "error" not in out, out


def oldest_allowed() -> list[str]:
    """`name==floor` for every dependency of pyproject (each has a >= floor), and pluggy's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for text in project["dependencies"]:
        requirement = Requirement(text)
        (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        pins.append(f"{requirement.name}=={floor}")
    # wrapper=True hooks need pluggy >= 1.2; pytest 8.0 allows 1.3 at the oldest.
    return [*pins, "pluggy==1.3.0"]


def test_oldest_allowed_versions_run_the_unit_tests(tmp_path: Path) -> None:
    pins = oldest_allowed()
    (tmp_path / "constraints.txt").write_text("\n".join(pins) + "\n")
    bin_dir = _venv(tmp_path / "venv")
    # check-jsonschema: tests/test_ci_docs.py is a unit test too (a dev tool, not a dependency).
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "-c", tmp_path / "constraints.txt", ROOT,
          "check-jsonschema"], cwd=tmp_path)
    installed = _run([bin_dir / "python", "-m", "pip", "freeze"], cwd=tmp_path).lower().replace("_", "-")
    for pin in pins:
        assert pin.lower().replace("_", "-") in installed, f"{pin} not installed:\n{installed}"
    # A short base temp: the console tests' unix sockets live under it (~108-byte limit).
    with tempfile.TemporaryDirectory(prefix="oldest-") as basetemp:
        out = _run([bin_dir / "python", "-m", "pytest", "tests", "-m", "not integration", "-n", "2", "-q",
                    "-p", "no:cacheprovider", f"--basetemp={basetemp}"], cwd=ROOT, timeout=900)
    assert " passed" in out and "failed" not in out, out

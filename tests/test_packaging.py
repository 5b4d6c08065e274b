"""The package as users get it: a wheel installed into a new venv outside the checkout ships
every file its commands read and runs the shipped suite, and the sdist runs its own unit tests
with the oldest dependency versions pyproject allows.

Both install from PyPI (through pip's cache) into fresh venvs; they are slow, so integration.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import pytest_syscall_irl
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


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the wheel of this checkout installed (built and installed once for the module)."""
    where = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", where / "dist", ROOT], cwd=where)
    (wheel,) = (where / "dist").glob("pytest_syscall_irl-*.whl")
    assert wheel.name.startswith(f"pytest_syscall_irl-{pytest_syscall_irl.__version__}-"), wheel.name
    bin_dir = _venv(where / "venv")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=where)
    (where / "elsewhere").mkdir()
    return where


def fred_recipe() -> list[str]:
    """The README's first step of the FRED recipe: its `syscall-irl kernel build ... fred.config` line."""
    (line,) = re.findall(r"^syscall-irl kernel build .*fred\.config.*$", (ROOT / "README.md").read_text(), re.M)
    return str(line).split()[1:]


def test_installed_wheel_ships_every_file_its_commands_read(wheel_venv: Path) -> None:
    bin_dir, outside, site = wheel_venv / "venv" / "bin", wheel_venv / "elsewhere", str(wheel_venv / "venv" / "lib")
    where = "from pytest_syscall_irl.core import shipped; print(shipped.GUEST_DIR)"
    guest = Path(_run([bin_dir / "python", "-c", where], cwd=outside).strip())
    assert str(guest).startswith(site)
    in_checkout = {p.relative_to(ROOT / "guest") for p in (ROOT / "guest").rglob("*") if p.is_file()}
    installed = {p.relative_to(guest) for p in guest.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert in_checkout <= installed, f"missing from the wheel: {sorted(map(str, in_checkout - installed))}"
    version = _run([bin_dir / "syscall-irl", "--version"], cwd=outside)
    assert version == f"syscall-irl {pytest_syscall_irl.__version__}\n"
    # Each fragment a build can merge is found, without building: the full base's, and the FRED
    # recipe as the README writes it (guest/NAME, which an installed package has in its own directory).
    for command in (["kernel", "build", "--base", "defconfig"], fred_recipe()):
        out = _run([bin_dir / "syscall-irl", *command, "--dry-run"], cwd=outside)
        fragments = [line.removeprefix("fragment: ") for line in out.splitlines() if line.startswith("fragment: ")]
        assert fragments and all(f.startswith(str(guest)) for f in fragments), out
        assert "key: " in out, out


def test_wheel_installed_outside_the_checkout_runs_the_shipped_suite(wheel_venv: Path) -> None:
    if reference_kernel() is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    bin_dir, outside, site = wheel_venv / "venv" / "bin", wheel_venv / "elsewhere", str(wheel_venv / "venv" / "lib")
    # The guest sources and the suite come from the installed package, not from this checkout.
    assert _run([bin_dir / "syscall-irl", "suite-path"], cwd=outside).startswith(site)
    guest = _run([bin_dir / "python", "-c", "from pytest_syscall_irl.core import shipped; print(shipped.GUEST_DIR)"],
                 cwd=outside)
    assert guest.startswith(site) and (Path(guest.strip()) / "payloads" / "sirl.h").is_file()
    # Same fragment, same cache key: the reference kernel built from the checkout is found.
    assert _run([bin_dir / "syscall-irl", "kernel", "path"], cwd=outside).strip() == str(reference_kernel())
    out = _run([bin_dir / "pytest", "--pyargs", "pytest_syscall_irl.suites", "-k", "test_lstar or test_rpl",
                "-p", "no:cacheprovider", "-q", "-rs", f"--basetemp={wheel_venv / 'basetemp'}"], cwd=outside)
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


def unpacked_sdist(bin_dir: Path, where: Path) -> Path:
    """The sdist of this checkout, built by *bin_dir*'s python (with `build`) and unpacked under *where*."""
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "build"], cwd=where)
    _run([bin_dir / "python", "-m", "build", "--sdist", "--outdir", where / "dist", ROOT], cwd=where)
    (sdist,) = (where / "dist").glob("pytest_syscall_irl-*.tar.gz")
    assert sdist.name == f"pytest_syscall_irl-{pytest_syscall_irl.__version__}.tar.gz", sdist.name
    with tarfile.open(sdist) as archive:
        archive.extractall(where / "unpacked", filter="data")
    (tree,) = (where / "unpacked").iterdir()
    return tree


def test_the_sdist_runs_its_unit_tests_with_the_oldest_allowed_versions(tmp_path: Path) -> None:
    # One venv and one run of the unit tests for two promises (the sdist is complete, the floors
    # are true): each costs minutes on the 2-core machine. A failure's output says which broke.
    pins = oldest_allowed()
    (tmp_path / "constraints.txt").write_text("\n".join(pins) + "\n")
    bin_dir = _venv(tmp_path / "venv")
    tree = unpacked_sdist(bin_dir, tmp_path)
    # check-jsonschema and kcidb-io: tests/test_ci_docs.py and tests/test_kcidb.py are unit tests
    # too (dev tools that check our output, not dependencies).
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "-c", tmp_path / "constraints.txt", tree,
          "check-jsonschema", "kcidb-io"], cwd=tmp_path)
    installed = _run([bin_dir / "python", "-m", "pip", "freeze"], cwd=tmp_path).lower().replace("_", "-")
    for pin in pins:
        assert pin.lower().replace("_", "-") in installed, f"{pin} not installed:\n{installed}"
    # A short base temp: the console tests' unix sockets live under it (~108-byte limit).
    with tempfile.TemporaryDirectory(prefix="oldest-") as basetemp:
        out = _run([bin_dir / "python", "-m", "pytest", "tests", "-m", "not integration", "-n", "2", "-q",
                    "-p", "no:cacheprovider", f"--basetemp={basetemp}"], cwd=tree, timeout=900)
    assert " passed" in out and "failed" not in out, out

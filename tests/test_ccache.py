"""`kernel build --ccache`: make compiles through ccache (CC="ccache gcc"), and the build's cache
key stays the compiler's own, so a ccache build and a plain one of a config are one entry."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_syscall_irl.cli import main as cli
from pytest_syscall_irl.core.errors import KernelError
from pytest_syscall_irl.kernel import build as kernel_build
from pytest_syscall_irl.kernel.build import KernelBuild
from test_kernel import make_bzimage, make_fake_tree, make_vmlinux, needs_gcc


@pytest.fixture
def ccache_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ccache first on PATH that records its arguments in the returned file, then runs them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "ccache-calls"
    fake = bin_dir / "ccache"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _tree_that_compiles(tmp_path: Path) -> Path:
    """The fake tree of test_kernel, whose bzImage step runs make's $(CC) as kbuild would."""
    built = tmp_path / "built"
    (built / "arch" / "x86" / "boot").mkdir(parents=True)
    tree = make_fake_tree(tmp_path, make_bzimage(built / "arch" / "x86" / "boot" / "bzImage"),
                          make_vmlinux(built / "vmlinux"))
    makefile = tree / "Makefile"
    makefile.write_text(makefile.read_text().replace("bzImage:\n", "bzImage:\n\t@$(CC) --version > /dev/null\n"))
    return tree


@needs_gcc
def test_a_ccache_build_compiles_through_ccache(tmp_path: Path, ccache_calls: Path) -> None:
    build = KernelBuild(_tree_that_compiles(tmp_path), jobs=1, cache=tmp_path / "cache", ccache=True)
    build.build()
    assert ccache_calls.read_text().splitlines() == ["gcc --version"]
    makes = [line for line in build.log_path.read_text().splitlines() if line.startswith("$ make")]
    # Every make, the config targets too: Kconfig records the compiler it probed.
    assert len(makes) == 3 and all(" CC=ccache gcc " in line for line in makes), makes


@needs_gcc
def test_a_ccache_build_and_a_plain_one_share_the_compilers_key(tmp_path: Path, ccache_calls: Path) -> None:
    tree = _tree_that_compiles(tmp_path)
    through = KernelBuild(tree, jobs=1, cache=tmp_path / "cache", ccache=True)
    plain = KernelBuild(tree, jobs=1, cache=tmp_path / "cache")
    assert through.key == plain.key
    through.build()
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    assert json.loads((through.directory / kernel_build.RECORD).read_text())["compiler"] == gcc
    ccache_calls.unlink()
    plain.build()
    assert not ccache_calls.exists()  # without --ccache, make's own CC


def test_a_ccache_build_without_ccache_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: None if name == "ccache" else f"/usr/bin/{name}")
    monkeypatch.setattr(kernel_build.CacheEntry, "ensure", lambda *a, **k: pytest.fail("built without ccache"))
    build = KernelBuild(tmp_path, cache=tmp_path / "cache", ccache=True)
    monkeypatch.setattr(KernelBuild, "is_complete", lambda self: False)
    with pytest.raises(KernelError, match="apt-get install ccache"):
        build.build()
    assert KernelBuild(tmp_path, cache=tmp_path / "cache").missing_deps() == []


def test_kernel_build_dry_run_names_ccache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SYSCALL_IRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_build, "debian_source_version", lambda *_: "6.1.192-2")
    monkeypatch.setattr(kernel_build, "compiler_id", lambda: "gcc (Debian 12.2.0-14) 12.2.0")
    monkeypatch.setattr(kernel_build, "missing_build_deps", lambda: [])
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: None)
    assert cli.main(["kernel", "build", "--dry-run", "--ccache"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert "compiler: make CC='ccache gcc' (the key is gcc's, as without --ccache)" in plan
    assert "missing build tools: apt-get install ccache" in plan
    assert cli.main(["kernel", "build", "--dry-run"]) == 0
    assert not any("ccache" in line for line in capsys.readouterr().out.splitlines())

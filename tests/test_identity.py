"""A kernel's identity (report/identity.py): the bzImage's hash, its banner, its config's hash and
where that came from, the git commit of the kernel tree it was built in and whether that tree is
dirty; then where a run shows it: the header, the JUnit properties and suite name."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from pytest_syscall_irl.kernel.artifacts import BzImage, Kernel
from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.report.identity import (BANNER_FROM_BZIMAGE, BANNER_FROM_VMLINUX, KernelIdentity, find_config,
                                                git_state, identity_of, kernel_identity)

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def _git(tree: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _kernel_tree(tree: Path, bzimage: bytes = b"not a real image") -> Path:
    """A git work tree shaped like a kernel's (Kbuild at the top), one commit, with a built
    (untracked) arch/x86/boot/bzImage."""
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "Kbuild").write_text("obj-y += init/\n")
    (tree / "Makefile").write_text("VERSION = 6\n")
    _git(tree, "init", "-q")
    _git(tree, "add", "Kbuild", "Makefile")
    _git(tree, "commit", "-q", "-m", "base")
    image = tree / "arch/x86/boot/bzImage"
    image.write_bytes(bzimage)
    return image


@needs_git
def test_a_bzimage_in_a_clean_kernel_tree_names_its_commit(tmp_path: Path) -> None:
    image = _kernel_tree(tmp_path)
    head = _git(tmp_path, "log", "-1", "--format=%H")
    state = git_state(image)
    assert state is not None
    assert (state.commit, state.dirty, Path(state.tree)) == (head, False, tmp_path.resolve())


@needs_git
def test_a_changed_tracked_file_makes_the_tree_dirty(tmp_path: Path) -> None:
    image = _kernel_tree(tmp_path)
    (tmp_path / "Makefile").write_text("VERSION = 7\n")
    state = git_state(image)
    assert state is not None and state.dirty is True


@needs_git
def test_untracked_files_leave_the_tree_clean(tmp_path: Path) -> None:
    # Every build writes untracked files (the bzImage itself): they are not changes to the source.
    image = _kernel_tree(tmp_path)
    (tmp_path / "vmlinux").write_bytes(b"built")
    state = git_state(image)
    assert state is not None and state.dirty is False


@needs_git
def test_a_git_tree_that_is_not_a_kernel_tree_names_no_commit(tmp_path: Path) -> None:
    # A CI workspace holding a copied bzImage: its commit is not the kernel's.
    image = _kernel_tree(tmp_path)
    _git(tmp_path, "rm", "-q", "Kbuild")
    _git(tmp_path, "commit", "-q", "-m", "no kernel")
    assert git_state(image) is None


@needs_git
def test_an_out_of_tree_build_names_its_source_trees_commit(tmp_path: Path) -> None:
    _kernel_tree(tmp_path / "src")
    build = tmp_path / "build"
    (build / "arch/x86/boot").mkdir(parents=True)
    (build / "source").symlink_to(tmp_path / "src")  # what kbuild makes for make O=build
    image = build / "arch/x86/boot/bzImage"
    image.write_bytes(b"image")
    state = git_state(image)
    assert state is not None and state.commit == _git(tmp_path / "src", "log", "-1", "--format=%H")


def test_without_git_there_is_no_commit_and_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "arch/x86/boot/bzImage"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"image")
    (tmp_path / "Kbuild").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_state(image) is None


class FakeVmlinux:
    """A vmlinux with (or without) an embedded config, as kernel/configs.c lays it out."""

    def __init__(self, path: Path, config: bytes | None = None, banner: str = "Linux version 6.1.0 (a@b) (gcc) #1\n"):
        self.path = path
        self.banner = banner
        self.data = b"IKCFG_ST" + (gzip.compress(config) if config is not None else b"") + b"IKCFG_ED"
        self.symbols = {} if config is None else {"kernel_config_data": 0x1008,
                                                  "kernel_config_data_end": 0x1000 + len(self.data) - 8}

    def has_symbol(self, name: str) -> bool:
        return name in self.symbols

    def symbol(self, name: str) -> int:
        return self.symbols[name]

    def read(self, address: int, size: int) -> bytes:
        return self.data[address - 0x1000:address - 0x1000 + size]


def test_an_embedded_config_comes_first(tmp_path: Path) -> None:
    image = _tree_with_config(tmp_path, b"CONFIG_FROM_TREE=y\n")
    vmlinux = FakeVmlinux(tmp_path / "vmlinux", b"CONFIG_IKCONFIG=y\n")
    assert find_config(image, vmlinux, "6.1.0") == (b"CONFIG_IKCONFIG=y\n", f"IKCONFIG in {tmp_path / 'vmlinux'}")


def test_the_build_trees_config_comes_before_one_beside_the_image(tmp_path: Path) -> None:
    image = _tree_with_config(tmp_path, b"CONFIG_FROM_TREE=y\n")
    (image.parent / "config").write_text("CONFIG_BESIDE=y\n")
    assert find_config(image, FakeVmlinux(tmp_path / "vmlinux"), "6.1.0") == (b"CONFIG_FROM_TREE=y\n",
                                                                               str(tmp_path / ".config"))


def test_a_cache_entrys_config_beside_the_image_is_found(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"image")
    (tmp_path / "config").write_text("CONFIG_BESIDE=y\n")
    assert find_config(tmp_path / "bzImage", None, "6.1.0") == (b"CONFIG_BESIDE=y\n", str(tmp_path / "config"))


def test_no_config_anywhere_is_none(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"image")
    assert find_config(tmp_path / "bzImage", FakeVmlinux(tmp_path / "vmlinux"), "0.0.0-no-such-release") is None


def _tree_with_config(tree: Path, config: bytes) -> Path:
    image = tree / "arch/x86/boot/bzImage"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"image")
    (tree / ".config").write_bytes(config)
    return image


def test_the_identity_survives_json() -> None:
    identity = KernelIdentity("6.1.0", "/k/bzImage", "ab" * 32, "Linux version 6.1.0", BANNER_FROM_VMLINUX,
                              "cd" * 32, "/k/.config", "/k", "12" * 20, True)
    assert KernelIdentity.from_dict(json.loads(json.dumps(identity.as_dict()))) == identity


# --- a real kernel --------------------------------------------------------------------------


def _reference() -> Path:
    kernel = reference_kernel()
    if kernel is None:
        pytest.skip("reference kernel not built (syscall-irl kernel build)")
    return kernel


@needs_git
def test_the_reference_kernel_built_in_a_git_tree_clean_then_dirty(tmp_path: Path) -> None:
    reference = _reference()
    image = _kernel_tree(tmp_path, reference.read_bytes())
    (tmp_path / ".config").write_text("CONFIG_X=y\n")
    kernel = Kernel.load(image, reference.parent / "vmlinux")
    identity = kernel_identity(kernel)
    assert identity.bzimage_sha256 == hashlib.sha256(reference.read_bytes()).hexdigest()
    assert identity.banner.startswith(f"Linux version {kernel.release} (")
    assert identity.banner_source == BANNER_FROM_VMLINUX
    assert (identity.config_sha256, identity.config_source) == (hashlib.sha256(b"CONFIG_X=y\n").hexdigest(),
                                                                str(tmp_path / ".config"))
    assert (identity.git_commit, identity.git_dirty) == (_git(tmp_path, "log", "-1", "--format=%H"), False)
    (tmp_path / "Kbuild").write_text("obj-y += changed/\n")
    assert identity_of(kernel.bzimage, kernel.vmlinux).git_dirty is True


def test_without_a_vmlinux_the_banner_comes_from_the_bzimage() -> None:
    bzimage = BzImage.read(_reference())
    identity = identity_of(bzimage, None)
    assert identity.banner == f"Linux version {bzimage.version}"
    assert identity.banner_source == BANNER_FROM_BZIMAGE


# --- where a run shows it -------------------------------------------------------------------

USES_KERNEL = "def test_k(kernel):\n    assert kernel.release\n"


def _suite(junit: Path) -> tuple[str, dict[str, str]]:
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None
    return str(suite.get("name")), {str(p.get("name")): str(p.get("value")) for p in suite.iter("property")}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_junit_names_the_suite_and_the_properties_after_the_kernel(pytester: pytest.Pytester,
                                                                   workers: list[str]) -> None:
    reference = _reference()
    release = BzImage.read(reference).release
    sha = hashlib.sha256(reference.read_bytes()).hexdigest()
    pytester.makepyfile(test_k=USES_KERNEL)
    # Without options the header (and all it names) comes from the worker that needed a kernel.
    result = pytester.runpytest_subprocess("--junitxml=junit.xml", "-p", "no:cacheprovider", *workers)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines([f"syscall-irl: kernel bzImage sha256 {sha}; config sha256 *"])
    name, properties = _suite(pytester.path / "junit.xml")
    assert name == f"syscall-irl.{release}.{sha[:12]}"
    prefix = f"syscall-irl kernel[{release}] "
    assert properties[prefix + "bzImage sha256"] == sha
    assert properties[prefix + "vmlinux"] == str(reference.parent / "vmlinux")  # the path, nothing appended
    assert properties[prefix + "banner"].startswith(f"Linux version {release} ")
    assert properties[prefix + "config source"] == str(reference.parent / "config")


def test_a_suite_name_the_user_set_is_kept(pytester: pytest.Pytester) -> None:
    reference = _reference()
    pytester.makepyfile(test_k=USES_KERNEL)
    result = pytester.runpytest_subprocess(f"--kernel={reference}", "--junitxml=junit.xml", "-p", "no:cacheprovider",
                                           "-o", "junit_suite_name=nightly")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert _suite(pytester.path / "junit.xml")[0] == "nightly"


def test_boot_arguments_are_part_of_the_suite_name(pytester: pytest.Pytester) -> None:
    # Two CI jobs on one kernel, one with pti=on: their suites must not clash when merged.
    reference = _reference()
    pytester.makepyfile(test_k=USES_KERNEL)
    result = pytester.runpytest_subprocess(f"--kernel={reference}", "--junitxml=junit.xml", "-p", "no:cacheprovider",
                                           "--syscall-irl-boot-args=pti=on")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    sha = hashlib.sha256(reference.read_bytes()).hexdigest()
    expected = f"syscall-irl.{BzImage.read(reference).release}.{sha[:12]}.args-"
    expected += hashlib.sha256(b"pti=on").hexdigest()[:8]
    assert _suite(pytester.path / "junit.xml")[0] == expected

"""Kernel mutants without a kernel: the patch format, a patch that does not apply, a tree
left patched by a killed process, and the mutant cache, over a small tree and a fake make."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_syscall_irl.cli import main as cli
from pytest_syscall_irl.core.errors import ConfigError, KernelError, SyscallIrlWarning
from pytest_syscall_irl.kernel import mutant as mutant_module
from pytest_syscall_irl.kernel.build import KernelBuild
from pytest_syscall_irl.kernel.mutant import MutantBuild, MutantPatch, parse_patch
from pytest_syscall_irl.kernel.patching import marker_path, originals_path, patched, pristine

ORIGINAL = "line one\nline two\nline three\n"
MUTATED = "line one\nline 2\nline three\n"
DIFF = textwrap.dedent("""\
    --- a/arch/entry.S
    +++ b/arch/entry.S
    @@ -1,3 +1,3 @@
     line one
    -line two
    +line 2
     line three
    """)
HEADER = "Mutant: line two is broken\nTable: 64-two\nTests: test_a.py::test_two test_a.py::test_p[x]\n---\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src" / "linux"
    (root / "arch").mkdir(parents=True)
    (root / "arch" / "entry.S").write_text(ORIGINAL)
    return root


def test_a_patch_parses() -> None:
    patch = parse_patch(Path("two.patch"), HEADER + DIFF)
    assert (patch.name, patch.mutant, patch.table) == ("two", "line two is broken", "64-two")
    assert patch.tests == ("test_a.py::test_two", "test_a.py::test_p[x]")
    assert patch.diff == DIFF


@pytest.mark.parametrize(("text", "problem"), [
    (DIFF, "no `---` line"),
    ("Mutant: x\nTests: test_a.py::test_b\n---\n" + DIFF, "lacks Table:"),
    ("Mutant: x\nTable: t\nTable: u\nTests: test_a.py::test_b\n---\n" + DIFF, "header line 'Table: u'"),
    ("Mutant: x\nOwner: me\nTable: t\nTests: test_a.py::test_b\n---\n" + DIFF, "header line 'Owner: me'"),
    ("Mutant: x\nTable: Bad Id\nTests: test_a.py::test_b\n---\n" + DIFF, "'Bad Id' is not an id"),
    ("Mutant: x\nTable: t\nTests: test_a.py::test_b a.py:test_c\n---\n" + DIFF, "Tests: a.py:test_c"),
    ("Mutant: x\nTable: t\nTests: test_a.py::test_b\n---\njust words\n", "no unified diff"),
], ids=["no-separator", "no-table", "twice", "unknown-field", "bad-table-id", "bad-test-id", "no-diff"])
def test_a_bad_header_is_a_usage_error_naming_the_file(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="bad.patch") as raised:
        parse_patch(Path("bad.patch"), text)
    assert problem in raised.value.message


def test_a_patch_that_does_not_apply_names_itself_and_changes_nothing(tree: Path) -> None:
    wrong = DIFF.replace(" line one", " line zero")
    with pytest.raises(ConfigError, match="wrong.patch does not apply") as raised:
        with patched(tree, wrong, "wrong.patch"):
            pytest.fail("applied")
    assert "FAILED" in raised.value.message  # patch's own output
    assert (tree / "arch" / "entry.S").read_text() == ORIGINAL
    assert not marker_path(tree).exists() and not originals_path(tree).exists()


def test_a_patch_already_applied_does_not_apply_again(tree: Path) -> None:
    (tree / "arch" / "entry.S").write_text(MUTATED)
    with pytest.raises(ConfigError, match="previously applied"):
        with patched(tree, DIFF, "two.patch"):
            pytest.fail("applied twice")


def test_a_patched_file_is_restored_with_a_fresh_mtime_and_a_new_inode(tree: Path, tmp_path: Path) -> None:
    source = tree / "arch" / "entry.S"
    os.utime(source, (1_000_000_000, 1_000_000_000))
    twin = tmp_path / "hard-linked copy"
    os.link(source, twin)  # a `cp -al` copy of the tree shares the inode
    with patched(tree, DIFF, "two.patch") as files:
        assert files == ["arch/entry.S"]
        assert source.read_text() == MUTATED
        assert marker_path(tree).exists()
    assert source.read_text() == ORIGINAL
    assert source.stat().st_mtime > 1_000_000_000  # make rebuilds the mutant's object
    assert twin.read_text() == ORIGINAL and not os.path.samefile(source, twin)
    assert not marker_path(tree).exists() and not originals_path(tree).exists()


KILLED_INSIDE = """
import os, sys
from pathlib import Path
from pytest_syscall_irl.kernel.patching import patched, pristine
tree = Path(sys.argv[1])
with pristine(tree), patched(tree, sys.stdin.read(), "two.patch"):
    os._exit(9)  # no finally runs: a SIGKILL mid-build
"""


def test_a_tree_left_patched_by_a_killed_process_is_restored_on_next_use(tree: Path) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_INSIDE, str(tree)], input=DIFF, text=True, timeout=60)
    assert done.returncode == 9
    assert (tree / "arch" / "entry.S").read_text() == MUTATED and marker_path(tree).exists()
    said: list[str] = []
    with pristine(tree, said.append):
        assert (tree / "arch" / "entry.S").read_text() == ORIGINAL
    assert not marker_path(tree).exists() and not originals_path(tree).exists()
    assert said and "arch/entry.S" in said[0]


def test_a_reference_build_restores_a_tree_left_patched(tree: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run([sys.executable, "-c", KILLED_INSIDE, str(tree)], input=DIFF, text=True, timeout=60)
    build = KernelBuild(cache=tmp_path / "cache")
    monkeypatch.setattr(build, "_debian_tree", lambda build_log: tree)
    with (tmp_path / "build.log").open("w") as build_log, build._source(build_log) as source:
        assert (source / "arch" / "entry.S").read_text() == ORIGINAL


# -- the mutant cache, over a fake reference build -------------------------------------------------

class FakeReference(KernelBuild):
    """A reference build whose tree is *tree* and whose make copies the tree's entry.S into
    its artifacts (so they show whether the patch was applied) and counts its runs."""

    def __init__(self, cache: Path, tree: Path, fail: bool = False) -> None:
        super().__init__(cache=cache)
        self.source = tree
        self.fail = fail
        (self.directory / "obj").mkdir(parents=True)
        (self.directory / "obj" / ".config").write_text("CONFIG_X=y\n")

    @property
    def key(self) -> str:
        return "0123456789abcdef"

    @property
    def debian_tree(self) -> Path:
        return self.source

    @property
    def runs(self) -> int:
        count = self.directory / "runs"
        return len(count.read_text()) if count.exists() else 0

    def build(self) -> Path:
        return self.bzimage

    def _make(self, source: Path, *targets: str) -> list[str]:
        obj, entry = self.directory / "obj", source / "arch" / "entry.S"
        if self.fail:
            return ["sh", "-c", "echo 'entry.S:2: Error: no such instruction'; exit 2"]
        return ["sh", "-c", f"mkdir -p {obj}/arch/x86/boot && cp {entry} {obj}/arch/x86/boot/bzImage && "
                f"cp {entry} {obj}/vmlinux && printf x >> {self.directory}/runs"]


@pytest.fixture
def reference(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeReference:
    monkeypatch.setattr(mutant_module, "check_artifacts", lambda bzimage: None)  # no real kernel to load
    return FakeReference(tmp_path / "cache", tree)


@pytest.fixture
def patch_file(tmp_path: Path) -> Path:
    path = tmp_path / "two.patch"
    path.write_text(HEADER + DIFF)
    return path


def test_a_mutant_is_built_patched_then_reused_from_the_cache(reference: FakeReference, patch_file: Path,
                                                              tree: Path) -> None:
    first = MutantBuild(MutantPatch.load(patch_file), reference)
    bzimage = first.build()
    assert bzimage.read_text() == MUTATED and (bzimage.parent / "vmlinux").read_text() == MUTATED
    assert not first.from_cache and (tree / "arch" / "entry.S").read_text() == ORIGINAL
    again = MutantBuild(MutantPatch.load(patch_file), reference)
    assert again.build() == bzimage and again.from_cache and reference.runs == 1


def test_a_damaged_mutant_is_built_again(reference: FakeReference, patch_file: Path) -> None:
    bzimage = MutantBuild(MutantPatch.load(patch_file), reference).build()
    bzimage.write_text("line one\nline 3\nline three\n")  # same size, other bytes
    rebuilt = MutantBuild(MutantPatch.load(patch_file), reference)
    with pytest.warns(SyscallIrlWarning, match="damaged"):
        assert rebuilt.build().read_text() == MUTATED
    assert not rebuilt.from_cache and reference.runs == 2


def test_a_mutant_that_fails_to_build_says_so_with_the_log_tail(reference: FakeReference, patch_file: Path,
                                                                tree: Path) -> None:
    reference.fail = True
    mutant = MutantBuild(MutantPatch.load(patch_file), reference)
    with pytest.raises(KernelError, match=r"mutant two \(.*two.patch\) failed to build") as raised:
        mutant.build()
    assert "no such instruction" in str(raised.value.log_tail)
    assert (tree / "arch" / "entry.S").read_text() == ORIGINAL
    assert not mutant.directory.exists()  # nothing published


# -- the CI summary line (tests/conftest.py), under xdist ------------------------------------------

RECORDING_TESTS = """
import json
import pytest

@pytest.mark.parametrize("name, cached, verdict", [("a", False, "caught"), ("b", True, "caught"),
                                                    ("c", False, "crashed")])
def test_mutant(name, cached, verdict, record_property):
    record_property("kernel mutant", json.dumps({"name": name, "from_cache": cached, "build_s": 20.4,
                                                 "verdict": verdict}))

def test_reference(record_property):
    record_property("kernel mutants reference", "passed")
"""


def test_the_summary_line_counts_what_the_workers_recorded(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).with_name("conftest.py")).read_text())
    pytester.makepyfile(test_recording=RECORDING_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["kernel mutants: 3 built (1 from cache) in 41 s, 2 caught by their named tests, "
                                 "1 crashed (c), reference passed"])


def test_the_cli_rejects_a_bad_patch_before_building_anything(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.patch", tmp_path / "bad.patch"
    good.write_text(HEADER + DIFF)
    bad.write_text("Mutant: x\n---\n" + DIFF)
    assert cli.main(["kernel", "mutant", str(good), str(bad)]) == cli.USAGE_STATUS
    assert "bad.patch: the header lacks Table:, Tests:" in capsys.readouterr().err

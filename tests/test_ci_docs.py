"""The CI files users copy (docs/ci/) are valid and run README's commands, and those commands
are ones our tools accept."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")


def readme_ci_commands() -> list[str]:
    """The lines of the fenced block after README's <!-- ci-commands --> marker."""
    found = re.search(r"<!-- ci-commands -->\n```\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert found, "README.md has no <!-- ci-commands --> block"
    return found[1].splitlines()


def _validate(path: Path, schema: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_is_valid_against_its_schema(name: str) -> None:
    done = _validate(ROOT / "docs" / "ci" / name, WORKFLOWS[name])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_schema_check_rejects_a_broken_copy(name: str, tmp_path: Path) -> None:
    # The check can fail: a misspelt top-level key of a job is refused.
    text = (ROOT / "docs" / "ci" / name).read_text()
    broken = text.replace("runs-on:", "runs_on:") if "runs-on:" in text else text.replace("script:", "scripts:", 1)
    assert broken != text
    (tmp_path / name).write_text(broken)
    assert _validate(tmp_path / name, WORKFLOWS[name]).returncode != 0


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_the_readme_commands(name: str) -> None:
    text = (ROOT / "docs" / "ci" / name).read_text()
    for command in readme_ci_commands():
        assert command in text, f"docs/ci/{name} does not run README's `{command}`"


def test_the_readme_commands_are_accepted_by_our_tools(pytester: pytest.Pytester) -> None:
    syscall_irl = Path(sys.executable).with_name("syscall-irl")
    for command in readme_ci_commands():
        argv = shlex.split(command.split(">")[0].replace('"$FRAGMENT"', '""'))
        if argv[0] == "syscall-irl":
            # Each subcommand parses exactly these options (--help stops before doing anything).
            parser_check = subprocess.run([str(syscall_irl), *argv[1:], "--help"], capture_output=True, text=True)
            assert parser_check.returncode == 0, parser_check.stderr
        else:
            assert argv[0] == "pytest"
            result = pytester.runpytest_subprocess(*argv[1:], "--co", "-q")
            # Collecting the installed suite needs no kernel: nothing but options is checked here.
            assert "unrecognized arguments" not in result.stderr.str(), result.stderr.str()

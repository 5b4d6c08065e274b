"""The CI files users copy (docs/ci/) are valid and run README's commands, and those commands
are ones our tools accept."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    broken = text.replace("runs-on:", "runs_on:") if "runs-on:" in text else \
        text.replace("\n  script:", "\n  scripts:", 1)
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


# --- what the templates run, read from the YAML --------------------------------------------

# Options whose value is a file the command writes: a CI user wants each as an artifact.
OUTPUT_OPTIONS = ("--junitxml", "--syscall-irl-html", "--syscall-irl-kcidb", "--json", "--html")
GITLAB_KEYWORDS = {"workflow", "stages", "variables", "default", "include"}


def _load(name: str) -> dict[str, Any]:
    from ruamel.yaml import YAML  # check-jsonschema's own YAML parser, a dev dependency

    loaded: dict[str, Any] = YAML(typ="safe").load((ROOT / "docs" / "ci" / name).read_text())
    return loaded


def _github_jobs() -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = _load("github-actions.yml")["jobs"]
    return jobs


def _gitlab_jobs() -> dict[str, dict[str, Any]]:
    """Each job with what it extends merged in (GitLab's `extends`, one level deep as here)."""
    data = _load("gitlab-ci.yml")
    jobs = {name: job for name, job in data.items() if name not in GITLAB_KEYWORDS and isinstance(job, dict)}
    return {name: {**jobs.get(job.get("extends", ""), {}), **job} for name, job in jobs.items()
            if not name.startswith(".")}


def _scripts(name: str, job: dict[str, Any]) -> list[str]:
    """The shell scripts a job runs, in order."""
    if name.startswith("github"):
        return [step["run"] for step in job.get("steps", []) if "run" in step]
    return [line for key in ("before_script", "script", "after_script") for line in job.get(key, [])]


def runs_with_operator(tool: str, script: str) -> list[tuple[list[str], str | None]]:
    """The arguments of each run of *tool* in a shell *script* (quotes removed, up to the first
    operator: a pipe, a redirection, `;`, `&&`, `||`, `)`), and that operator (None: the line's end)."""
    found: list[tuple[list[str], str | None]] = []
    for line in script.replace("\\\n", " ").splitlines():
        words = list(shlex.shlex(line, posix=True, punctuation_chars=True))
        for index, word in enumerate(words):
            if word == tool or word.endswith(f"/{tool}"):
                rest = words[index + 1:]
                end = next((i for i, arg in enumerate(rest) if arg and set(arg) <= set("|&;<>()")), len(rest))
                found.append((rest[:end], rest[end] if end < len(rest) else None))
    return found


def invocations(tool: str, script: str) -> list[list[str]]:
    """The arguments of each run of *tool* in a shell *script* (runs_with_operator)."""
    return [argv for argv, _ in runs_with_operator(tool, script)]


def _job_runs(name: str, job: dict[str, Any], tool: str) -> list[list[str]]:
    return [argv for script in _scripts(name, job) for argv in invocations(tool, script)]


def _all_runs(tool: str) -> list[tuple[str, list[str]]]:
    runs = [("github-actions.yml", argv) for job in _github_jobs().values()
            for argv in _job_runs("github-actions.yml", job, tool)]
    return runs + [("gitlab-ci.yml", argv) for job in _gitlab_jobs().values()
                   for argv in _job_runs("gitlab-ci.yml", job, tool)]


def test_invocations_reads_a_command_up_to_its_shell_operator() -> None:
    script = 'x=$(syscall-irl kernel path --config "$F") && /opt/bin/syscall-irl a \\\n  b > out.txt || true'
    assert invocations("syscall-irl", script) == [["kernel", "path", "--config", "$F"], ["a", "b"]]


def test_every_syscall_irl_command_the_templates_run_is_one_our_parser_accepts(
        capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_syscall_irl.cli import main as cli

    runs = _all_runs("syscall-irl")
    assert {argv[0] for _, argv in runs} >= {"kernel", "failed-logs", "diff"}
    for name, argv in runs:
        try:
            _, unknown = cli.build_parser().parse_known_args(argv)
        except SystemExit as exc:  # a usage error; 0 for --version
            assert exc.code == 0, f"docs/ci/{name}: `syscall-irl {shlex.join(argv)}`: {capsys.readouterr().err}"
            continue
        assert not unknown, f"docs/ci/{name}: `syscall-irl {shlex.join(argv)}`: unknown {unknown}"


def test_every_pytest_option_the_templates_use_is_registered(pytester: pytest.Pytester) -> None:
    # pytest's own parser is the judge (its --help leaves out aliases such as --junitxml);
    # collecting the installed suite needs no kernel.
    runs = {tuple(argv): name for name, argv in _all_runs("pytest")}
    assert runs and all(any(arg.startswith("--syscall-irl-kcidb=") for arg in argv) for argv in runs)
    for argv, name in runs.items():
        result = pytester.runpytest_subprocess(*argv, "--co", "-q")
        assert "unrecognized arguments" not in result.stderr.str(), f"docs/ci/{name}: {result.stderr.str()}"


def test_the_option_check_can_fail(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--syscall-irl-no-such-option=1", "--co", "-q")
    assert "unrecognized arguments: --syscall-irl-no-such-option=1" in result.stderr.str()


def _lines(text: object) -> list[str]:
    """A multi-line value (restore-keys: one key a line), its lines without blanks."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _caches(name: str) -> list[tuple[str, str, list[str]]]:
    """(job, key, restore keys) of each cache a template keeps."""
    if name.startswith("github"):
        return [(job_name, step["with"]["key"], _lines(step["with"].get("restore-keys", "")))
                for job_name, job in _github_jobs().items() for step in job["steps"]
                if str(step.get("uses", "")).startswith("actions/cache@")]
    return [(job_name, str(cache["key"]), list(cache.get("fallback_keys", [])))
            for job_name, job in _gitlab_jobs().items() if "cache" in job
            for cache in (job["cache"] if isinstance(job["cache"], list) else [job["cache"]])]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_caches_restore_an_older_entry_and_are_not_one_per_commit(name: str) -> None:
    caches = _caches(name)
    assert {job for job, _, _ in caches} >= {"kernel"}  # ccache where the kernels are built
    for job, key, restore in caches:
        assert restore, f"docs/ci/{name}: the cache {key} of {job} has no restore (fallback) keys"
        assert not re.search(r"github\.sha|CI_COMMIT_(SHORT_)?SHA", key), f"{key}: one entry per commit"
        if name.startswith("github"):  # actions/cache restores the newest entry whose key starts so
            assert all(key.startswith(prefix) and key != prefix for prefix in restore), (key, restore)


def test_ccache_is_keyed_on_the_kernel_version_and_the_fragments() -> None:
    steps = {step.get("id"): step for step in _github_jobs()["kernel"]["steps"]}
    assert "make -s kernelversion" in steps["ccache-key"]["run"] and "fragment sha256" in steps["ccache-key"]["run"]
    (_, key, _), = [cache for cache in _caches("github-actions.yml") if cache[0] == "kernel"]
    assert "steps.ccache-key.outputs.version" in key and "steps.ccache-key.outputs.fragments" in key
    assert all("--ccache" in argv for _, argv in _all_runs("syscall-irl") if argv[:2] == ["kernel", "build"])


def test_the_github_workflow_reads_only_and_cancels_a_superseded_run() -> None:
    workflow = _load("github-actions.yml")
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow["concurrency"]["cancel-in-progress"] is True
    assert "github.event.pull_request.number" in workflow["concurrency"]["group"]


def test_the_gitlab_pipeline_cancels_a_superseded_run() -> None:
    data = _load("gitlab-ci.yml")
    assert data["workflow"]["auto_cancel"]["on_new_commit"] == "interruptible"
    assert data["default"]["interruptible"] is True


def _builds(name: str, job: dict[str, Any]) -> list[list[str]]:
    return [argv for argv in _job_runs(name, job, "syscall-irl")
            if argv[:2] == ["kernel", "build"] and "--dry-run" not in argv and "-n" not in argv]


def test_the_github_matrix_builds_the_base_and_the_patched_kernel_once_each() -> None:
    jobs = _github_jobs()
    building = [name for name, job in jobs.items() if _builds("github-actions.yml", job)]
    assert building == ["kernel"], f"jobs that build a kernel: {building}"
    matrix = jobs["kernel"]["strategy"]["matrix"]
    assert list(matrix) == ["include"], "a matrix axis beside the kernels would build each kernel again"
    refs = {entry["kernel"]: entry["ref"] for entry in matrix["include"]}
    assert len(refs) == len(matrix["include"]), "a kernel built twice"
    assert refs == {"base": "${{ github.event.pull_request.base.sha }}", "patched": "${{ github.sha }}"}
    checkout, = [step for step in jobs["kernel"]["steps"] if str(step.get("uses", "")).startswith("actions/checkout")]
    assert checkout["with"]["ref"] == "${{ matrix.ref }}"
    # The suite and the diff take the kernels built there.
    assert set(jobs["suite"]["strategy"]["matrix"]["kernel"]) == set(refs)
    for name in ("suite", "diff"):
        assert jobs[name]["needs"] == "kernel"
        downloads = [step["with"]["name"] for step in jobs[name]["steps"]
                     if str(step.get("uses", "")).startswith("actions/download-artifact")]
        assert downloads and all(download.startswith("kernel-") for download in downloads), downloads


def test_the_gitlab_pipeline_builds_each_kernel_once() -> None:
    jobs = _gitlab_jobs()
    building = [name for name, job in jobs.items() if _builds("gitlab-ci.yml", job)]
    assert building == ["kernel"], f"jobs that build a kernel: {building}"
    matrix = jobs["kernel"]["parallel"]["matrix"]
    assert matrix == [{"KERNEL": ["base", "patched"]}]
    assert {job["variables"]["KERNEL"] for name, job in jobs.items() if name.startswith("suite")} == \
        {"base", "patched"}
    assert all(job.get("needs") == ["kernel"] for name, job in jobs.items() if name != "kernel")


def _uploads(name: str, job: dict[str, Any]) -> list[str]:
    if name.startswith("github"):
        return [path for step in job["steps"] if str(step.get("uses", "")).startswith("actions/upload-artifact")
                for path in str(step["with"]["path"]).split()]
    return list(job.get("artifacts", {}).get("paths", []))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_report_a_command_writes_is_an_artifact(name: str) -> None:
    jobs = _github_jobs() if name.startswith("github") else _gitlab_jobs()
    written: list[str] = []
    for job in jobs.values():
        uploads = [Path(path) for path in _uploads(name, job)]
        for argv in _job_runs(name, job, "pytest") + _job_runs(name, job, "syscall-irl"):
            outputs = [Path(arg.partition("=")[2] or argv[index + 1]) for index, arg in enumerate(argv)
                       if arg.partition("=")[0] in OUTPUT_OPTIONS]
            for output in outputs:
                assert any(output == up or output.is_relative_to(up) for up in uploads), \
                    f"docs/ci/{name}: {output} is written but not kept as an artifact"
            written += [output.name for output in outputs]
    assert set(written) >= {"junit.xml", "paths.html", "kcidb.json", "diff.html", "diff.json"}


def test_a_changed_path_fails_the_diff_job() -> None:
    # The diff's exit status reaches the job: nothing after it on its line but a redirection.
    for name, jobs in (("github-actions.yml", _github_jobs()), ("gitlab-ci.yml", _gitlab_jobs())):
        assert not jobs["diff"].get("continue-on-error") and not jobs["diff"].get("allow_failure")
        runs = [run for script in _scripts(name, jobs["diff"]) for run in runs_with_operator("syscall-irl", script)
                if run[0][:1] == ["diff"]]
        assert len(runs) == 1 and runs[0][1] in (None, ">"), runs


def test_the_github_jobs_summarise_each_kernels_identity_and_results() -> None:
    jobs = _github_jobs()
    for name in ("kernel", "suite", "diff"):
        summaries = [step for step in jobs[name]["steps"] if "GITHUB_STEP_SUMMARY" in step.get("run", "")]
        assert summaries, f"the {name} job writes no summary"
        assert "identity.txt" in summaries[-1]["run"], f"the {name} job's summary does not name its kernels"
        if name != "kernel":
            assert summaries[-1].get("if") == "always()", f"the {name} job's summary is lost when it fails"
    identity = next(step["run"] for step in jobs["kernel"]["steps"] if "identity.txt" in step.get("run", ""))
    assert all(part in identity for part in ("release", "sha256sum", "git rev-parse HEAD"))

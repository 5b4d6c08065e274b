"""The kernel build's progress line: steps counted from kbuild's output, total and ETA from the
last finished build with the same fragment."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pytest_syscall_irl.kernel.progress import BuildProgress, previous_steps

MAKE_OUTPUT = ["make[1]: Entering directory '/obj'", "  GEN     Makefile", "  CC      kernel/fork.o",
               "In file included from x.c:1:", "  AS      arch/x86/entry/entry_64.o", "  LD      vmlinux"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_steps_elapsed_and_eta() -> None:
    clock, shown = _Clock(), []
    progress = BuildProgress(shown.append, total=8, interval=0.0, clock=clock)
    for line in MAKE_OUTPUT:
        clock.now += 10
        progress.feed(line)
    # 4 kbuild steps in 60 s: 4 more at that pace take 60 s.
    assert progress.steps == 4
    assert shown[-1] == "building: 4/~8 steps (50%), 1:00 elapsed, ETA 1:00"


def test_without_a_total_no_eta_and_updates_are_rate_limited() -> None:
    clock, shown = _Clock(), []
    progress = BuildProgress(shown.append, interval=15.0, clock=clock)
    for line in MAKE_OUTPUT * 3:
        clock.now += 1
        progress.feed(line)
    assert len(shown) == 2 and shown[-1].startswith("building: ") and "ETA" not in shown[-1]
    assert progress.render() == f"building: {progress.steps} steps, 0:18 elapsed"


def test_total_comes_from_the_latest_build_of_the_same_fragment(tmp_path: Path) -> None:
    for age, (key, sha, steps) in enumerate([("a", "f1", 2000), ("b", "f2", 900), ("c", "f1", 2100),
                                             ("d", "f1", "junk")]):
        (tmp_path / key).mkdir()
        (tmp_path / key / "complete").write_text(json.dumps({"fragment_sha256": sha, "steps": steps}))
        os.utime(tmp_path / key / "complete", (1_000_000 + age, 1_000_000 + age))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "complete").write_text("{half written")
    assert previous_steps(tmp_path, "f1") == 2100  # "d" is later but has no usable count
    assert previous_steps(tmp_path, "f2") == 900
    assert previous_steps(tmp_path, "f3") is None

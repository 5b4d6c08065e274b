"""What the plugin costs a pytest run that uses none of its fixtures (it is loaded by every
run in its environment): the same unrelated test file run with the plugin and with
`-p no:syscall_irl`, interleaved, in fresh interpreters; and the plugin module's import alone.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from probes import Samples

UNRELATED = "import pytest\n\n@pytest.mark.parametrize('n', range(20))\ndef test_n(n):\n    assert n >= 0\n"


@dataclass
class PluginOverhead:
    with_plugin: Samples = field(default_factory=Samples)
    without_plugin: Samples = field(default_factory=Samples)
    import_plugin: Samples = field(default_factory=Samples)
    import_pytest: Samples = field(default_factory=Samples)
    plugin_import_own: Samples = field(default_factory=Samples)

    @property
    def added(self) -> float:
        """Median wall time the plugin adds to the run (import + hooks)."""
        return self.with_plugin.median - self.without_plugin.median


def _wall(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _own_import_time(cwd: Path) -> float:
    """Cumulative import time of pytest_syscall_irl.plugin alone (pytest already imported), from
    `python -X importtime`: what the plugin costs, without the noise of whole interpreter starts."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pytest; import pytest_syscall_irl.plugin"],
                          cwd=cwd, capture_output=True, text=True, check=True)
    for line in done.stderr.splitlines():
        parts = [part.strip() for part in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == "pytest_syscall_irl.plugin":
            return int(parts[1]) / 1e6
    raise RuntimeError("pytest_syscall_irl.plugin not in -X importtime output")


def plugin_overhead(samples: int) -> PluginOverhead:
    """Interleaved runs, so load on the machine hits both sides alike."""
    result = PluginOverhead()
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_unrelated.py"]
    with tempfile.TemporaryDirectory(prefix="sirl-bench-overhead-") as tmp:
        cwd = Path(tmp)
        (cwd / "test_unrelated.py").write_text(UNRELATED)
        for _ in range(samples):
            result.with_plugin.add(_wall(pytest_cmd, cwd))
            result.without_plugin.add(_wall([*pytest_cmd, "-p", "no:syscall_irl"], cwd))
            result.import_plugin.add(_wall([sys.executable, "-c", "import pytest, pytest_syscall_irl.plugin"], cwd))
            result.import_pytest.add(_wall([sys.executable, "-c", "import pytest"], cwd))
            result.plugin_import_own.add(_own_import_time(cwd))
    return result

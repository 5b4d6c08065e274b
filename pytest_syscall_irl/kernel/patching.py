"""A patch applied to a cached kernel source tree for one build, and always undone, even
after the process applying it died half-way.

    with pristine(tree):                       # the tree held, a leftover patch undone
        with patched(tree, diff, "x.patch"):   # applied; undone on leaving, however we leave
            make ...

Before patching, the original bytes of every file the patch touches are saved beside the
tree and a marker (which files, where their originals are) is written; `pristine` finds a
marker a killed process left and restores the tree from it before anyone builds from it
(KernelBuild does so before every build of Debian's source). A file is restored by writing
its original bytes to a new file renamed over it: a fresh mtime, so that make rebuilds its
object (a copy with the old mtime would leave the mutant's object in place), and a new
inode, so that a hard-linked copy of the tree (`cp -al`) is never written through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core import procs
from ..core.cache import waiting_lock
from ..core.errors import ConfigError, KernelError
from ..core.integrity import atomic_write

log = logging.getLogger(__name__)

Say = Callable[[str], None]
PATCH_TIMEOUT = 60.0
# GNU patch names each file it would change; the one list of touched files that cannot
# disagree with what patch does (renames, creations, odd headers).
CHECKING = re.compile(r"^checking file (.+)$", re.MULTILINE)


def marker_path(tree: Path) -> Path:
    """The marker of a patch applied to *tree*: beside the tree, never inside (make never sees it)."""
    return tree.with_name(tree.name + ".patched.json")


def originals_path(tree: Path) -> Path:
    """Where the original files of a patched *tree* are saved."""
    return tree.with_name(tree.name + ".patched")


@contextmanager
def pristine(tree: Path, say: Say | None = None) -> Iterator[None]:
    """Hold *tree* (no patch is applied to it meanwhile) with any patch a killed process
    left in it undone first."""
    with waiting_lock(tree.with_name(tree.name + ".patch.lock"), f"a build from the source tree {tree.name}", say,
                      error=KernelError):
        restore(tree, say)
        yield


def restore(tree: Path, say: Say | None = None) -> list[str]:
    """Undo the patch whose marker is beside *tree* (the caller holds the tree); the files
    restored. Idempotent: a restore cut short is finished by the next one. *say* hears of
    a restore (`pristine` passes it: a patch a killed process left)."""
    marker = marker_path(tree)
    saved = originals_path(tree)
    if not marker.exists():
        shutil.rmtree(saved, ignore_errors=True)  # saved before a marker that was never written
        return []
    try:
        files: dict[str, str | None] = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KernelError(f"the patch marker {marker} is unreadable ({exc}): the source tree {tree} may hold a "
                          f"mutant's change; delete {tree} and its marker, the next build extracts it again") from exc
    for name, original in files.items():
        _put_back(tree / name, saved / original if original is not None else None)
    marker.unlink()
    shutil.rmtree(saved, ignore_errors=True)
    log.info("restored %s in %s", ", ".join(files), tree)
    if say is not None:
        say(f"restored {', '.join(files)} in {tree}: a process killed while building a mutant left its patch "
            "applied")
    return list(files)


def _put_back(path: Path, original: Path | None) -> None:
    """*path* made its *original* again by rename (None: the patch created it: removed)."""
    if original is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(original.read_bytes())
        shutil.copymode(original, name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


@contextmanager
def patched(tree: Path, diff: str, name: str) -> Iterator[list[str]]:
    """*diff* applied to *tree* (`patch -p1 --forward`) while inside; yields the files it
    touched. The caller holds the tree (`pristine`). A diff that does not apply exactly is a
    ConfigError naming *name* with patch's output; nothing is changed then."""
    files = touched_files(tree, diff, name)
    _save(tree, files)
    try:
        _patch(tree, diff, name, dry_run=False)
        yield files
    finally:
        restore(tree)


def touched_files(tree: Path, diff: str, name: str) -> list[str]:
    """The files *diff* would change in *tree* (a dry run); ConfigError if it does not apply."""
    output = _patch(tree, diff, name, dry_run=True)
    files = CHECKING.findall(output)
    if not files:
        raise ConfigError(f"{name}: patch found no file to change in it: is it a unified diff with a/ b/ paths "
                          f"relative to the kernel source root?\n{output}")
    return files


def _save(tree: Path, files: list[str]) -> None:
    """Save the originals, then write the marker: a death before the marker leaves the tree
    untouched and the copies are swept by the next `restore`."""
    saved = originals_path(tree)
    shutil.rmtree(saved, ignore_errors=True)
    saved.mkdir(parents=True)
    index: dict[str, str | None] = {}
    for number, name in enumerate(files):
        source = tree / name
        if source.is_file():
            shutil.copyfile(source, saved / str(number))
            shutil.copymode(source, saved / str(number))
            index[name] = str(number)
        else:
            index[name] = None
    atomic_write(marker_path(tree), json.dumps({"files": index}, indent=1))


def _patch(tree: Path, diff: str, name: str, *, dry_run: bool) -> str:
    # --fuzz=0: a mutant is exactly its diff; a context that only fuzzily matches is a
    # patch written against another source. No backups or reject files in the tree.
    command = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch",
               "--reject-file=-", "-d", str(tree), *(["--dry-run"] if dry_run else [])]
    try:
        done = procs.run(command, diff, PATCH_TIMEOUT)
    except FileNotFoundError as exc:
        raise KernelError("`patch` is not installed: apt-get install patch") from exc
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"`patch` took over {PATCH_TIMEOUT:.0f} s on {name}", command=command) from exc
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        error = ConfigError if dry_run else KernelError
        raise error(f"{name} does not apply to {tree} (patch -p1 --forward --fuzz=0, exit {done.returncode}); fix "
                    f"the diff against that source:\n{output}")
    return output

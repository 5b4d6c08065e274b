"""Debian's packaged kernels, fetched into the cache to be tested without installing them.

    fetched = DebianKernel("linux-image-cloud-amd64").fetch()
    fetched.bzimage, fetched.vmlinux, fetched.modules   # vmlinuz, the -dbg vmlinux, lib/modules/<release>

`apt-get download` fetches the image package (vmlinuz and modules) and its `-dbg` twin (the
vmlinux with DWARF) as an ordinary user; `dpkg-deb` unpacks them under
<cache>/debian-kernels/<package>_<version>/ and `depmod` writes the modules.dep that Debian's
postinst would (the package ships none). Nothing is installed: no initramfs is generated, no
bootloader touched, and the machine's own kernels are left alone. A meta-package
(`linux-image-cloud-amd64`, `linux-image-6.12-cloud-amd64`) stands for the image it depends on
today, so the same command follows Debian's updates.

A fetched kernel is a cache entry (`core.cache`): unpacked in a staging directory, recorded
(size, mtime and SHA-256 of every file) and renamed into place whole; one that no
longer matches its record is fetched again, with a warning, never trusted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.cache import CacheEntry
from ..core.errors import ConfigError, KernelError, tail

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
RECORD = "complete"
COMMAND_TIMEOUT = 1800.0  # one apt-get download of ~300 MB on a slow mirror
# An image package's name: linux-image-<release>, the release starting with a digit. Meta-packages
# may look alike (linux-image-6.12-cloud-amd64): what tells them apart is their Depends.
CONCRETE = re.compile(r"^linux-image-\d\S*$")


def parse_stanza(text: str) -> dict[str, str]:
    """The fields of the first package stanza of `apt-cache show` output (continuations joined)."""
    fields: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and name is not None:
            fields[name] += "\n" + line.strip()
            continue
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def image_dependency(fields: Mapping[str, str]) -> str | None:
    """The concrete image package a meta-package's Depends names (`linux-image-6.1.0-57-cloud-amd64`)."""
    for alternative in re.split(r"[,|]", fields.get("Depends", "")):
        name = alternative.strip().split(" ", 1)[0]
        if CONCRETE.match(name) and not name.endswith("-dbg") and not name.endswith("-unsigned"):
            return name
    return None


@dataclass(frozen=True)
class FetchedKernel:
    """A Debian kernel unpacked in the cache: the three things `--syscall-irl-kernel`, `-vmlinux`, `-modules` take."""

    directory: Path
    release: str

    @property
    def bzimage(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def modules(self) -> Path:
        return self.directory / "modules"

    def options(self) -> list[str]:
        """The pytest options that test this kernel."""
        return [f"--syscall-irl-kernel={self.bzimage}", f"--syscall-irl-vmlinux={self.vmlinux}",
                f"--syscall-irl-modules={self.modules}"]


def _depmod() -> str:
    """depmod, also where a user's PATH lacks /usr/sbin (Debian's default for non-root users)."""
    found = shutil.which("depmod") or next(
        (path for path in ("/usr/sbin/depmod", "/sbin/depmod") if os.access(path, os.X_OK)), None)
    return found or "depmod"  # not installed: _command names the package


def _entry(directory: Path) -> CacheEntry:
    # vmlinuz, the file QEMU boots, is checked by SHA-256 on every use; the 590 MB vmlinux by
    # size and mtime, and by its SHA-256 (a few seconds) only when its mtime differs.
    return CacheEntry(directory, "Debian kernel", record=RECORD, digest=lambda name: name == "vmlinuz",
                      check=_release_problem, error=KernelError)


def _release_problem(directory: Path) -> str | None:
    return None if isinstance(_entry(directory).meta().get("release"), str) else f"{RECORD} names no release"


def seal(directory: Path, release: str, source: Mapping[str, str]) -> None:
    """Record what *directory* holds now (see `damage`), with the release and the packages."""
    _entry(directory).seal({"release": release, "packages": dict(source)})


def damage(directory: Path) -> str | None:
    """Why the fetched kernel in *directory* cannot be used as it stands ("not built" if it never was)."""
    return _entry(directory).problem()


class DebianKernel:
    """One Debian kernel image package (or a meta-package naming one) and its -dbg package."""

    def __init__(self, package: str, cache: Path, *, on_stage: Progress | None = None,
                 runner: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> None:
        if not package.startswith("linux-image-") or package.endswith("-dbg"):
            raise ConfigError(f"{package!r} is not a Debian kernel image package: name one such as "
                              "linux-image-cloud-amd64 or linux-image-6.12-cloud-amd64 (its -dbg twin is fetched too)")
        self.package = package
        self.cache = cache
        self._on_stage = on_stage
        self._runner = runner

    # -- resolving names ---------------------------------------------------------------------

    def _apt_cache_show(self, package: str) -> dict[str, str]:
        done = self._command(["apt-cache", "show", "--no-all-versions", package], check=False)
        fields = parse_stanza(done.stdout) if done.returncode == 0 else {}
        if not fields.get("Version"):
            raise ConfigError(f"apt knows no package {package}: check the name (`apt-cache search "
                              f"linux-image-`) or refresh the package lists (`apt-get update`)")
        return fields

    def resolve(self) -> tuple[str, str]:
        """(image package, version): the package itself, or the image a meta-package depends on
        (followed through meta-packages; an image package depends on no other image)."""
        image, fields = self.package, self._apt_cache_show(self.package)
        for _ in range(4):
            named = image_dependency(fields)
            if named is None:
                break
            image, fields = named, self._apt_cache_show(named)
        if image == self.package and not CONCRETE.match(image):
            raise ConfigError(f"{self.package} names no kernel image package in its Depends "
                              f"({fields.get('Depends', 'none')!r}): name the image package itself")
        return image, fields["Version"]

    # -- fetching ----------------------------------------------------------------------------

    def directory_for(self, image: str, version: str) -> Path:
        return self.cache / "debian-kernels" / f"{image}_{version.replace(':', '%3a')}"

    def fetch(self) -> FetchedKernel:
        """The kernel unpacked in the cache: reused if complete and intact, fetched (again,
        with a warning) otherwise."""
        image, version = self.resolve()
        entry = _entry(self.directory_for(image, version))
        if not entry.ensure(lambda staging: self._unpack(image, version, staging), say=self._stage):
            self._stage(f"reusing {entry.path}")
        return FetchedKernel(entry.path, str(entry.meta()["release"]))

    def _unpack(self, image: str, version: str, staging: Path) -> dict[str, object]:
        """Download *image* and its -dbg twin and lay out their kernel in *staging*."""
        # Beside the staging directory and named after it, so that one a killed fetch leaves is swept.
        scratch = Path(tempfile.mkdtemp(prefix=f"{staging.name}.download-", dir=staging.parent))
        try:
            # apt-get download run as root hands the download to the _apt user, which must
            # be able to write there (else a warning and an unsandboxed download).
            os.chmod(scratch, 0o777)
            dbg = f"{image}-dbg"
            self._stage(f"downloading {image}={version} and {dbg}={version} (about 300 MB)")
            self._command(["apt-get", "download", "-q", f"{image}={version}", f"{dbg}={version}"], cwd=scratch)
            debs = {p.name.split("_", 1)[0]: p for p in scratch.glob("*.deb")}
            if set(debs) != {image, dbg}:
                raise KernelError(f"apt-get download left {sorted(debs)} in {scratch}, not {image} and {dbg}")
            root = scratch / "root"
            self._stage(f"unpacking {debs[image].name} and the vmlinux of {debs[dbg].name}")
            self._command(["dpkg-deb", "-x", str(debs[image]), str(root)])
            self._command(["bash", "-o", "pipefail", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" '
                           "--wildcards './usr/lib/debug/boot/vmlinux-*'", "bash", str(debs[dbg]), str(root)])
            release = self._layout(root, staging, image)
            self._stage(f"{image} {version}: release {release}")
            return {"release": release, "packages": {"image": f"{image}={version}", "dbg": f"{dbg}={version}"}}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _layout(self, root: Path, target: Path, image: str) -> str:
        """Move vmlinuz, vmlinux and the module directory of *root* (an unpacked tree) into *target*
        (an empty directory); the kernel's release."""
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise KernelError(f"{image} holds {len(kernels)} /boot/vmlinuz-* files, expected one")
        release = kernels[0].name.removeprefix("vmlinuz-")
        vmlinux = root / "usr/lib/debug/boot" / f"vmlinux-{release}"
        if not vmlinux.is_file():
            raise KernelError(f"{image}-dbg holds no /usr/lib/debug/boot/vmlinux-{release}")
        found = [root / prefix / release for prefix in ("lib/modules", "usr/lib/modules")]
        modules = next((path for path in found if path.is_dir()), None)
        if modules is None:
            raise KernelError(f"{image} holds no module directory for {release}")
        # Debian's postinst runs depmod; the package ships no modules.dep. depmod -b looks in
        # BASE/lib/modules or BASE/usr/lib/modules (kmod's build decides): give it both.
        base = root / "depmod"
        (base / "lib/modules").mkdir(parents=True)
        (base / "usr/lib").mkdir(parents=True)
        (base / "usr/lib/modules").symlink_to("../../lib/modules")
        os.rename(modules, base / "lib/modules" / release)
        modules = base / "lib/modules" / release
        self._command([_depmod(), "-b", str(base), release])
        if not (modules / "modules.dep").is_file():
            raise KernelError(f"depmod -b {base} {release} wrote no modules.dep")
        os.rename(kernels[0], target / "vmlinuz")
        config = root / "boot" / f"config-{release}"
        if config.is_file():  # the kernel's identity hashes it (report/identity.py finds `config` beside)
            os.rename(config, target / "config")
        os.rename(vmlinux, target / "vmlinux")
        os.rename(modules, target / "modules")
        return release

    # -- helpers -----------------------------------------------------------------------------

    def _command(self, command: list[str], *, cwd: Path | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        log.debug("running %s", command)
        try:
            done = self._runner(command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                stdin=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise KernelError(f"{command[0]} is not installed: fetching Debian kernels needs apt, dpkg and "
                              "kmod (apt-get install kmod)") from exc
        except subprocess.TimeoutExpired as exc:
            raise KernelError(f"{command[0]} did not finish in {COMMAND_TIMEOUT:.0f} s", command=command) from exc
        if check and done.returncode != 0:
            raise KernelError(f"{command[0]} failed", command=command, exit_code=done.returncode,
                              log_tail=tail((done.stdout or "") + (done.stderr or "")))
        return done

    def _stage(self, message: str) -> None:
        log.info("%s", message)
        if self._on_stage is not None:
            self._on_stage(message)

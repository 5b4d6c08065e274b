"""Guest snapshots: the cache key, the build-once store, and restored guests on the real
QEMU and reference kernel (built into a temporary cache, never the user's)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_syscall_irl.core import procs
from pytest_syscall_irl.core.errors import QemuError, SyscallIrlWarning
from pytest_syscall_irl.machine.gdbmi import GdbSession
from pytest_syscall_irl.lab.gdb_index import gnu_build_id, warm_gdb_index
from pytest_syscall_irl.lab.guest import Guest, Lab
from pytest_syscall_irl.lab.settings import LabSettings
from pytest_syscall_irl.kernel.artifacts import Kernel
from pytest_syscall_irl.kernel.build import reference_kernel
from pytest_syscall_irl.machine.qemu import MachineConfig, QemuMachine, Sockets, qemu_command
from pytest_syscall_irl.lab.snapshot import (
    Snapshot,
    SnapshotInfo,
    load_or_build,
    machine_arguments,
    qemu_identity,
    snapshot_dir,
    snapshot_key,
)

QEMU_ID = "QEMU emulator version 7.2.22\n/usr/bin/qemu-system-x86_64 1 2"


# --- the key ---------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> MachineConfig:
    for name, data in (("bzImage", b"kernel"), ("initrd", b"initramfs"), ("p.iso", b"iso")):
        (tmp_path / name).write_bytes(data)
    return MachineConfig(kernel=tmp_path / "bzImage", initrd=tmp_path / "initrd", iso=tmp_path / "p.iso")


def test_key_is_stable_for_the_same_inputs(config: MachineConfig) -> None:
    key = snapshot_key(config, QEMU_ID)
    assert len(key) == 16 and key == snapshot_key(dataclasses.replace(config), QEMU_ID)


@pytest.mark.parametrize("name", ["bzImage", "initrd", "p.iso"])
def test_key_changes_with_file_contents_at_the_same_path(config: MachineConfig, tmp_path: Path, name: str) -> None:
    before = snapshot_key(config, QEMU_ID)
    (tmp_path / name).write_bytes(b"changed")
    assert snapshot_key(config, QEMU_ID) != before


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mb": 512},
        {"cpus": 2},
        {"append": "console=ttyS0 quiet"},
        {"accel": "kvm"},
        {"extra_args": ("-cpu", "max")},
        {"iso": None},
        {"qemu": "/opt/qemu/bin/qemu-system-x86_64"},
        {"channel": False},  # the agent's serial port: its guest talks on ttyS0 instead
    ],
)
def test_key_changes_with_the_machine_arguments(config: MachineConfig, change: dict[str, object]) -> None:
    changed = dataclasses.replace(config, **change)  # type: ignore[arg-type]
    assert snapshot_key(changed, QEMU_ID) != snapshot_key(config, QEMU_ID)


def test_key_changes_with_the_qemu_build(config: MachineConfig) -> None:
    assert snapshot_key(config, QEMU_ID.replace("7.2.22", "8.0.0")) != snapshot_key(config, QEMU_ID)
    assert snapshot_key(config, QEMU_ID.replace(" 1 2", " 1 3")) != snapshot_key(config, QEMU_ID)


def test_key_ignores_sockets_logs_and_the_incoming_state(config: MachineConfig, tmp_path: Path) -> None:
    assert snapshot_key(dataclasses.replace(config, incoming=tmp_path / "state"), QEMU_ID) == snapshot_key(
        config, QEMU_ID
    )
    args = machine_arguments(config)
    assert "-incoming" not in args and not any("/tmp/sirl-" in arg for arg in args)
    real = qemu_command(config, Sockets(Path("/tmp/sirl-abc")), tmp_path / "console.log")
    assert len(args) == len(real)  # the same command line, per-machine paths replaced


def test_incoming_is_added_to_the_command_line_quoted(config: MachineConfig) -> None:
    command = qemu_command(
        dataclasses.replace(config, incoming=Path("/c/snap shot/state")), Sockets(Path("/s")), Path("/l")
    )
    assert command[command.index("-incoming") + 1] == "exec:cat '/c/snap shot/state'"
    assert "-S" in command  # restored paused: the console connects before the guest runs


def _fake_qemu(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    path.chmod(0o755)
    return str(path)


def test_qemu_identity_has_the_version_and_notices_a_replaced_binary(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path / "qemu", "7.2.22")
    first = qemu_identity(qemu)
    assert first.startswith("QEMU emulator version 7.2.22\n") and str(tmp_path / "qemu") in first
    _fake_qemu(tmp_path / "qemu", "7.2.22 (rebuilt)")  # a new binary: its size and mtime differ
    os.utime(qemu, ns=(0, 12345))
    assert qemu_identity(qemu) != first


def test_qemu_identity_of_a_missing_qemu_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="not found"):
        qemu_identity(str(tmp_path / "no-such-qemu"))


# --- the store -------------------------------------------------------------------------------


def _builder(calls: list[Path], delay: float = 0.0) -> Callable[[Path], SnapshotInfo]:
    def build(state: Path) -> SnapshotInfo:
        calls.append(state)
        time.sleep(delay)
        state.write_bytes(b"QEVM")
        return SnapshotInfo("iso", "6.1.0", 1.5)

    return build


def test_store_builds_once_and_then_reads(tmp_path: Path) -> None:
    calls: list[Path] = []
    first = load_or_build(tmp_path, "k1", _builder(calls))
    second = load_or_build(tmp_path, "k1", _builder(calls))
    assert len(calls) == 1 and first == second
    assert first.directory == snapshot_dir(tmp_path, "k1") and first.key == "k1"
    assert first.state.read_bytes() == b"QEVM" and first.info == SnapshotInfo("iso", "6.1.0", 1.5)


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(state: Path) -> SnapshotInfo:
        state.write_bytes(b"half")
        raise QemuError("boot failed")

    with pytest.raises(QemuError):
        load_or_build(tmp_path, "k1", broken)
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == ["k1.lock"]
    calls: list[Path] = []
    load_or_build(tmp_path, "k1", _builder(calls))
    assert len(calls) == 1


def test_a_damaged_snapshot_is_built_again(tmp_path: Path) -> None:
    calls: list[Path] = []
    snapshot = load_or_build(tmp_path, "k1", _builder(calls))
    snapshot.state.unlink()
    assert Snapshot.read(snapshot.directory) is None
    with pytest.warns(SyscallIrlWarning, match=r"snapshots/k1 is damaged \(state is missing\): building it again"):
        again = load_or_build(tmp_path, "k1", _builder(calls))
    assert len(calls) == 2 and again.state.is_file()


def test_a_snapshot_whose_info_does_not_parse_is_built_again_with_a_warning(tmp_path: Path) -> None:
    from pytest_syscall_irl.core.integrity import seal_directory

    calls: list[Path] = []
    snapshot = load_or_build(tmp_path, "k1", _builder(calls))
    (snapshot.directory / "info.json").write_text("{")
    seal_directory(snapshot.directory)  # the record matches: only reading the info tells
    with pytest.warns(SyscallIrlWarning, match=r"snapshots/k1 is damaged \(info.json is unreadable\)"):
        again = load_or_build(tmp_path, "k1", _builder(calls))
    assert len(calls) == 2 and again.info == SnapshotInfo("iso", "6.1.0", 1.5)


def test_threads_asking_at_once_build_once(tmp_path: Path) -> None:
    calls: list[Path] = []
    results: list[Snapshot] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_build(tmp_path, "k", _builder(calls, 0.3))))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1


CHILD = """
import sys, time
from pathlib import Path
from pytest_syscall_irl.lab.snapshot import SnapshotInfo, load_or_build
def build(state):
    with open(sys.argv[2], "a") as f:
        f.write("built\\n")
    time.sleep(0.5)
    state.write_bytes(b"QEVM")
    return SnapshotInfo("iso", "6.1.0", 1.0)
print(load_or_build(Path(sys.argv[1]), "k", build).directory)
"""


def test_processes_asking_at_once_build_once(tmp_path: Path) -> None:
    count = tmp_path / "builds"
    children = [
        procs.spawn(
            [sys.executable, "-c", CHILD, str(tmp_path / "cache"), str(count)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            procs.stop(child)
    assert [child.returncode for child in children] == [0, 0, 0]
    assert count.read_text() == "built\n" and len(set(outputs)) == 1


# --- restored guests (real QEMU, reference kernel) ------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Kernel:
    path = reference_kernel()
    if path is None:
        pytest.skip("reference kernel not built: syscall-irl kernel build")
    return Kernel.load(path)


def _settings(kernel: Kernel, cache: Path, **changes: object) -> LabSettings:
    # TCG: the tests are about snapshots, and an "auto" probe would cost seconds per cache.
    settings = LabSettings(
        kernel=kernel,
        qemu=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        gdb=shutil.which("gdb") or "gdb",
        accel="tcg",
        boot_args="",
        cache=cache,
    )
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lab(reference: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return Lab(_settings(reference, tmp_path_factory.mktemp("cache")), tmp_path_factory.mktemp("logs"))


@pytest.fixture
def restored(lab: Lab) -> Iterator[Guest]:
    guest = lab.boot()
    yield guest
    guest.shutdown()


def _snapshots(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "snapshots").iterdir() if p.is_dir())


@pytest.mark.integration
def test_restore_gives_a_working_guest(lab: Lab, restored: Guest, reference: Kernel) -> None:
    assert restored.restored and restored.is_alive()
    assert restored.boot_seconds < lab.snapshot().info.boot_seconds
    assert (restored.delivery, restored.console.release) == (lab.image.delivery, reference.release)
    assert restored.run("echo syscall_irl").output == "syscall_irl\n"
    result = restored.run(restored.payload("syscall_irl").guest_path)
    assert (result.output, result.status) == ("syscall_irl\n", 0)
    assert restored.run("cat /proc/sys/kernel/osrelease").output.strip() == reference.release


@pytest.mark.integration
def test_gdb_attaches_to_a_restored_guest_as_to_a_booted_one(lab: Lab, restored: Guest, reference: Kernel) -> None:
    with GdbSession(reference.vmlinux.path, gdb=lab.settings.gdb, index_cache_dir=lab.settings.gdb_index_cache) as gdb:
        gdb.connect(restored.gdb_socket)
        regs = gdb.registers()
        assert regs["rip"] >= 0xFFFFFFFF80000000 and regs["cs"] & 3 == 0
        restored.debugger = gdb
        ksys_write = reference.vmlinux.symbol("ksys_write")
        gdb.break_insert(f"*{ksys_write:#x}", condition="$rdi == 1")
        pending = restored.console.start("echo syscall_irl")
        gdb.continue_until_stop(timeout=30)
        regs = gdb.registers()
        assert regs["rip"] == ksys_write and (regs["rdi"], regs["rdx"]) == (1, 12)
        gdb.delete_breakpoints()
        gdb.resume()
        assert pending.wait(30).output == "syscall_irl\n"
        gdb.interrupt()
        gdb.detach()
        restored.debugger = None
    assert restored.run("echo still here").output == "still here\n"


@pytest.mark.integration
def test_every_restored_guest_starts_pristine(lab: Lab) -> None:
    first = lab.boot()
    try:
        first.run("echo dirty > /tmp/state").check()
        second = lab.boot()
        try:
            assert second.run("cat /tmp/state").status != 0
            assert second.gdb_socket != first.gdb_socket
        finally:
            second.shutdown()
    finally:
        first.shutdown()


@pytest.mark.integration
def test_cold_boot_on_request_or_with_snapshots_off(lab: Lab, tmp_path: Path) -> None:
    cold = lab.boot(restore=False)
    try:
        assert not cold.restored and cold.run("true").status == 0
    finally:
        cold.shutdown()
    off = Lab(dataclasses.replace(lab.settings, snapshots=False, cache=tmp_path / "cache"), tmp_path / "logs")
    guest = off.boot()
    try:
        assert not guest.restored and not (tmp_path / "cache" / "snapshots").exists()
    finally:
        guest.shutdown()


@pytest.mark.integration
def test_a_stale_snapshot_is_not_used_and_a_new_one_is_built(reference: Kernel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = Lab(_settings(reference, cache), tmp_path / "logs")
    plain.snapshot()
    # Machine arguments changed: another kernel command line.
    changed = Lab(_settings(reference, cache, boot_args="sirl_snapshot_test=1"), tmp_path / "logs")
    assert changed.snapshot_key() != plain.snapshot_key()
    guest = changed.boot()
    try:
        assert guest.restored and "sirl_snapshot_test=1" in guest.run("cat /proc/cmdline").output
    finally:
        guest.shutdown()
    # QEMU changed: another binary (here a wrapper around the same QEMU).
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("qemu-system-x86_64")} "$@"\n')
    wrapper.chmod(0o755)
    other_qemu = Lab(_settings(reference, cache, qemu=str(wrapper)), tmp_path / "logs")
    assert other_qemu.snapshot_key() not in (plain.snapshot_key(), changed.snapshot_key())
    other_qemu.snapshot()
    assert len(_snapshots(cache)) == 3
    # Unchanged inputs find the first one again.
    assert Lab(_settings(reference, cache), tmp_path / "logs").snapshot() == plain.snapshot()
    assert len(list((tmp_path / "logs").glob("snapshot-*"))) == 3


@pytest.mark.integration
def test_a_changed_bzimage_changes_the_key(reference: Kernel, tmp_path: Path) -> None:
    copy = tmp_path / "bzImage"
    shutil.copyfile(reference.bzimage.path, copy)
    config = MachineConfig(kernel=copy, initrd=copy)
    before = snapshot_key(config, QEMU_ID)
    with open(copy, "r+b") as f:  # one byte of the payload, well past the setup header
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert snapshot_key(config, QEMU_ID) != before


@pytest.mark.integration
def test_two_labs_asking_at_once_build_one_snapshot(reference: Kernel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    labs = [Lab(_settings(reference, cache), tmp_path / f"logs{i}") for i in range(2)]
    results: list[Snapshot] = []
    threads = [threading.Thread(target=lambda lab=lab: results.append(lab.snapshot())) for lab in labs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 2 and results[0] == results[1]
    assert len(list(tmp_path.glob("logs*/snapshot-*"))) == 1  # one cold boot saved


@pytest.mark.integration
def test_a_truncated_state_fails_clearly_and_leaves_nothing_running(lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "state"
    bad.write_bytes(lab.snapshot().state.read_bytes()[: 1 << 20])
    machine = QemuMachine(dataclasses.replace(lab.machine_config(), incoming=bad), tmp_path / "logs")
    machine.launch()
    try:
        with pytest.raises(QemuError, match="could not load the saved state") as caught:
            machine.resume()
        assert "load of migration failed" in (caught.value.log_tail or "")
    finally:
        machine.shutdown()
    assert not machine.is_running()
    missing = QemuMachine(dataclasses.replace(lab.machine_config(), incoming=tmp_path / "none"), tmp_path / "l2")
    with pytest.raises(QemuError, match="missing"):
        missing.launch()
    assert not missing.sockets.directory.exists()


@pytest.mark.integration
def test_warm_gdb_index_is_idempotent(lab: Lab, reference: Kernel, tmp_path: Path) -> None:
    settings = dataclasses.replace(lab.settings, cache=tmp_path)
    build_id = gnu_build_id(reference.vmlinux.path)
    assert build_id is not None and len(build_id) == 40
    assert warm_gdb_index(settings) is True
    assert sorted(p.name for p in settings.gdb_index_cache.iterdir()) == [f"{build_id}.gdb-index",
                                                                          f"{build_id}.sirl-record"]
    assert warm_gdb_index(settings) is False


@pytest.mark.integration
def test_a_damaged_gdb_index_is_built_again(lab: Lab, reference: Kernel, tmp_path: Path) -> None:
    settings = dataclasses.replace(lab.settings, cache=tmp_path)
    warm_gdb_index(settings)
    [index] = settings.gdb_index_cache.glob("*.gdb-index")
    made = index.stat().st_size
    index.write_bytes(index.read_bytes()[: made // 2])
    with pytest.warns(SyscallIrlWarning, match=r"GDB index of .* is damaged \(.*gdb-index has \d+ bytes"):
        assert warm_gdb_index(settings) is True
    assert index.stat().st_size == made and warm_gdb_index(settings) is False


def _unloadable(snapshot: Snapshot) -> None:
    """Replace the state with one QEMU cannot load, its manifest made to match."""
    from pytest_syscall_irl.core.integrity import seal_directory

    snapshot.state.write_bytes(b"QEVM" + b"\0" * 4096)
    seal_directory(snapshot.directory)


@pytest.mark.integration
def test_a_snapshot_qemu_cannot_load_is_built_again_once(reference: Kernel, tmp_path: Path) -> None:
    lab = Lab(_settings(reference, tmp_path / "cache"), tmp_path / "logs")
    _unloadable(lab.snapshot())
    with pytest.warns(SyscallIrlWarning, match="QEMU could not load the guest snapshot .*: building it again"):
        guest = lab.boot()
    try:
        assert guest.restored and guest.run("echo rebuilt").output == "rebuilt\n"
    finally:
        guest.shutdown()


@pytest.mark.integration
def test_a_rebuilt_snapshot_that_fails_too_names_no_snapshots(
        reference: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(_settings(reference, tmp_path / "cache"), tmp_path / "logs")
    _unloadable(lab.snapshot())
    build = Lab._save_ready_guest

    def build_unloadable(self: Lab, key: str, state: Path, config: MachineConfig) -> SnapshotInfo:
        info = build(self, key, state, config)
        state.write_bytes(b"QEVM" + b"\0" * 4096)
        return info

    monkeypatch.setattr(Lab, "_save_ready_guest", build_unloadable)
    with pytest.warns(SyscallIrlWarning), pytest.raises(QemuError) as caught:
        lab.boot()
    assert "even after it was built again: cold-boot every guest with --syscall-irl-no-snapshots" in str(caught.value)
    assert str(snapshot_dir(tmp_path / "cache", lab.snapshot_key())) in str(caught.value)

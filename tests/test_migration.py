"""Snapshot to file and live migration between two real minivmm processes:
RAM hashes, vCPU state, the walker's invariant, a timer that keeps counting,
and every error the target or the source can hit."""

from __future__ import annotations

import re
import struct
import time

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, MiB, guest, ram_hash, still_walking, wait_for, wait_migration, walking
from minivmm.guests.abwalk import check_invariant, read_status

RAM = 128


def walker(ram: int = RAM) -> list[str]:
    return [
        "-kernel",
        guest("abwalk.elf"),
        "-m",
        str(ram),
        "-machine",
        "aux-ram-share=on",
        "-mem-prealloc",
        "-serial",
        "null",
    ]


def hmp(vm, line: str) -> str:
    return vm.cmd("human-monitor-command", **{"command-line": line})["return"]


# --- file: stop-and-copy ------------------------------------------------------------------


def test_file_migration_of_a_paused_guest_is_bit_identical(qmp_vm, ram_fds, tmp_path):
    src = qmp_vm(*walker())
    fd = ram_fds(src.proc.pid)
    walking(fd, 3)
    src.cmd("stop")
    before_regs, before_hash = hmp(src, "info registers"), ram_hash(src.proc.pid, RAM * MiB)
    state = tmp_path / "vm.state"
    assert src.cmd("migrate", uri=f"file:{state}") == {"return": {}}
    info = wait_migration(src.qmp)
    assert info["status"] == "completed", info
    assert src.status() == "postmigrate"
    assert info["ram"]["total"] == RAM * MiB and info["ram"]["transferred"] <= state.stat().st_size

    dst = qmp_vm(*walker(), "-incoming", f"file:{state}")
    wait_for(lambda: dst.status() == "paused", what="the target to load")  # a paused source: a paused target
    assert ram_hash(dst.proc.pid, RAM * MiB) == before_hash
    assert hmp(dst, "info registers") == before_regs
    dst_fd = ram_fds(dst.proc.pid)
    frozen = read_status(dst_fd)
    assert check_invariant(dst_fd, RAM * MiB) == (RAM - 2) * 256
    dst.cmd("cont")
    wait_for(lambda: read_status(dst_fd).passes > frozen.passes + 2, what="the walker to go on in the target")
    dst.cmd("stop")
    check_invariant(dst_fd, RAM * MiB)


def test_running_timer_guest_keeps_counting_after_file_migration(qmp_vm, vmm, tmp_path):
    src = qmp_vm("-kernel", guest("timer.elf"), "-append", "pit 2000", "-serial", "null", *DEBUG_EXIT)
    time.sleep(0.5)  # ticking
    state = tmp_path / "timer.state"
    src.cmd("migrate", uri=f"file:{state}")
    assert wait_migration(src.qmp)["status"] == "completed"
    # The target resumes by itself (the source was running) and finishes the count.
    r = vmm.run("-kernel", guest("timer.elf"), "-append", "pit 2000", *DEBUG_EXIT, "-incoming", f"file:{state}")
    assert r.status == GUEST_EXIT_OK, r
    assert r.stdout == "timer: pit ticks=2000\n"


# --- sockets: precopy --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_migration_of_a_running_guest(qmp_vm, ram_fds, tmp_path, transport):
    ram = 256
    if transport == "unix":
        uri = f"unix:{tmp_path / 'mig.sock'}"
    else:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{probe.getsockname()[1]}"
    dst = qmp_vm(*walker(ram), "-incoming", uri)
    src = qmp_vm(*walker(ram))
    src_fd = ram_fds(src.proc.pid)
    walking(src_fd, 2)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 30, "downtime-limit": 50})
    assert src.cmd("migrate", uri=uri) == {"return": {}}
    info = wait_migration(src.qmp)
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 2  # at least one pass while running, then the final one
    assert info["downtime"] >= 0 and info["total-time"] >= info["downtime"]
    statuses = [e["data"]["status"] for e in src.qmp.get_events() if e["event"] == "MIGRATION"]
    assert statuses[0] == "setup" and statuses[-1] == "completed"
    assert src.status() == "postmigrate"
    wait_for(lambda: dst.status() == "running", what="the target to resume")
    dst_fd = ram_fds(dst.proc.pid)
    passes = read_status(dst_fd).passes
    wait_for(lambda: read_status(dst_fd).passes > passes + 2, what="the walker in the target")
    dst.cmd("stop")
    check_invariant(dst_fd, ram * MiB)


def test_incoming_defer_then_migrate_incoming(qmp_vm, ram_fds, tmp_path):
    dst = qmp_vm(*walker(), "-incoming", "defer")
    assert dst.status() == "inmigrate"
    assert dst.cmd("cont") == {"return": {}}  # QEMU: accepted, only sets autostart
    assert dst.status() == "inmigrate"
    sock = tmp_path / "deferred.sock"
    assert dst.cmd(
        "migrate-incoming",
        channels=[{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(sock)}}],
    ) == {"return": {}}
    err = dst.cmd("migrate-incoming", uri=f"unix:{sock}")["error"]["desc"]
    assert err == "The incoming migration has already been started"
    src = qmp_vm(*walker())
    wait_for(lambda: read_status(ram_fds(src.proc.pid)), what="the walker")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 30})
    src.cmd("migrate", uri=f"unix:{sock}")
    assert wait_migration(src.qmp)["status"] == "completed"
    wait_for(lambda: dst.status() == "running", what="the target to resume")


# --- the source side's failures -------------------------------------------------------------------


def test_failed_outgoing_migration_leaves_the_source_running(qmp_vm, ram_fds, tmp_path):
    src = qmp_vm(*walker())
    fd = ram_fds(src.proc.pid)
    src.cmd("migrate", uri=f"unix:{tmp_path / 'nobody.sock'}")
    info = wait_migration(src.qmp)
    assert info["status"] == "failed"
    assert info["error-desc"].startswith(f"Failed to connect to 'unix:{tmp_path / 'nobody.sock'}'")
    assert src.status() == "running"
    still_walking(fd)


def test_target_dying_mid_stream_fails_the_source_which_keeps_running(qmp_vm, ram_fds, tmp_path):
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = qmp_vm(*walker(256), "-incoming", uri)
    src = qmp_vm(*walker(256))
    fd = ram_fds(src.proc.pid)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})  # slow: 16 MiB/s
    src.cmd("migrate", uri=uri)
    wait_for(
        lambda: src.qmp.cmd("query-migrate").get("ram", {}).get("transferred", 0) > 4 << 20,
        what="the transfer to be under way",
    )
    dst.proc.kill()
    info = wait_migration(src.qmp)
    assert info["status"] == "failed", info
    assert src.status() == "running"
    still_walking(fd)


def test_migrate_cancel_while_copying(qmp_vm, ram_fds, tmp_path):
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = qmp_vm(*walker(256), "-incoming", uri)
    src = qmp_vm(*walker(256))
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.cmd("query-migrate")["return"].get("status") == "active", what="an active migration")
    err = src.cmd("migrate", uri=uri)["error"]["desc"]
    assert err == "There's a migration process in progress"
    assert src.cmd("migrate_cancel") == {"return": {}}
    assert wait_migration(src.qmp)["status"] == "cancelled"
    assert src.status() == "running"
    assert dst.proc.wait(20) == 1  # a half-sent stream: the target gives up
    assert "load of migration failed: truncated migration stream" in dst.proc.stderr.read().decode()


def test_migrate_arguments_are_checked(qmp_vm):
    vm = qmp_vm(*walker(), "-S")
    assert vm.cmd("migrate")["error"]["desc"] == "need either 'uri' or 'channels' argument"
    both = vm.cmd("migrate", uri="unix:/x", channels=[])["error"]["desc"]
    assert both.startswith("'uri' and 'channels' arguments are mutually exclusive")
    assert vm.cmd("migrate", uri="exec:cat > /tmp/x")["error"]["desc"] == (
        "exec: migration is not supported: minivmm never runs commands through a shell"
    )
    assert vm.cmd("migrate", uri="ftp://x")["error"]["desc"] == "unknown migration protocol: ftp://x"
    assert vm.cmd("migrate-incoming", uri="unix:/x")["error"]["desc"] == (
        "'-incoming' was not specified on the command line"
    )
    assert vm.cmd("migrate-set-parameters", **{"downtime-limit": -1})["error"]["desc"].startswith(
        "Parameter 'downtime_limit' expects an integer in the range of 0 to"
    )
    assert vm.cmd("migrate-set-parameters", mode="warp")["error"]["desc"] == (
        "Parameter 'mode' does not accept value 'warp'"
    )
    vm.cmd("migrate-set-parameters", **{"downtime-limit": 123, "max-bandwidth": 1 << 30})
    params = vm.cmd("query-migrate-parameters")["return"]
    assert (params["downtime-limit"], params["max-bandwidth"], params["mode"]) == (123, 1 << 30, "normal")
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    caps = {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")["return"]}
    assert caps == {"events": False, "x-ignore-shared": True, "return-path": False}
    bad = vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    assert bad["error"]["desc"] == "Parameter 'capability' does not accept value 'postcopy-ram'"
    assert vm.cmd("query-migrate")["return"] == {}


# --- the target side's failures: one line, status 1 ----------------------------------------------------


@pytest.fixture
def saved(qmp_vm, tmp_path):
    """A state file of a stopped 64 MiB walker."""
    src = qmp_vm(*walker(64))
    time.sleep(0.3)
    src.cmd("stop")
    path = tmp_path / "saved.state"
    src.cmd("migrate", uri=f"file:{path}")
    assert wait_migration(src.qmp)["status"] == "completed"
    return path


def _target_fails(vmm, args, path, *fragments):
    r = vmm.run(*args, "-incoming", f"file:{path}", timeout=60)
    assert r.status == 1, r
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith(f"minivmm: file:{path}: load of migration failed: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_bad_magic(vmm, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"QEVM" + bytes(100))
    _target_fails(vmm, walker(64), junk, "Not a migration stream (bad magic 5145564d)")


def test_unsupported_version(vmm, saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    newer = tmp_path / "newer"
    newer.write_bytes(data)
    _target_fails(vmm, walker(64), newer, "Unsupported migration stream version 9")


def test_truncated_stream(vmm, saved, tmp_path):
    cut = tmp_path / "cut"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    _target_fails(vmm, walker(64), cut, "truncated migration stream")


def test_ram_size_mismatch(vmm, saved):
    _target_fails(vmm, walker(128), saved, "Length mismatch: pc.ram: 0x4000000 in != 0x8000000")


def test_different_machine_shape(vmm, saved):
    _target_fails(vmm, [*walker(64), "-smp", "2"], saved, "vcpu[1]: missing from the stream")
    _target_fails(vmm, [*walker(64), "-serial", "null", "-serial", "null"], saved, "serial[1]: missing")


def test_corrupt_device_state(vmm, saved, tmp_path):
    data = bytearray(saved.read_bytes())
    m = re.search(rb"MVMS", data)
    data[m.start() + 40] ^= 0xFF
    bad = tmp_path / "corrupt"
    bad.write_bytes(data)
    _target_fails(vmm, walker(64), bad, "checksum mismatch")


def test_x_ignore_shared_leaves_file_backed_ram_out_of_the_stream(qmp_vm, tmp_path):
    ram = tmp_path / "guest.ram"
    backend = [
        "-object",
        f"memory-backend-file,id=ram0,size=64M,mem-path={ram},share=on",
        "-machine",
        "memory-backend=ram0",
        "-m",
        "64",
    ]
    args = ["-kernel", guest("abwalk.elf"), "-serial", "null", *backend]
    src = qmp_vm(*args)
    wait_for(lambda: ram.read_bytes()[0x1FF000:0x1FF004] == b"ABWK", what="the walker")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    state = tmp_path / "vm.state"
    src.cmd("migrate", uri=f"file:{state}")
    info = wait_migration(src.qmp)
    assert info["status"] == "completed" and info["ram"]["total"] == 0
    assert state.stat().st_size < 64 << 10  # device state only: the RAM stays in its file
    frozen = ram.read_bytes()
    src.cmd("quit")
    assert src.proc.wait(20) == 0
    dst = qmp_vm(*args, "-incoming", f"file:{state}")  # the same file: the same RAM
    wait_for(lambda: dst.status() == "running", what="the target")
    wait_for(lambda: ram.read_bytes() != frozen, what="the walker to go on from the file's RAM")


def test_flipped_ram_record_offset_is_refused_not_written_elsewhere(vmm, saved, tmp_path):
    data = bytearray(saved.read_bytes())
    (length,) = struct.unpack_from("<I", data, 8)
    first = 12 + length + 4  # the first page record, after the header and its checksum
    assert data[first] == 1
    data[first + 3 + 2] ^= 0x01  # bit 16 of its offset: 64 KiB away
    flipped = tmp_path / "flipped"
    flipped.write_bytes(data)
    _target_fails(vmm, walker(64), flipped, "RAM page record header: checksum mismatch")


def test_device_field_out_of_range_names_the_field(vmm, saved, tmp_path):
    from minivmm.devices import rtc
    from minivmm.vmstate import Section, StateWriter, encode, read_blob

    data = saved.read_bytes()
    start = data.index(b"MVMS")
    (blob_len,) = struct.unpack_from("<Q", data, start - 8)
    sections = read_blob(data[start : start + blob_len])
    lax = rtc.VMSTATE.__class__("rtc", 1, 1, tuple(f.__class__(f.name, f.kind) for f in rtc.VMSTATE.fields))
    w = StateWriter()
    for sec in sections:
        if sec.name == "rtc":
            sec = Section("rtc", 0, 1, encode(lax, {"index": 200, "cmos": bytes(128), "offset_s": 0}))
        w.sections.append(sec)
    blob = w.blob()
    bad = tmp_path / "rtc200"
    bad.write_bytes(data[: start - 8] + struct.pack("<Q", len(blob)) + blob + data[start + blob_len :])
    _target_fails(vmm, walker(64), bad, "rtc[0]/index: 200 is out of range (at most 127)")

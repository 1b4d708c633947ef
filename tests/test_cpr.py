"""CPR live update on real KVM with the A-B walker at 1 GiB: cpr-exec,
cpr-transfer (also deferred), cpr-reboot; the guest's RAM is never copied
(same memfd inode, same bytes), the PID survives exec, chained updates leak
nothing; every validation error and every CPR failure case of docs/cpr.md."""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import (
    DEBUG_EXIT,
    GUEST_EXIT_OK,
    MiB,
    argv_of,
    guest,
    ram_hash,
    ram_path,
    still_walking,
    wait_exec,
    wait_for,
    wait_migration,
    walking,
)
from minivmm.guests.abwalk import check_invariant
from minivmm.kvm import runloop
from minivmm.vmprocess import qmp_connect

RAM = 1024
O_CLOEXEC = 0o2000000


def walker(ram: int = RAM, shared: bool = True) -> list[str]:
    args = ["-kernel", guest("abwalk.elf"), "-m", str(ram), "-mem-prealloc", "-serial", "null"]
    return args + (["-machine", "aux-ram-share=on"] if shared else [])


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def fd_report(pid: int) -> dict[int, tuple[str, bool]]:
    """fd -> (what it is, close-on-exec)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(re.search(r"flags:\s+(\d+)", f.read()).group(1), 8)
        except FileNotFoundError:
            continue
        out[int(fd)] = (target, bool(flags & O_CLOEXEC))
    return out


def wait_status(client, want: str, timeout: float = 30) -> None:
    wait_for(lambda: client.cmd("query-status")["status"] == want, timeout=timeout, what=f"runstate {want}")


# --- cpr-exec -------------------------------------------------------------------------------


def test_cpr_exec_same_pid_same_memfd_same_ram(qmp_vm, ram_fds, tmp_path):
    args = walker()
    vm = qmp_vm(*args)
    pid, fd = vm.proc.pid, ram_fds(vm.proc.pid)
    walking(fd)
    inode = os.stat(ram_path(pid)).st_ino
    vm.cmd("stop")
    before_hash = ram_hash(pid, RAM * MiB)
    before_regs = vm.cmd("human-monitor-command", **{"command-line": "info registers"})["return"]
    state = tmp_path / "vm.state"
    vm.cmd(
        "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [*argv_of(vm, *args), "-incoming", "defer"]}
    )
    assert vm.cmd("migrate", uri=f"file:{state}") == {"return": {}}
    wait_exec(vm.qmp)
    # The new image comes back on the same monitor socket, waiting for migrate-incoming.
    client = qmp_connect(vm.socket)
    try:
        assert client.cmd("query-status")["status"] == "inmigrate"
        assert vm.proc.pid == pid and vm.proc.poll() is None  # same process
        assert os.stat(ram_path(pid)).st_ino == inode  # same memfd: no RAM was copied
        client.cmd("migrate-incoming", uri=f"file:{state}")
        wait_status(client, "paused")  # it was paused before the update
        assert ram_hash(pid, RAM * MiB) == before_hash
        assert client.cmd("human-monitor-command", **{"command-line": "info registers"}) == before_regs
        client.cmd("cont")
        still_walking(fd)
        client.cmd("stop")
        assert check_invariant(fd, RAM * MiB) == (RAM - 2) * 256
    finally:
        client.close()


def test_cpr_exec_of_a_running_guest_reports_its_phases(qmp_vm, ram_fds, tmp_path):
    args = walker()
    vm = qmp_vm(*args)
    fd = ram_fds(vm.proc.pid)
    walking(fd)
    state = tmp_path / "vm.state"
    cmd = [*argv_of(vm, *args), "-incoming", f"file:{state}"]
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": cmd})
    vm.cmd("migrate", uri=f"file:{state}")
    wait_exec(vm.qmp)
    client = qmp_connect(vm.socket)
    try:
        wait_status(client, "running")  # the source ran, so the new image resumes by itself
        info = client.cmd("query-migrate")
        assert info["status"] == "completed"
        phases = info["x-phase-times"]
        if runloop.lib is None:  # no keeper: the guest stops from the stop to the resume
            assert set(phases) == {"stop", "save", "exec", "load", "resume"}
        else:  # it runs in the old image's keeper across the exec and the new image's start-up
            assert set(phases) == {"stop", "save", "keep", "exec", "start-up", "take-over", "resume"}
            paused = sum(phases[p] for p in ("stop", "save", "keep", "take-over", "resume"))
            assert info["downtime"] == pytest.approx(paused, abs=1)
        assert 0 < info["downtime"] < 10_000
        assert info["ram"]["total"] == 0  # not a byte of RAM in the stream
        still_walking(fd)
        client.cmd("stop")
        check_invariant(fd, RAM * MiB)
    finally:
        client.close()


def eventfds(pid: int) -> dict[int, str]:
    """fd -> the kernel's id of the eventfd behind it."""
    out = {}
    for fd, (target, _) in fd_report(pid).items():
        if target == "anon_inode:[eventfd]":
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                out[fd] = re.search(r"eventfd-id:\s+(\d+)", f.read()).group(1)
    return out


def read_until(proc, text: str, timeout: float = 20) -> None:
    """Read the VMM's stdout (the guest's serial) until ``text`` has appeared."""
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        ready, _, _ = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            pytest.fail(f"no {text!r} from the guest; it printed {seen!r}")
        seen += chunk


def test_cpr_exec_rebinds_the_serial_irqfd(qmp_vm, tmp_path):
    """The UART's interrupt eventfd is a preserved device fd: the source lets go of it when
    it stops, binds it again when an update fails, and after an update the same eventfd,
    bound to the new VM, still delivers the guest's receive interrupts."""
    args = ["-kernel", guest("timer.elf"), "-append", "serial", "-m", "64", "-machine", "aux-ram-share=on"]
    args += DEBUG_EXIT
    vm = qmp_vm(*args, stdin=subprocess.PIPE)
    pid = vm.proc.pid
    before = eventfds(pid)
    assert len(before) == 1, before  # COM1's IRQ 4
    # An exec that fails: the guest resumes and its interrupts come through the old VM again.
    broken = tmp_path / "broken-interpreter"
    broken.write_text("#!/no/such/interpreter\n")  # passes the checks, but execve fails
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [str(broken)]})
    assert vm.cmd("migrate", uri=f"file:{tmp_path / 'failed.state'}") == {"return": {}}
    assert wait_migration(vm.qmp)["status"] == "failed"
    vm.proc.stdin.write(b"a")
    vm.proc.stdin.flush()
    read_until(vm.proc, "timer: got a\n")
    # An update that works.
    state = tmp_path / "vm.state"
    cmd = [*argv_of(vm, *args), "-incoming", f"file:{state}"]
    vm.cmd("migrate-set-parameters", **{"cpr-exec-command": cmd})
    vm.cmd("migrate", uri=f"file:{state}")
    wait_exec(vm.qmp)
    client = qmp_connect(vm.socket)
    try:
        wait_status(client, "running")
        assert eventfds(pid) == before  # the same eventfd object, at the same number
    finally:
        client.close()
    out, _ = vm.proc.communicate(b"bq", timeout=30)  # received by the new image, interrupting through it
    assert vm.proc.returncode == GUEST_EXIT_OK
    got = [line for line in out.decode().splitlines() if line.startswith("timer: ")]
    assert got == ["timer: got b", "timer: got q", "timer: serial done"]


def test_twenty_chained_cpr_exec_updates_leak_nothing(qmp_vm, ram_fds, tmp_path):
    args = walker()
    vm = qmp_vm(*args)
    pid, fd = vm.proc.pid, ram_fds(vm.proc.pid)
    walking(fd)
    inode = os.stat(ram_path(pid)).st_ino
    state = tmp_path / "vm.state"
    cmd = [*argv_of(vm, *args), "-incoming", f"file:{state}"]
    vm.qmp.close()
    counts = []
    for _ in range(20):
        client = qmp_connect(vm.socket)
        client.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": cmd})
        client.cmd("migrate", uri=f"file:{state}")
        wait_exec(client)
        client = qmp_connect(vm.socket)
        wait_status(client, "running")
        report = fd_report(pid)
        counts.append(len(report))
        client.close()
    assert vm.proc.pid == pid and os.stat(ram_path(pid)).st_ino == inode
    assert len(set(counts[1:])) == 1, f"fd counts drift: {counts}"
    leaked = {fd: what for fd, (what, cloexec) in fd_report(pid).items() if fd > 2 and not cloexec}
    assert not leaked, f"fds without close-on-exec: {leaked}"
    assert not any("minivmm-cpr-state" in what for what, _ in fd_report(pid).values())
    still_walking(fd)
    # the helpers each update starts (teardown, watchdog) are gone and reaped: no zombies pile up
    wait_for(lambda: not _children(pid), what="the update helpers to be reaped")


def _children(pid: int) -> list[str]:
    """The processes whose parent is ``pid``, with their state letter."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(f"{entry}:{fields[0]}")
    return out


# --- cpr-transfer -----------------------------------------------------------------------------


def _cpr_channel(path) -> str:
    return f'{{"channel-type": "cpr", "addr": {{"transport": "socket", "type": "unix", "path": "{path}"}}}}'


def _channels(main, cpr) -> list:
    return [
        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main)}},
        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}},
    ]


@pytest.mark.parametrize("source_running", [True, False], ids=["running", "paused"])
def test_cpr_transfer(qmp_vm, vmm, ram_fds, tmp_path, source_running):
    args = walker()
    src = qmp_vm(*args)
    fd = ram_fds(src.proc.pid)
    walking(fd)
    inode = os.stat(ram_path(src.proc.pid)).st_ino
    irqfds = sorted(eventfds(src.proc.pid).values())
    main, cpr, dst_qmp = tmp_path / "main.sock", tmp_path / "cpr.sock", tmp_path / "dst.qmp"
    dst = vmm.start(
        *args, "-qmp", f"unix:{dst_qmp},server=on,wait=off", "-incoming", f"unix:{main}", "-incoming", _cpr_channel(cpr)
    )
    wait_for(cpr.exists, what="the target's cpr channel")
    if not source_running:
        src.cmd("stop")
        before = ram_hash(src.proc.pid, RAM * MiB)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    assert src.cmd("migrate", channels=_channels(main, cpr)) == {"return": {}}
    info = wait_migration(src.qmp)
    assert info["status"] == "completed", info
    assert src.status() == "postmigrate"
    client = qmp_connect(str(dst_qmp))
    try:
        wait_status(client, "running" if source_running else "paused")
        assert os.stat(ram_path(dst.pid)).st_ino == inode  # the very same memfd, by SCM_RIGHTS
        assert sorted(eventfds(dst.pid).values()) == irqfds  # and the serial's interrupt eventfd
        target = client.cmd("query-migrate")
        assert target["ram"]["total"] == 0
        assert set(target["x-phase-times"]) == {"stop", "save", "hand-over", "load", "resume"}
        if not source_running:
            assert ram_hash(dst.pid, RAM * MiB) == before
            client.cmd("cont")
        still_walking(fd)
        client.cmd("stop")
        check_invariant(fd, RAM * MiB)
    finally:
        client.close()
    # The source handed its guest over: another migrate is refused; QEMU still lets it 'cont'.
    err = src.cmd("migrate", uri=f"unix:{tmp_path / 'again.sock'}")["error"]["desc"]
    assert "handed over with cpr-transfer" in err


@pytest.mark.parametrize("same", [True, False], ids=["same-file", "its-own-file"])
def test_cpr_transfer_target_writes_where_its_own_command_line_says(qmp_vm, vmm, tmp_path, same):
    """The target inherits a file chardev's fd only when its -serial names the same file (QEMU 11
    writes to the target's own file); then output goes on where the source left off."""
    src_log, dst_log = tmp_path / "src.log", tmp_path / ("src.log" if same else "dst.log")
    args = ["-kernel", guest("abwalk.elf"), "-m", "128", "-machine", "aux-ram-share=on"]
    src = qmp_vm(*args, "-serial", f"file:{src_log}")
    wait_for(lambda: src_log.read_bytes().count(b"B") > 2, what="the walker's output")
    main, cpr, dst_qmp = tmp_path / "main.sock", tmp_path / "cpr.sock", tmp_path / "dst.qmp"
    vmm.start(
        *args,
        "-serial",
        f"file:{dst_log}",
        "-qmp",
        f"unix:{dst_qmp},server=on,wait=off",
        "-incoming",
        f"unix:{main}",
        "-incoming",
        _cpr_channel(cpr),
    )
    wait_for(cpr.exists, what="the target's cpr channel")
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.cmd("migrate", channels=_channels(main, cpr))
    assert wait_migration(src.qmp)["status"] == "completed"
    handed_over = src_log.stat().st_size
    wait_for(lambda: dst_log.stat().st_size > (handed_over if same else 0) + 4, what="the target's output")
    output = dst_log.read_bytes()
    if same:
        assert output.startswith(b"AB") and output.count(b"A") == 1  # not truncated, not booted again
    else:
        assert set(output) == {ord("B")}  # the guest walks on, printing into the target's file
        time.sleep(0.3)
        assert src_log.stat().st_size == handed_over  # and nothing more into the source's


def test_cpr_transfer_with_a_deferred_main_channel(qmp_vm, vmm, ram_fds, tmp_path):
    args = walker()
    src = qmp_vm(*args)
    fd = ram_fds(src.proc.pid)
    walking(fd)
    main, cpr, dst_qmp = tmp_path / "main.sock", tmp_path / "cpr.sock", tmp_path / "dst.qmp"
    vmm.start(*args, "-qmp", f"unix:{dst_qmp},server=on,wait=off", "-incoming", "defer", "-incoming", _cpr_channel(cpr))
    wait_for(cpr.exists, what="the cpr channel")
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.cmd("migrate", channels=_channels(main, cpr))
    client = qmp_connect(str(dst_qmp))  # the target holds the fds and waits for migrate-incoming
    try:
        assert client.cmd("query-status")["status"] == "inmigrate"
        assert src.cmd("query-migrate")["return"]["status"] == "active"  # no hang-up yet: still running
        assert src.status() == "running"
        client.cmd("migrate-incoming", uri=f"unix:{main}")
        assert wait_migration(src.qmp)["status"] == "completed"
        wait_status(client, "running")
        still_walking(fd)
    finally:
        client.close()


# --- cpr-reboot -------------------------------------------------------------------------------


def test_cpr_reboot_through_a_file_backend(qmp_vm, tmp_path):
    ram = tmp_path / "guest.ram"
    args = [
        "-kernel",
        guest("abwalk.elf"),
        "-serial",
        "null",
        "-m",
        str(RAM),
        "-object",
        f"memory-backend-file,id=ram0,size={RAM}M,mem-path={ram},share=on,prealloc=on",
        "-machine",
        "memory-backend=ram0",
    ]
    vm = qmp_vm(*args)
    fd = os.open(ram, os.O_RDONLY)
    try:
        walking(fd)
        vm.cmd("stop")
        before = hashlib.sha256(ram.read_bytes()).hexdigest()
        state = tmp_path / "vm.state"
        vm.cmd("migrate-set-parameters", mode="cpr-reboot")
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        vm.cmd("migrate", uri=f"file:{state}")
        assert wait_migration(vm.qmp)["status"] == "completed"
        assert state.stat().st_size < 1 * MiB  # RAM stays in its file
        vm.cmd("quit")
        assert vm.proc.wait(30) == 0
        new = qmp_vm(*args, "-incoming", "defer")
        new.cmd("migrate-incoming", uri=f"file:{state}")
        wait_status(new.qmp, "paused")
        assert hashlib.sha256(ram.read_bytes()).hexdigest() == before
        new.cmd("cont")
        still_walking(fd)
    finally:
        os.close(fd)


# --- validation: refused before anything stops -----------------------------------------------------


@pytest.mark.parametrize(
    "mode,extra_args,migrate_args,message",
    [
        ("cpr-exec", {}, {"uri": "file:STATE"}, "Parameter 'cpr-exec-command' required for cpr-exec"),
        (
            "cpr-exec",
            {"cpr-exec-command": ["/no/such/minivmm"]},
            {"uri": "file:STATE"},
            "cpr-exec-command: '/no/such/minivmm' is not an executable file",
        ),
        (
            "cpr-exec",
            {"cpr-exec-command": ["NOTEXEC"]},
            {"uri": "file:STATE"},
            "cpr-exec-command: 'NOTEXEC' is not an executable file",
        ),
        (
            "cpr-exec",
            {"cpr-exec-command": [sys.executable, "-m", "minivmm", "-incoming", "defer"]},
            {"uri": "unix:SOCK"},
            "mode cpr-exec needs a file: migration URI",
        ),
        ("cpr-transfer", {}, {"uri": "unix:SOCK"}, "missing 'cpr' migration channel"),
        (
            "cpr-transfer",
            {},
            {
                "channels": [
                    {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "SOCK"}},
                    {
                        "channel-type": "cpr",
                        "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"},
                    },
                ]
            },
            "bad cpr channel address; must be unix",
        ),
        (
            "cpr-transfer",
            {},
            {
                "channels": [
                    {"channel-type": "main", "addr": {"transport": "file", "filename": "STATE"}},
                    {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "SOCK"}},
                ]
            },
            "Migration requires streamable transport (eg unix)",
        ),
        (
            "normal",
            {},
            {
                "channels": [
                    {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "SOCK"}},
                    {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "SOCK2"}},
                ]
            },
            "a cpr channel is only valid in mode cpr-transfer",
        ),
    ],
)
def test_validation_errors_leave_the_guest_running(qmp_vm, ram_fds, tmp_path, mode, extra_args, migrate_args, message):
    vm = qmp_vm(*walker(128))
    fd = ram_fds(vm.proc.pid)
    walking(fd, 0)
    (tmp_path / "notexec").write_text("data, not a program\n")
    (tmp_path / "notexec").chmod(0o644)

    def fill(obj):
        text = repr(obj).replace("STATE", str(tmp_path / "s")).replace("SOCK", str(tmp_path / "k"))
        return eval(text.replace("NOTEXEC", str(tmp_path / "notexec")))  # noqa: S307 (the test's own literal)

    message = fill(message)
    assert vm.cmd("migrate-set-parameters", mode=mode, **fill(extra_args)) == {"return": {}}
    err = vm.cmd("migrate", **fill(migrate_args))["error"]
    assert err["class"] == "GenericError" and err["desc"].startswith(message), err
    assert vm.status() == "running" and vm.cmd("query-migrate")["return"] == {}
    still_walking(fd)


@pytest.mark.parametrize("mode", ["cpr-exec", "cpr-transfer"])
def test_ram_that_is_not_shareable_blocks_cpr(qmp_vm, tmp_path, mode):
    vm = qmp_vm(*walker(128, shared=False))
    vm.cmd("migrate-set-parameters", mode=mode, **{"cpr-exec-command": [sys.executable]})
    channels = _channels(tmp_path / "m", tmp_path / "c") if mode == "cpr-transfer" else None
    args = {"channels": channels} if channels else {"uri": f"file:{tmp_path / 's'}"}
    err = vm.cmd("migrate", **args)["error"]["desc"]
    assert err == (
        "Memory region pc.ram is not compatible with CPR. share=on is required for memory-backend "
        "objects, and aux-ram-share=on is required."
    )
    assert vm.status() == "running"


# --- failures ----------------------------------------------------------------------------------------


def test_exec_that_fails_anyway_resumes_the_guest_and_a_retry_works(qmp_vm, ram_fds, tmp_path):
    args = walker(256)
    vm = qmp_vm(*args)
    pid, fd = vm.proc.pid, ram_fds(vm.proc.pid)
    walking(fd)
    broken = tmp_path / "broken-interpreter"
    broken.write_text("#!/no/such/interpreter\n")  # passes the checks, but execve fails
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    fds_before = fd_report(pid)
    state = tmp_path / "vm.state"
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [str(broken)]})
    vm.cmd("migrate", uri=f"file:{state}")
    info = wait_migration(vm.qmp)
    assert info["status"] == "failed"
    assert info["error-desc"] == f"execvp {broken} failed: No such file or directory"
    assert vm.status() == "running"
    still_walking(fd)
    after = fd_report(pid)
    assert not any("minivmm-cpr-state" in what for what, _ in after.values())  # the state memfd is closed
    assert {fd: c for fd, (_, c) in after.items() if fd > 2} == {fd: c for fd, (_, c) in fds_before.items() if fd > 2}
    assert "MINIVMM_CPR_STATE_FD" not in environ(pid)  # never set in the process itself
    # A retry with a good command succeeds.
    vm.cmd("migrate-set-parameters", **{"cpr-exec-command": [*argv_of(vm, *args), "-incoming", f"file:{state}"]})
    vm.cmd("migrate", uri=f"file:{state}")
    wait_exec(vm.qmp)
    client = qmp_connect(vm.socket)
    try:
        wait_status(client, "running")
        still_walking(fd)
    finally:
        client.close()


def _holders_of(inode: int) -> list[int]:
    """Processes with the guest's pc.ram memfd (by inode) open."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/memfd:pc.ram") and os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode:
                    pids.append(int(pid))
                    break
        except OSError:
            continue
    return pids


@pytest.mark.parametrize(
    "program,how",
    [
        ("#!/bin/sh\nexec /bin/true\n", "ended without taking the guest over"),
        ("#!/bin/sh\nexit 1\n", "ended without taking the guest over"),
        ("#!/bin/sh\nexec sleep 600\n", "did not take the guest over within 2 s (killed)"),
    ],
    ids=["true", "exit-1", "hangs"],
)
def test_exec_of_a_program_that_never_takes_the_guest_over_restarts_it(qmp_vm, ram_fds, tmp_path, program, how):
    """Beyond QEMU: a cpr-exec-command that is not minivmm (a wrapper that exits, or hangs) does not
    lose the guest. The watchdog started before the exec restarts it with the old command line."""
    args = walker(256)
    vm = qmp_vm(*args, env={"MINIVMM_CPR_EXEC_TIMEOUT": "2"})
    pid, fd = vm.proc.pid, ram_fds(vm.proc.pid)
    walking(fd)
    inode = os.stat(ram_path(pid)).st_ino
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(program)
    wrapper.chmod(0o755)
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [str(wrapper)]})
    vm.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")
    wait_exec(vm.qmp)
    vm.proc.wait(30)  # the wrapper, in the VMM's place, is gone (or was killed)
    rescued = wait_for(lambda: [p for p in _holders_of(inode) if p != pid], what="the restarted VMM")
    client = qmp_connect(vm.socket)  # the same monitor socket, kept through it all
    try:
        wait_status(client, "running")
        still_walking(fd)  # same memfd: the guest walks on in the RAM it had
        client.cmd("stop")
        assert check_invariant(fd, 256 * MiB) == (256 - 2) * 256
    finally:
        client.close()
    os.set_blocking(vm.proc.stderr.fileno(), False)
    said = (vm.proc.stderr.read() or b"").decode()
    assert f"cpr-exec: the new image {how}: restarting the guest with: " in said, said
    assert len(rescued) == 1


@pytest.mark.parametrize(
    "new_args,message",
    [
        ([*walker(512), "-incoming", "file:STATE"], "has 268435456 bytes, this machine needs 536870912"),
        ([*walker(256), "-m", "lots", "-incoming", "file:STATE"], "-m lots: invalid size 'lots'"),  # the new parser's
        (walker(256), "cpr-exec: the new command line needs -incoming"),  # booting afresh would overwrite the RAM
        (  # the same RAM and devices on another machine type: the stream's configuration section says
            [*walker(256), "-M", "q35", "-incoming", "file:STATE"],
            "Machine type received is 'pc' and local is 'q35'",
        ),
    ],
    ids=["ram-does-not-fit", "does-not-parse", "no-incoming", "other-machine-type"],
)
def test_new_image_that_cannot_load_keeps_the_ram_for_a_retry(
    qmp_vm, vmm, ram_fds, tmp_path, monkeypatch, new_args, message
):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # where the holder's socket goes
    args = walker(256)
    vm = qmp_vm(*args)
    pid, fd = vm.proc.pid, ram_fds(vm.proc.pid)
    walking(fd)
    inode = os.stat(ram_path(pid)).st_ino
    vm.cmd("stop")
    before = ram_hash(pid, 256 * MiB)
    state = tmp_path / "vm.state"
    wrong = argv_of(vm, *(a.replace("STATE", str(state)) for a in new_args))
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": wrong})
    vm.cmd("migrate", uri=f"file:{state}")
    assert vm.proc.wait(30) == 1
    line = vm.proc.stderr.read().decode().strip()
    assert line.count("\n") == 0 and message in line, line
    rescue = re.search(r"addr\.path=(\S+)", line).group(1)
    # The holder keeps the memfd: start a fixed minivmm that takes it over the cpr-transfer protocol.
    qmp = tmp_path / "fixed.qmp"
    fixed = vmm.start(
        *args,
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-incoming",
        f"cpr,addr.transport=socket,addr.type=unix,addr.path={rescue}",
        "-incoming",
        f"file:{state}",
    )
    client = qmp_connect(str(qmp))
    try:
        wait_status(client, "paused")
        assert os.stat(ram_path(fixed.pid)).st_ino == inode
        assert ram_hash(fixed.pid, 256 * MiB) == before
        client.cmd("cont")
        still_walking(fd)
    finally:
        client.close()


class FakeTarget:
    """A cpr-transfer target that takes the fds and then misbehaves (for failure injection)."""

    def __init__(self, tmp_path, *, hang_up: bool, listen: bool, read_bytes: int = 0, silent: bool = False) -> None:
        from minivmm.cpr.state import recv_state
        from minivmm.sockets import unix_listen

        self.cpr_path, self.main_path = tmp_path / "cpr.sock", tmp_path / "main.sock"
        self.cpr = unix_listen(str(self.cpr_path))
        self.main = unix_listen(str(self.main_path)) if listen else None
        self.conns: list[socket.socket] = []

        def run() -> None:
            conn, _ = self.cpr.accept()
            self.conns.append(conn)
            state = recv_state(conn, 30)
            state.table.walk(lambda name, id_, fd: os.close(fd))
            if hang_up:
                conn.close()
            if self.main is not None:
                main, _ = self.main.accept()
                self.conns.append(main)
                if silent:  # takes the whole stream and never answers
                    while main.recv(65536):
                        pass
                    return
                main.recv(read_bytes)
                main.close()  # mid-stream

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        for s in [self.cpr, self.main, *self.conns]:
            if s is not None:
                s.close()


@pytest.mark.parametrize(
    "case,hang_up,listen",
    [("dies before listening", True, False), ("dies mid-stream", True, True)],
)
def test_transfer_target_failures_leave_the_source_running(qmp_vm, ram_fds, tmp_path, case, hang_up, listen):
    vm = qmp_vm(*walker(256))
    fd = ram_fds(vm.proc.pid)
    walking(fd)
    target = FakeTarget(tmp_path, hang_up=hang_up, listen=listen, read_bytes=8)
    if listen:
        # The machine state is a few KiB: it can fit in the socket's buffer before the target
        # dies, and then only the return path tells the source (as in QEMU).
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    try:
        vm.cmd("migrate-set-parameters", mode="cpr-transfer")
        vm.cmd("migrate", channels=_channels(target.main_path, target.cpr_path))
        info = wait_migration(vm.qmp)
        assert info["status"] == "failed", info
        assert vm.status() == "running"
        still_walking(fd)
    finally:
        target.close()


def test_migrate_cancel_while_waiting_for_the_hang_up(qmp_vm, ram_fds, tmp_path):
    vm = qmp_vm(*walker(256))
    fd = ram_fds(vm.proc.pid)
    walking(fd)
    target = FakeTarget(tmp_path, hang_up=False, listen=False)
    try:
        vm.cmd("migrate-set-parameters", mode="cpr-transfer")
        vm.cmd("migrate", channels=_channels(target.main_path, target.cpr_path))
        wait_for(lambda: vm.cmd("query-migrate")["return"].get("status") == "active", what="the hand-over")
        assert vm.cmd("migrate_cancel") == {"return": {}}
        assert wait_migration(vm.qmp)["status"] == "cancelled"
        assert vm.status() == "running"
        still_walking(fd)
    finally:
        target.close()


@pytest.mark.parametrize("cancel", [False, True], ids=["timeout", "cancel"])
def test_transfer_target_that_never_answers_does_not_freeze_the_source(vmm, ram_fds, tmp_path, cancel):
    from conftest import QmpVm

    vm = QmpVm(vmm, *walker(256), env={"MINIVMM_STREAM_TIMEOUT": "60" if cancel else "2"})
    try:
        fd = ram_fds(vm.proc.pid)
        walking(fd)
        target = FakeTarget(tmp_path, hang_up=True, listen=True, silent=True)
        vm.cmd("migrate-set-parameters", mode="cpr-transfer")
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        vm.cmd("migrate", channels=_channels(target.main_path, target.cpr_path))
        if cancel:
            wait_for(lambda: vm.status() == "finish-migrate", what="the source to stop for the hand-over")
            assert vm.cmd("migrate_cancel") == {"return": {}}
        info = wait_migration(vm.qmp, timeout=30)
        if cancel:
            assert info["status"] == "cancelled", info
        else:
            assert info["status"] == "failed", info
            assert "the target did not report its load within 2 s" in info["error-desc"]
        assert vm.status() == "running"
        still_walking(fd)
    finally:
        target.close()
        vm.close()


@pytest.mark.parametrize("return_path", [True, False], ids=["return-path", "no-return-path"])
def test_target_that_fails_to_load(qmp_vm, vmm, ram_fds, tmp_path, return_path):
    args = walker(256)
    src = qmp_vm(*args)
    fd = ram_fds(src.proc.pid)
    walking(fd)
    main, cpr = tmp_path / "main.sock", tmp_path / "cpr.sock"
    # One serial port more than the source: the target cannot load the device state.
    dst = vmm.start(*args, "-serial", "null", "-incoming", f"unix:{main}", "-incoming", _cpr_channel(cpr))
    wait_for(cpr.exists, what="the cpr channel")
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": return_path}])
    src.cmd("migrate", channels=_channels(main, cpr))
    info = wait_migration(src.qmp)
    assert dst.wait(30) == 1
    if return_path:
        assert info["status"] == "failed"
        assert "the target failed to load the state: FAIL serial[1]: missing" in info["error-desc"]
        assert src.status() == "running"  # resumed on the target's verdict
        still_walking(fd)
    elif info["status"] == "failed":  # the target hung up while the last records were still going out
        assert src.status() == "running"
        still_walking(fd)
    else:
        assert info["status"] == "completed"  # as QEMU: the source cannot know
        assert src.status() == "postmigrate"
        assert "handed over" in src.cmd("migrate", uri=f"unix:{main}")["error"]["desc"]
        assert src.cmd("cont") == {"return": {}}  # the user's way back, as in QEMU
        still_walking(fd)


def test_new_image_takes_the_state_and_unsets_the_variable(monkeypatch):
    """What the new image does first thing (in-process: /proc/PID/environ of an exec'd
    process always shows the environment it was started with)."""
    from minivmm.cpr.fdtable import FdTable, set_cloexec
    from minivmm.cpr.state import ENV, CprState, state_memfd, take_exec_state

    r, w = os.pipe()
    table = FdTable()
    table.save("getfd", "pipe-r", r)
    table.save("getfd", "pipe-w", w)
    memfd = state_memfd(CprState("cpr-exec", table, {"stop": 1}))
    for fd in (r, w, memfd):
        set_cloexec(fd, False)  # as the old image leaves them
    monkeypatch.setenv(ENV, str(memfd))
    try:
        state = take_exec_state()
        assert ENV not in os.environ
        assert state.table.fds == {("getfd", "pipe-r"): r, ("getfd", "pipe-w"): w}
        assert state.times == {"stop": 1}
        for fd in (r, w):
            assert not os.get_inheritable(fd)  # close-on-exec again
        with pytest.raises(OSError):
            os.fstat(memfd)  # the state memfd is closed
    finally:
        os.close(r)
        os.close(w)


def test_fd_option_takes_an_inherited_socket_and_is_looked_up_by_id_in_cpr(vmm, tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen(1)
    args = [
        *walker(128),
        "-chardev",
        f"socket,id=mon0,fd={listener.fileno()},server=on,wait=off",
        "-mon",
        "chardev=mon0,mode=control",
    ]
    proc = vmm.start(*args, pass_fds=[listener.fileno()])
    listener.close()  # the VMM has its own copy
    client = qmp_connect(str(tmp_path / "inherited.sock"))
    try:
        assert client.cmd("query-status")["status"] == "running"
        # In the next image the number is ignored: the saved fd is found by the id "mon0".
        state = tmp_path / "vm.state"
        cmd = [sys.executable, "-m", "minivmm", *args, "-incoming", f"file:{state}"]
        client.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": cmd})
        client.cmd("migrate", uri=f"file:{state}")
        wait_exec(client)
        client = qmp_connect(str(tmp_path / "inherited.sock"))
        wait_status(client, "running")
        assert proc.poll() is None
        # An id that was never saved cannot come from anywhere.
        bad = [
            sys.executable,
            "-m",
            "minivmm",
            *walker(128),
            "-chardev",
            "socket,id=other,fd=99,server=on,wait=off",
            "-mon",
            "chardev=other,mode=control",
            "-incoming",
            f"file:{state}",
        ]
        client.cmd(
            "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": bad}
        )  # a new image starts with defaults
        client.cmd("migrate", uri=f"file:{state}")
        assert proc.wait(30) == 1
        assert "cannot find saved value for fd other" in proc.stderr.read().decode()
    finally:
        client.close()


def test_cpr_transfer_with_an_inherited_cpr_socket(qmp_vm, vmm, ram_fds, tmp_path):
    """addr.type=fd: the target's cpr channel is a socket already listening on an inherited fd."""
    args = walker(256)
    src = qmp_vm(*args)
    fd = ram_fds(src.proc.pid)
    walking(fd)
    cpr, main = tmp_path / "cpr.sock", tmp_path / "main.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(cpr))
    listener.listen(1)
    vmm.start(
        *args,
        "-incoming",
        f"unix:{main}",
        "-incoming",
        f"cpr,addr.transport=socket,addr.type=fd,addr.str={listener.fileno()}",
        pass_fds=[listener.fileno()],
    )
    listener.close()
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    src.cmd("migrate", channels=_channels(main, cpr))
    assert wait_migration(src.qmp)["status"] == "completed"
    still_walking(fd)

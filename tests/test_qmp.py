"""The QMP monitor with QEMU's own client library (qemu.qmp), its qmp-shell,
and raw sockets for the protocol's error paths; every check is against a
real guest."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import DEBUG_EXIT, NO_EMULATION_FAILURE, WALKER, Raw, guest, still_walking, wait_for, walking
from minivmm.guests.abwalk import read_status
from minivmm.machine.control import EXIT_PANIC

# --- clients from qemu.qmp --------------------------------------------------------------------


def test_async_qmp_client_session(qmp_vm):
    from qemu.qmp import EventListener, QMPClient

    vm = qmp_vm(*WALKER, "-name", "async", negotiate=False)
    vm.qmp.close()  # free the monitor: it serves one client at a time

    async def session():
        client = QMPClient("test")
        await client.connect(vm.socket)
        assert client.greeting.QMP.version["package"].startswith("minivmm")
        assert (await client.execute("query-name")) == {"name": "async"}
        listener = EventListener()
        with client.listen(listener):
            await client.execute("stop")
            assert (await client.execute("query-status"))["status"] == "paused"
            await client.execute("cont")
            seen = [(await asyncio.wait_for(listener.get(), 10))["event"] for _ in range(2)]
        assert seen == ["STOP", "RESUME"]
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"qmp_capabilities", "stop", "cont", "quit", "pmemsave", "getfd", "human-monitor-command"} <= names
        await client.disconnect()

    asyncio.run(session())


def test_stop_and_cont_freeze_and_thaw_guest_ram(qmp_vm, ram_fds):
    vm = qmp_vm(*WALKER)
    fd = ram_fds(vm.proc.pid)
    walking(fd)
    assert vm.cmd("stop") == {"return": {}}
    assert vm.event("STOP")
    frozen = read_status(fd)
    time.sleep(0.3)
    assert read_status(fd) == frozen, "guest RAM changed while stopped"
    assert vm.status() == "paused"
    assert vm.cmd("cont") == {"return": {}}
    assert vm.event("RESUME")
    wait_for(lambda: read_status(fd).passes > frozen.passes, what="the walker to go on")
    assert vm.status() == "running"


def test_quit_ends_with_status_0_and_a_shutdown_event(qmp_vm):
    vm = qmp_vm(*WALKER)
    assert vm.cmd("quit") == {"return": {}}
    ev = vm.event("SHUTDOWN")
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert vm.proc.wait(20) == 0


def test_guest_poweroff_is_a_guest_shutdown_event(qmp_vm):
    vm = qmp_vm("-kernel", guest("hello32.elf"), "-S")
    vm.cmd("cont")
    assert vm.event("SHUTDOWN")["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert vm.proc.wait(20) == 0


def test_qmp_shell_drives_commands(qmp_vm):
    vm = qmp_vm(*WALKER, "-name", "shell")
    vm.qmp.close()
    out = subprocess.run(
        [sys.executable, "-m", "qemu.qmp.qmp_shell", vm.socket],  # qmp-shell, wherever PATH points
        input="query-name\nstop\nquery-status\n",
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert '{"return": {"name": "shell"}}' in out
    assert '"status": "paused"' in out
    hmp = subprocess.run(
        ["qmp-shell", "-H", vm.socket],
        input="info status\ncont\ninfo status\n",
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "VM status: paused" in hmp and "VM status: running" in hmp


# --- commands -----------------------------------------------------------------------------------


def test_queries(qmp_vm):
    vm = qmp_vm("-kernel", guest("smp.elf"), "-smp", "2", "-S", "-name", "guest=q1")
    assert vm.greeting["QMP"]["capabilities"] == []
    assert vm.cmd("query-version")["return"]["package"].startswith("minivmm ")
    assert vm.cmd("query-kvm")["return"] == {"enabled": True, "present": True}
    assert vm.cmd("query-name")["return"] == {"name": "q1"}
    cpus = vm.cmd("query-cpus-fast")["return"]
    assert [c["cpu-index"] for c in cpus] == [0, 1]
    for c in cpus:  # thread-id is the vCPU thread's real id
        assert os.path.exists(f"/proc/{vm.proc.pid}/task/{c['thread-id']}")
    assert vm.cmd("query-memdev")["return"] == [
        {
            "id": "pc.ram",
            "size": 128 << 20,
            "merge": True,
            "dump": True,
            "prealloc": False,
            "share": False,
            "reserve": True,
            "host-nodes": [],
            "policy": "default",
        }
    ]
    assert vm.status() == "prelaunch"


def test_pmemsave_and_memsave_write_guest_memory(qmp_vm, ram_fds, tmp_path):
    vm = qmp_vm(*WALKER)
    fd = ram_fds(vm.proc.pid)
    wait_for(lambda: read_status(fd), what="the walker")
    vm.cmd("stop")
    phys, virt = tmp_path / "phys.bin", tmp_path / "virt.bin"
    assert vm.cmd("pmemsave", val=0x1FF000, size=8192, filename=str(phys)) == {"return": {}}
    assert vm.cmd("memsave", val=0x1FF000, size=8192, filename=str(virt), **{"cpu-index": 0}) == {"return": {}}
    expected = os.pread(fd, 8192, 0x1FF000)
    assert phys.read_bytes() == expected == virt.read_bytes()
    assert expected.startswith(b"ABWK")
    err = vm.cmd("pmemsave", val=(64 << 20) - 4096, size=8192, filename=str(phys))["error"]
    assert err == {"class": "GenericError", "desc": "Invalid addr 0x0000000003fff000/size 8192 specified"}
    err = vm.cmd("pmemsave", val=0, size=16, filename=str(tmp_path / "no" / "such"))["error"]
    assert err["desc"].startswith(f"Could not open '{tmp_path}/no/such'")
    err = vm.cmd("memsave", val=0, size=1, filename=str(virt), **{"cpu-index": 7})["error"]
    assert err["desc"] == "Parameter 'cpu-index' expects a CPU number"


def test_human_monitor_commands(qmp_vm):
    vm = qmp_vm(*WALKER)

    def hmp(line):
        return vm.cmd("human-monitor-command", **{"command-line": line})["return"]

    assert hmp("info status") == "VM status: running\r\n"
    regs = hmp("info registers")
    assert re.search(r"^RIP=00000000001[0-9a-f]{5} RFL=[0-9a-f]{8} \[.{7}\] CPL=3", regs, re.M), regs
    assert re.search(r"^CS =002b 0000000000000000 ffffffff 00a0fb00\r$", regs, re.M), regs  # 64-bit user code
    assert "EFER=0000000000000d01" in regs  # SCE, LME, LMA, NX
    mtree = hmp("info mtree")
    assert "0000000000000000-0000000003ffffff (prio 0, ram): pc.ram\r\n" in mtree
    assert "00000000000003f8-00000000000003ff (prio 0, i/o): serial0\r\n" in mtree
    assert hmp("info cpus").startswith("* CPU #0: thread_id=")
    assert hmp("frobnicate") == "unknown command: 'frobnicate'\r\n"
    assert hmp("stop") == "" and vm.status() == "paused"
    assert hmp("info status") == "VM status: paused\r\n"


def test_system_reset_reboots_the_guest(qmp_vm, tmp_path):
    log = tmp_path / "serial.log"
    vm = qmp_vm("-kernel", guest("hello32.elf"), "-append", "echo", "-serial", f"file:{log}")
    wait_for(lambda: b"mods=0" in log.read_bytes(), what="the first boot")
    assert vm.cmd("system_reset") == {"return": {}}
    assert vm.event("RESET")["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    wait_for(lambda: log.read_bytes().count(b"hello32: protected mode") == 2, what="the second boot")


def test_getfd_and_closefd(qmp_vm):
    vm = qmp_vm(*WALKER)
    r, w = os.pipe()
    try:
        vm.qmp.send_fd_scm(r)
        assert vm.cmd("getfd", fdname="mypipe") == {"return": {}}
        pid = vm.proc.pid
        inode = os.readlink(f"/proc/self/fd/{r}")
        held = [fd for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == inode]
        assert len(held) == 1
        with open(f"/proc/{pid}/fdinfo/{held[0]}") as f:
            flags = int(re.search(r"flags:\s+(\d+)", f.read()).group(1), 8)
        assert flags & 0o2000000, "received fds must be close-on-exec"
        assert vm.cmd("closefd", fdname="mypipe") == {"return": {}}
        assert not any(os.readlink(f"/proc/{pid}/fd/{fd}") == inode for fd in os.listdir(f"/proc/{pid}/fd"))
        assert vm.cmd("closefd", fdname="mypipe")["error"]["desc"] == "File descriptor named 'mypipe' not found"
        assert vm.cmd("getfd", fdname="x")["error"]["desc"] == "No file descriptor supplied via SCM_RIGHTS"
        vm.qmp.send_fd_scm(w)
        err = vm.cmd("getfd", fdname="1abc")["error"]["desc"]
        assert err == "Parameter 'fdname' expects a name not starting with a digit"
    finally:
        os.close(r)
        os.close(w)


# --- run states --------------------------------------------------------------------------------


def test_prelaunch_running_paused(qmp_vm):
    vm = qmp_vm(*WALKER, "-S")
    assert vm.status() == "prelaunch"
    assert vm.cmd("stop") == {"return": {}} and vm.status() == "prelaunch"  # nothing runs: nothing to stop
    vm.cmd("cont")
    assert vm.event("RESUME") and vm.status() == "running"
    assert vm.cmd("cont") == {"return": {}} and vm.status() == "running"
    vm.cmd("stop")
    assert vm.status() == "paused"
    vm.cmd("system_reset")  # a reset while paused leaves the VM in prelaunch, as QEMU does
    vm.event("RESET")
    wait_for(lambda: vm.status() == "prelaunch", what="prelaunch after the reset")


def test_shutdown_state_needs_a_reset(qmp_vm):
    vm = qmp_vm("-kernel", guest("hello32.elf"), "-no-shutdown", "-S")
    vm.cmd("cont")
    assert vm.event("SHUTDOWN")["data"] == {"guest": True, "reason": "guest-shutdown"}
    wait_for(lambda: vm.status() == "shutdown", what="runstate shutdown")
    assert vm.cmd("cont")["error"] == {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}
    vm.cmd("system_reset")
    wait_for(lambda: vm.status() == "prelaunch", what="prelaunch after the reset")
    vm.cmd("cont")
    assert vm.event("SHUTDOWN")  # the guest ran again and powered off again
    assert vm.proc.poll() is None


def test_internal_error_keeps_the_vm_for_the_monitor(qmp_vm):
    vm = qmp_vm("-kernel", guest("long64.elf"), "-append", "badinsn")
    wait_for(lambda: vm.status() != "running", what="the internal error")
    if vm.status() == "shutdown":
        pytest.skip(NO_EMULATION_FAILURE)
    assert vm.status() == "internal-error"
    assert vm.cmd("cont")["error"]["desc"] == "Resetting the Virtual Machine is required"
    assert vm.proc.poll() is None
    assert vm.cmd("quit") == {"return": {}}
    assert vm.proc.wait(20) == 0
    assert "KVM internal error" in vm.proc.stderr.read().decode()


def test_guest_panicked(qmp_vm):
    vm = qmp_vm(
        "-kernel", guest("hello32.elf"), "-append", "panic", "-device", "pvpanic", "-action", "panic=pause", "-S"
    )
    vm.cmd("cont")  # started only now, so the event cannot come before the client
    assert vm.event("GUEST_PANICKED")["data"] == {"action": "pause"}
    wait_for(lambda: vm.status() == "guest-panicked", what="runstate guest-panicked")
    assert vm.cmd("cont") == {"return": {}}  # QEMU lets a panicked guest go on
    assert vm.status() == "running"


def test_panic_default_action_shuts_down(vmm):
    r = vmm.run(
        "-kernel",
        guest("hello32.elf"),
        "-append",
        "panic",
        "-device",
        "pvpanic",
        "-action",
        "panic=exit-failure",
        *DEBUG_EXIT,
    )
    assert r.status == 1 and "hello32: panic" in r.stdout
    assert r.stderr == "minivmm: the guest panicked (-action panic=exit-failure)\n"


def test_a_panic_with_the_default_action_has_its_own_exit_status(vmm):
    """-action panic=shutdown (QEMU's default) ends the run; the status says it was a panic, not a power-off."""
    r = vmm.run("-kernel", guest("hello32.elf"), "-append", "panic", "-device", "pvpanic", *DEBUG_EXIT)
    assert r.status == EXIT_PANIC and "hello32: panic" in r.stdout
    assert r.stderr == "minivmm: the guest panicked (-action panic=shutdown)\n"


# --- endpoints ---------------------------------------------------------------------------------


def test_socket_is_0600_and_a_stale_one_is_replaced(vmm, qmp_vm, tmp_path):
    path = tmp_path / "qmp0.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    vm = qmp_vm(*WALKER)
    assert vm.socket == str(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert vm.status() == "running"
    (tmp_path / "notasocket").write_text("x")
    r = vmm.run(*WALKER, "-qmp", f"unix:{tmp_path / 'notasocket'},server=on,wait=off")
    assert r.status == 1 and "exists and is not a socket" in r.stderr


def test_several_monitors_tcp_and_chardev(vmm, tmp_path):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mon = tmp_path / "mon.sock"
    proc = vmm.start(
        *WALKER,
        "-qmp",
        f"tcp:127.0.0.1:{port},server=on,wait=off",
        "-chardev",
        f"socket,id=m1,path={mon},server=on,wait=off",
        "-mon",
        "chardev=m1,mode=control",
    )
    wait_for(lambda: mon.exists(), what="the chardev monitor")
    clients = [QEMUMonitorProtocol(("127.0.0.1", port)), QEMUMonitorProtocol(str(mon))]
    try:
        for c in clients:
            c.connect()
        clients[0].cmd("stop")
        for c in clients:  # both monitors get the event
            assert c.pull_event(wait=10.0)["event"] == "STOP"
        assert clients[1].cmd("query-status")["status"] == "paused"
    finally:
        for c in clients:
            c.close()
    assert proc.poll() is None


def test_tcp_monitor_refuses_non_loopback(vmm):
    r = vmm.run(*WALKER, "-qmp", "tcp:0.0.0.0:4444,server=on,wait=off")
    assert r.status == 1 and "is not loopback" in r.stderr


def test_wait_on_holds_the_guest_until_a_client_connects(vmm, tmp_path):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock, log = tmp_path / "w.sock", tmp_path / "serial.log"
    proc = vmm.start("-kernel", guest("abwalk.elf"), "-serial", f"file:{log}", "-qmp", f"unix:{sock},server=on")
    wait_for(sock.exists, what="the socket")
    time.sleep(0.5)
    assert not log.exists() or log.read_bytes() == b""  # the machine has not started
    client = QEMUMonitorProtocol(str(sock))
    client.connect()
    try:
        wait_for(lambda: log.read_bytes().startswith(b"A"), what="the guest to start")
        assert client.cmd("query-status")["status"] == "running"
    finally:
        client.close()
    assert proc.poll() is None


# --- protocol errors, with raw sockets ------------------------------------------------------------


def test_errors_before_and_after_negotiation(raw):
    assert "QMP" in raw.greeting
    err = raw.reply(b'{"execute": "query-status", "id": 1}')
    assert err == {
        "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": 1,
    }
    assert raw.reply(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')["error"]["desc"] == (
        "Capability oob not available"
    )
    assert raw.reply(b'{"execute": "qmp_capabilities", "id": {"a": [1]}}') == {"return": {}, "id": {"a": [1]}}
    assert raw.reply(b'{"execute": "qmp_capabilities"}')["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored",
    }


@pytest.mark.parametrize(
    "request_bytes,error_class,desc",
    [
        (b'{"execute": "no-such-command"}', "CommandNotFound", "The command no-such-command has not been found"),
        (b'{"execute": "stop", "arguments": {"x": 1}}', "GenericError", "Parameter 'x' is unexpected"),
        (b'{"execute": "getfd"}', "GenericError", "Parameter 'fdname' is missing"),
        (
            b'{"execute": "pmemsave", "arguments": {"val": "0", "size": 1, "filename": "f"}}',
            "GenericError",
            "Invalid parameter type for 'val', expected: integer",
        ),
        (
            b'{"execute": "getfd", "arguments": {"fdname": 7}}',
            "GenericError",
            "Invalid parameter type for 'fdname', expected: string",
        ),
        (b'{"arguments": {}}', "GenericError", "QMP input lacks member 'execute'"),
        (b'{"execute": 42}', "GenericError", "QMP input member 'execute' must be a string"),
        (b'{"execute": "stop", "arguments": []}', "GenericError", "QMP input member 'arguments' must be an object"),
        (b'{"execute": "stop", "colour": "red"}', "GenericError", "QMP input member 'colour' is unexpected"),
        (b"[1, 2, 3]", "GenericError", "QMP input must be a JSON object"),
        (b'"just a string" ', "GenericError", "QMP input must be a JSON object"),
        (b"garbage\n", "GenericError", "JSON parse error, invalid keyword 'garbage'"),
        (b'{"execute": }', "GenericError", "JSON parse error, expecting value"),
        (
            b'{"execute": "stop",}',
            "GenericError",
            "JSON parse error, expecting property name enclosed in double quotes",
        ),
        (b'{"execute": "\xff\xfe"}', "GenericError", "JSON parse error, invalid UTF-8 sequence in string"),
    ],
)
def test_error_classes_and_wording(raw, request_bytes, error_class, desc):
    raw.reply(b'{"execute": "qmp_capabilities"}')
    assert raw.reply(request_bytes) == {"error": {"class": error_class, "desc": desc}}
    assert raw.reply(b'{"execute": "query-status"}')["return"]["status"] in ("running", "paused")


def test_huge_and_deep_input_is_refused_and_the_connection_survives(raw):
    raw.reply(b'{"execute": "qmp_capabilities"}')
    big = b'{"execute": "' + b"x" * (20 << 20) + b'"}'
    assert raw.reply(big)["error"]["desc"] == "JSON parse error, token size limit exceeded"
    assert raw.reply(b"[" * 5000 + b"]" * 5000)["error"]["desc"] == "JSON parse error, nesting depth limit exceeded"
    assert raw.reply(b"z" * (1 << 20) + b"\n")["error"]["desc"].startswith("JSON parse error, invalid keyword 'zzz")
    assert raw.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"


def test_commands_split_and_joined_across_writes(raw):
    raw.send(b'{"execute": "qmp_capa')
    time.sleep(0.1)
    assert raw.reply(b'bilities"}') == {"return": {}}
    raw.send(b'{"execute": "query-name", "id": "a"}{"execute": "query-kvm", "id": "b"}\n')
    assert [raw.read()["id"], raw.read()["id"]] == ["a", "b"]


def test_stalled_and_flooding_clients_block_neither_the_vm_nor_other_monitors(qmp_vm, ram_fds, tmp_path):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    other = tmp_path / "other.sock"
    vm = qmp_vm(*WALKER, "-qmp", f"unix:{other},server=on,wait=off")
    fd = ram_fds(vm.proc.pid)
    wait_for(lambda: read_status(fd), what="the walker")
    vm.qmp.close()
    # A client that negotiates, then floods requests and never reads a reply.
    stalled = Raw(vm.socket)
    stalled.send(b'{"execute": "qmp_capabilities"}')
    stalled.sock.setblocking(False)
    request = b'{"execute": "human-monitor-command", "arguments": {"command-line": "info mtree"}}'
    sent, deadline = 0, time.monotonic() + 10
    while sent < (8 << 20) and time.monotonic() < deadline:
        try:
            sent += stalled.sock.send(request * 256)
        except BlockingIOError:
            time.sleep(0.01)
    # Meanwhile the other monitor answers at once and the guest keeps walking.
    client = QEMUMonitorProtocol(str(other))
    client.connect()
    client.settimeout(5)
    try:
        for _ in range(20):
            assert client.cmd("query-status")["status"] == "running"
        still_walking(fd, by=2)
        stalled.close()
        # The flooded monitor serves the next client again.
        again = QEMUMonitorProtocol(vm.socket)
        wait_for(lambda: _try_connect(again), what="the monitor to accept again")
        assert again.cmd("query-status")["status"] == "running"
        again.close()
    finally:
        client.close()


def _try_connect(client) -> bool:
    try:
        client.connect()
        return True
    except Exception:
        return False

"""The guest is never lost: bad QMP arguments, a failing command or device,
and resets after a live update keep the VM (or, when the guest truly cannot
go on, park it in internal-error with an event). Real KVM, real guests."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
from test_cpr import wait_exec

from conftest import WALKER, guest, still_walking, wait_for, wait_migration, walking
from minivmm import runstate
from minivmm.config import ChardevConfig, MachineConfig, MonitorConfig
from minivmm.machine import Machine
from minivmm.vmprocess import qmp_connect


def _strict(line: bytes) -> dict:
    """A reply as strict JSON: NaN and Infinity are not JSON."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


# --- QMP: every argument is checked before anything runs ----------------------------------------


@pytest.mark.parametrize(
    "command,arguments,fragment",
    [
        ("pmemsave", {"val": 0, "size": 16, "filename": "a\u0000b"}, "'filename' must not contain a NUL"),
        ("pmemsave", {"val": 0, "size": 16, "filename": "x" * 5000}, "'filename' is longer than 4096"),
        ("pmemsave", {"val": 0, "size": 16, "filename": "\ud800"}, "'filename' is not valid Unicode"),
        ("pmemsave", {"val": 1 << 70, "size": 16, "filename": "x"}, "'val' expects an integer from"),
        ("memsave", {"val": 0, "size": 16, "filename": "x", "cpu-index": 1 << 80}, "'cpu-index' expects an integer"),
        (
            "migrate",
            {"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": "f", "offset": "abc"}}]},
            "Parameter 'offset' expects a non-negative integer",
        ),  # noqa: E501
        ("migrate", {"channels": [1]}, "Invalid parameter type for 'channels[0]', expected: object"),
        ("migrate", {"uri": "tcp:127.0.0.1:99999"}, "port '99999' is not a number from 0 to 65535"),
        ("migrate", {"uri": "file:/tmp/x,offset=-1"}, "Parameter 'offset' expects a non-negative integer"),
        ("migrate-set-parameters", {"cpr-exec-command": ["minivmm", 7]}, "'cpr-exec-command[1]', expected: string"),
        ("migrate-set-parameters", {"cpr-exec-command": ["minivmm", "a\u0000"]}, "'cpr-exec-command[1]' must not"),
        ("migrate-set-parameters", {"cpr-exec-command": ["x"] * 2000}, "takes at most 1024 elements"),
        ("human-monitor-command", {"command-line": "info status", "cpu-index": -1}, "expects a CPU number"),
        ("getfd", {"fdname": "n" * 300}, "'fdname' is longer than 255"),
    ],
)
def test_bad_arguments_get_an_error_and_the_guest_runs_on(raw, ram_fds, command, arguments, fragment):
    raw.reply(b'{"execute": "qmp_capabilities"}')
    fd = ram_fds(raw.vm.proc.pid)
    walking(fd)
    reply = raw.reply(json.dumps({"execute": command, "arguments": arguments, "id": 7}).encode())
    assert reply["error"]["class"] == "GenericError" and fragment in reply["error"]["desc"], reply
    assert reply["id"] == 7
    assert raw.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"
    still_walking(fd)


def test_migrate_incoming_with_a_bad_port_keeps_waiting(qmp_vm):
    vm = qmp_vm(*WALKER, "-incoming", "defer")
    err = vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:99999")["error"]["desc"]
    assert "port '99999' is not a number from 0 to 65535" in err
    assert vm.cmd("migrate-incoming", uri="tcp:0.0.0.0:0")["error"]["desc"].startswith("refusing to listen on 0.0.0.0")
    assert vm.status() == "inmigrate" and vm.proc.poll() is None


def test_replies_are_always_json(raw):
    raw.reply(b'{"execute": "qmp_capabilities"}')
    raw.send(b'{"execute": "query-status", "id": 1e999}\n')
    line = raw.sock.recv(65536).split(b"\n")[0]
    reply = _strict(line)
    assert reply["error"]["desc"] == "JSON parse error, number '1e999' is out of range"
    big = 10**300
    reply = raw.reply(json.dumps({"execute": "query-status", "id": big}).encode())
    assert reply["id"] == big and reply["return"]["status"] == "running"


def test_a_fifo_never_blocks_the_monitor(raw, tmp_path):
    raw.reply(b'{"execute": "qmp_capabilities"}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    reply = raw.reply(
        json.dumps({"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": str(fifo)}}).encode()
    )
    assert "not a regular file" in reply["error"]["desc"]
    migrate = {"execute": "migrate", "arguments": {"uri": f"file:{fifo}"}}
    assert raw.reply(json.dumps(migrate).encode()) == {"return": {}}  # the failure comes from the migration
    assert time.monotonic() - start < 5
    assert raw.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"
    deadline = time.monotonic() + 10
    while (info := raw.reply(b'{"execute": "query-migrate"}')["return"])["status"] not in ("failed", "completed"):
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    assert info["status"] == "failed" and "not a regular file" in info["error-desc"]
    assert raw.reply(b'{"execute": "query-status"}')["return"]["status"] == "running"


# --- the barriers: a failing command or device never ends the process ---------------------------


class Boom:
    """A device model with a bug: every access raises."""

    name = "boom"

    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("bug in a device model")

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("bug in a device model")


UNASSIGNED_PORT = 0x1234  # long64 reads it at CPL3 (guests/long64.S)


def _long64(tmp_path, **kw) -> Machine:
    serial = ChardevConfig("serial0", "file", path=str(tmp_path / "serial.log"))
    return Machine(MachineConfig(kernel=guest("long64.elf"), serials=[serial], **kw))


def test_a_device_that_raises_stops_the_guest_with_a_message_not_a_dead_thread(tmp_path, capfd):
    m = _long64(tmp_path)
    try:
        m.devices.pio.register(UNASSIGNED_PORT, 1, Boom())
        status = m.run()  # no monitor: the guest cannot go on, so minivmm ends with status 1
        assert status == 1
        err = capfd.readouterr().err
        assert "1-byte read of port 0x1234 (boom) failed: RuntimeError: bug in a device model" in err
        assert all(t.thread.is_alive() and t.paused for t in m.vcpus)  # parked, not dead
    finally:
        m.close()


def test_with_a_monitor_the_failed_guest_waits_in_internal_error(tmp_path, capfd):
    sock = str(tmp_path / "qmp.sock")
    m = _long64(tmp_path, monitors=[MonitorConfig("mon0", path=sock)])
    events: list[str] = []
    m.control.add_event_listener(lambda name, data: events.append(name))
    seen: dict[str, object] = {}

    def watch() -> None:  # the machine runs on this (the main) thread; look at it from another
        deadline = time.monotonic() + 20
        while m.runstate != runstate.INTERNAL_ERROR and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.update(state=m.runstate, alive=all(t.thread.is_alive() for t in m.vcpus))
        m.control.request_shutdown("host-qmp-quit", force=True)

    try:
        m.devices.pio.register(UNASSIGNED_PORT, 1, Boom())
        threading.Thread(target=watch, daemon=True).start()
        m.run()
        assert seen == {"state": runstate.INTERNAL_ERROR, "alive": True}
        assert "STOP" in events
        assert "(boom) failed: RuntimeError" in capfd.readouterr().err
    finally:
        m.close()


# --- a reset after a live update boots the machine afresh ------------------------------------------


def test_reset_while_waiting_for_an_incoming_migration(qmp_vm):
    vm = qmp_vm("-serial", "null", "-incoming", "defer")
    assert vm.cmd("system_reset") == {"return": {}}
    assert vm.event("RESET")["data"]["reason"] == "host-qmp-system-reset"
    assert vm.status() == "inmigrate" and vm.proc.poll() is None


@pytest.mark.parametrize("how", ["file", "cpr-exec"])
def test_reset_after_a_live_update_reboots_the_guest(qmp_vm, ram_fds, tmp_path, how):
    log = tmp_path / "serial.log"
    args = ["-kernel", guest("abwalk.elf"), "-m", "64", "-machine", "aux-ram-share=on", "-serial", f"file:{log}"]
    vm = qmp_vm(*args)
    fd = ram_fds(vm.proc.pid)
    walking(fd)
    state = tmp_path / "vm.state"
    if how == "file":
        assert vm.cmd("migrate", uri=f"file:{state}") == {"return": {}}
        assert wait_migration(vm.qmp)["status"] == "completed"
        vm.cmd("quit")
        vm.proc.wait(20)
        vm = qmp_vm(*args, "-incoming", f"file:{state}")
        vm.cmd("cont")
        fd = ram_fds(vm.proc.pid)
    else:
        argv = [sys.executable, "-m", "minivmm", *args, "-qmp", f"unix:{vm.socket},server=on,wait=off"]
        vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [*argv, "-incoming", f"file:{state}"]})
        vm.cmd("migrate", uri=f"file:{state}")
        wait_exec(vm.qmp)
        vm.qmp = qmp_connect(vm.socket)
    still_walking(fd)
    boots = log.read_bytes().count(b"A")
    for n in range(2):  # as often as it likes
        assert vm.cmd("system_reset") == {"return": {}}
        wait_for(lambda n=n: log.read_bytes().count(b"A") >= boots + n + 1, what="the guest to boot again")
    assert vm.status() == "running"
    still_walking(fd)

"""Shared helpers: run minivmm as a real process against /dev/kvm, always in
its own process group, always killed at the end of the test."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from minivmm import guests
from minivmm.vmprocess import kill_group

REPO = Path(__file__).resolve().parent.parent
DEBUG_EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"]
NO_EMULATION_FAILURE = (
    "needs nested paravirtual KVM (PVM), whose emulator cannot run xgetbv at CPL0; "
    "this host's KVM runs it, so there is no internal error to see"
)
GUEST_EXIT_OK = (0x10 << 1) | 1  # the shipped guests write 0x10 to debug-exit when they succeed


def guest(name: str) -> str:
    return guests.path(name)


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str


class Vmm:
    """Starts minivmm processes and kills every one of them (by process group) at teardown."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, stdin=subprocess.DEVNULL, env: dict | None = None, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minivmm", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            **kw,
        )
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 60, input: bytes | None = None, **kw) -> Result:
        proc = self.start(*args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, err = proc.communicate()
            pytest.fail(f"minivmm {' '.join(args)} did not finish in {timeout}s; stdout={out!r} stderr={err!r}")
        return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """The whole process group, even when its leader is gone: holders, watchdogs and a
        restarted VMM stay in the group of the minivmm that started them."""
        kill_group(proc)

    def cleanup(self) -> None:
        for proc in self.procs:
            self.kill(proc)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[Vmm]:
    v = Vmm(tmp_path)
    try:
        yield v
    finally:
        v.cleanup()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class QmpVm:
    """A minivmm process with a QMP socket, and qemu.qmp's legacy sync client on it."""

    def __init__(self, vmm: Vmm, *args: str, negotiate: bool = True, **kw) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.socket = str(vmm.cwd / f"qmp{len(vmm.procs)}.sock")
        self.proc = vmm.start(*args, "-qmp", f"unix:{self.socket},server=on,wait=off", **kw)
        wait_for(lambda: _listening(self.socket) or self.proc.poll() is not None, what="the QMP socket")
        assert self.proc.poll() is None, self.proc.stderr.read().decode()
        self.qmp = QEMUMonitorProtocol(self.socket)
        self.greeting = self.qmp.connect(negotiate=negotiate)
        self.qmp.settimeout(20)

    def cmd(self, name: str, **args):
        """The command's reply: {"return": ...} or {"error": ...}."""
        return self.qmp.cmd_obj({"execute": name, **({"arguments": args} if args else {})})

    def status(self) -> str:
        return self.cmd("query-status")["return"]["status"]

    def event(self, name: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.qmp.pull_event(wait=max(0.01, deadline - time.monotonic()))
            if ev and ev["event"] == name:
                return ev
        pytest.fail(f"no {name} event within {timeout}s")

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:
            pass


def _listening(path: str) -> bool:
    """Something accepts connections on ``path`` (a stale socket file does not)."""
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture
def qmp_vm(vmm: Vmm):
    made: list[QmpVm] = []

    def start(*args: str, **kw) -> QmpVm:
        vm = QmpVm(vmm, *args, **kw)
        made.append(vm)
        return vm

    yield start
    for vm in made:
        vm.close()


# --- guest RAM and QMP helpers shared by the migration, CPR and monitor tests ------------------

MiB = 1 << 20


def ram_path(pid: int) -> str:
    """/proc path of a VMM's pc.ram memfd (reading it needs aux-ram-share=on to be the guest's RAM)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pc.ram"):
            return f"/proc/{pid}/fd/{fd}"
    pytest.fail(f"no pc.ram memfd in process {pid}")


def ram_hash(pid: int, size: int) -> str:
    import hashlib

    fd = os.open(ram_path(pid), os.O_RDONLY)
    try:
        h = hashlib.sha256()
        for off in range(0, size, 64 * MiB):
            h.update(os.pread(fd, 64 * MiB, off))
        return h.hexdigest()
    finally:
        os.close(fd)


@pytest.fixture
def ram_fds():
    """Open VMMs' RAM memfds from outside; closed at teardown."""
    fds: list[int] = []

    def open_ram(pid: int) -> int:
        fds.append(os.open(ram_path(pid), os.O_RDONLY))
        return fds[-1]

    yield open_ram
    for fd in fds:
        os.close(fd)


def wait_migration(client, timeout: float = 60) -> dict:
    """query-migrate once the migration has ended."""
    return wait_for(
        lambda: (q := client.cmd("query-migrate")).get("status") in ("completed", "failed", "cancelled") and q,
        timeout=timeout,
        what="the migration to end",
    )


def walking(fd: int, more_than: int = 1) -> None:
    """Wait until the A-B walker (its RAM open as ``fd``) has made more than ``more_than`` passes."""
    from minivmm.guests.abwalk import read_status

    wait_for(lambda: (s := read_status(fd)) and s.passes > more_than, what="the walker to walk")


def still_walking(fd: int, by: int = 0) -> None:
    """Wait until the walker makes more than ``by`` further passes: the guest runs."""
    from minivmm.guests.abwalk import read_status

    before = read_status(fd).passes
    wait_for(lambda: read_status(fd).passes > before + by, what="the walker to go on")


# --- raw QMP: exactly the bytes a test writes ---------------------------------------------------

WALKER = ["-kernel", guest("abwalk.elf"), "-m", "64", "-machine", "aux-ram-share=on", "-serial", "null"]


class Raw:
    """A bare socket: exactly the bytes the test writes."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(20)
        self.buf = b""
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def reply(self, data: bytes) -> dict:
        self.send(data)
        while True:
            msg = self.read()
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(qmp_vm):
    """A raw QMP connection to the 64 MiB A-B walker, not yet negotiated."""
    vm = qmp_vm(*WALKER, negotiate=False)
    vm.qmp.close()
    r = Raw(vm.socket)
    r.vm = vm
    yield r
    r.close()


# --- cpr-exec helpers shared by the CPR and interrupt-controller tests --------------------------


def argv_of(vm, *args: str) -> list[str]:
    """The full command line of a VM started by the qmp_vm fixture."""
    return [sys.executable, "-m", "minivmm", *args, "-qmp", f"unix:{vm.socket},server=on,wait=off"]


def wait_exec(client) -> None:
    """After a cpr-exec migrate: the old image's monitor connection drops when it execs."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.cmd_obj({"execute": "query-status"})
        except Exception:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the VMM never exec'd")
    try:
        client.close()
    except Exception:
        pass


# --- a vfio-user device server (the vfio-user-pci and fuzz tests) ----------------------------


class VfioUserServer:
    """minivmm-vfio-user on a socket in the test's directory, killed (its process group) at the end."""

    def __init__(self, tmp: Path) -> None:
        self.socket, self.log = str(tmp / "dev.sock"), tmp / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "minivmm.vfio_user.sample", self.socket],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, what="the server's socket")
        assert self.proc.poll() is None, self.log.read_text()

    def clients(self) -> list[str]:
        return re.findall(r"client (\d+) (connected|gone)", self.log.read_text())

    def kill(self) -> None:
        kill_group(self.proc)


@pytest.fixture
def server(tmp_path):
    s = VfioUserServer(tmp_path)
    try:
        yield s
    finally:
        s.kill()

"""A minivmm child process driven from outside, as a user would: its QMP
monitor (QEMU's own client library) and its guest RAM memfd, read through
/proc. The demo and the benchmarks use it; nothing in the VMM does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

from .guests.abwalk import Status, read_status


def qmp_connect(
    path: str, timeout: float = 30, reply_timeout: float = 30, proc: subprocess.Popen | None = None
) -> QEMUMonitorProtocol:
    """qemu.qmp's sync client on ``path``, retried while the VMM comes up (or back, after a
    cpr-exec); ``proc``, if given, exiting meanwhile is an error with its stderr."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the VMM exited: {proc.stderr.read().decode().strip()}")
        client = QEMUMonitorProtocol(path)
        try:
            client.connect()
            client.settimeout(reply_timeout)
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


MINIVMM = [sys.executable, "-m", "minivmm"]


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started in a session of its own, and everything in its process group
    (holders, watchdogs and a restarted VMM stay in the group of the minivmm that started
    them), even when the leader is gone; then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class VmProcess:
    """``program``: the VMM's argv before ``args`` (minivmm by default; QEMU in the
    side-by-side benchmarks, which find its RAM by ``ram_bytes``, the memfd's size)."""

    def __init__(
        self,
        workdir: str,
        name: str,
        args: list[str],
        env: dict | None = None,
        program: list[str] = MINIVMM,
        ram_bytes: int | None = None,
    ) -> None:
        self.socket = os.path.join(workdir, f"{name}.qmp")
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # left by a killed VM
        self.ram_bytes = ram_bytes
        self.argv = [*program, *args, "-qmp", f"unix:{self.socket},server=on,wait=off"]
        self.proc = subprocess.Popen(
            self.argv, start_new_session=True, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self.qmp = self.connect()
        self.fd = self.open_ram()

    def connect(self, timeout: float = 60) -> QEMUMonitorProtocol:
        return qmp_connect(self.socket, timeout, reply_timeout=600, proc=self.proc)

    def reconnect(self) -> None:
        """After a cpr-exec: the old connection is gone, the socket is the same."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the old image's monitor drops us
            try:
                self.qmp.cmd_obj({"execute": "query-status"})
                time.sleep(0.005)
            except Exception:
                break
        try:
            self.qmp.close()
        except Exception:
            pass
        self.qmp = self.connect()

    def ram_path(self) -> str:
        """The guest RAM memfd: minivmm's pc.ram, or the one of ``ram_bytes``."""
        pid = self.proc.pid
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(path)
                if self.ram_bytes is None:
                    found = target.startswith("/memfd:pc.ram")
                else:
                    found = target.startswith("/memfd:") and os.stat(path).st_size == self.ram_bytes
            except FileNotFoundError:  # closed meanwhile
                continue
            if found:
                return path
        raise RuntimeError(f"no guest RAM memfd in process {pid}")

    def open_ram(self) -> int:
        return os.open(self.ram_path(), os.O_RDONLY)

    def status(self) -> Status | None:
        return read_status(self.fd)

    def wait_passes(self, n: int, timeout: float = 600) -> Status:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s is not None and s.passes >= n:
                return s
            time.sleep(0.01)
        raise RuntimeError(f"the walker did not reach {n} passes in {timeout}s")

    def wait_migration(self) -> dict:
        while (q := self.qmp.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            time.sleep(0.005)
        if q["status"] != "completed":
            raise RuntimeError(f"migration {q['status']}: {q.get('error-desc', '')}")
        return q

    def close(self) -> None:
        """Kill the VMM (its process group); once is enough, twice does nothing more."""
        if self.fd < 0:
            return
        try:
            self.qmp.close()
        except Exception:
            pass
        os.close(self.fd)
        self.fd = -1
        kill_group(self.proc)
        self.proc.stderr.close()


class Watch(threading.Thread):
    """Every time a walker's progress changes; the pause is the longest gap between two."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.stopped = fd, False
        self.changes: list[float] = []
        self.start()

    def progress(self):
        s = read_status(self.fd)
        return (s.passes, s.current) if s else None

    def run(self) -> None:
        seen = self.progress()
        while not self.stopped:
            now = self.progress()
            if now != seen:
                self.changes.append(time.monotonic())
                seen = now
            time.sleep(0.001)  # 1 ms: finer polling would itself slow the machine

    def pause_ms(self, settle: float = 1.0, timeout: float = 120) -> float:
        """Once the guest has run ``settle`` seconds after the update: the longest gap."""
        deadline = time.monotonic() + timeout
        start = len(self.changes)
        while time.monotonic() < deadline:
            gaps = [b - a for a, b in zip(self.changes[start - 1 :], self.changes[start:])] if start else []
            if gaps and max(gaps) > 0 and self.changes[-1] - self.changes[start - 1] > settle + max(gaps):
                break
            time.sleep(0.05)
        self.stopped = True
        self.join()
        changes = self.changes
        if len(changes) < 2:
            raise RuntimeError("the guest made no progress")
        return max(b - a for a, b in zip(changes, changes[1:])) * 1000

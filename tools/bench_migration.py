#!/usr/bin/env python3
"""Normal migration of the A-B walker at several RAM sizes, in one run:
stop-and-copy to a file and live precopy over a unix socket.

For each size it reports the save and restore times (from query-migrate on
each side) and the guest-visible pause: from the walker's last progress in
the source to its first progress in the target, watched from outside through
the RAM memfds (both sides run with aux-ram-share=on). This is the baseline
CPR's pause is compared with.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

from minivmm import guests  # noqa: E402
from minivmm.guests.abwalk import read_status  # noqa: E402

SIZES = {"256M": 256, "1G": 1024, "4G": 4096}


class Vm:
    def __init__(self, workdir: str, name: str, ram_mib: int, *extra: str) -> None:
        self.sock = os.path.join(workdir, f"{name}.qmp")
        argv = [
            sys.executable,
            "-m",
            "minivmm",
            "-kernel",
            guests.path("abwalk.elf"),
            "-m",
            str(ram_mib),
            "-machine",
            "aux-ram-share=on",
            "-mem-prealloc",
            "-serial",
            "null",
            "-qmp",
            f"unix:{self.sock},server=on,wait=off",
            *extra,
        ]
        if os.path.exists(self.sock):
            os.unlink(self.sock)  # left by a killed VM
        self.proc = subprocess.Popen(argv, start_new_session=True, stderr=subprocess.PIPE)
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise SystemExit(f"{name}: {self.proc.stderr.read().decode()}")
            time.sleep(0.01)
        self.qmp = QEMUMonitorProtocol(self.sock)
        self.qmp.connect()
        self.qmp.settimeout(600)
        self.fd = self._ram_fd()

    def _ram_fd(self) -> int:
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith("/memfd:pc.ram"):
                return os.open(f"/proc/{self.proc.pid}/fd/{fd}", os.O_RDONLY)
        raise SystemExit("no RAM memfd")

    def progress(self) -> tuple[int, int] | None:
        s = read_status(self.fd)
        return (s.passes, s.current) if s else None

    def wait_migration(self) -> dict:
        while (q := self.qmp.cmd("query-migrate")).get("status") not in ("completed", "failed"):
            time.sleep(0.01)
        if q["status"] != "completed":
            raise SystemExit(f"migration failed: {q}")
        return q

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:
            pass
        os.close(self.fd)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stderr.close()


class Watch(threading.Thread):
    """The time of the last change of a walker's progress (polled every 0.5 ms)."""

    def __init__(self, vm: Vm) -> None:
        super().__init__(daemon=True)
        self.vm, self.last_change, self.stop = vm, time.monotonic(), False
        self.start()

    def run(self) -> None:
        seen = self.vm.progress()
        while not self.stop:
            now = self.vm.progress()
            if now != seen:
                seen, self.last_change = now, time.monotonic()
            time.sleep(0.0005)


def first_progress(vm: Vm, timeout: float = 600) -> float:
    start = vm.progress()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.progress() != start:
            return time.monotonic()
        time.sleep(0.0005)
    raise SystemExit("the target never made progress")


def warm(vm: Vm) -> None:
    """Wait for the walker's first full pass (every page touched)."""
    while not (s := read_status(vm.fd)) or s.passes < 1:
        time.sleep(0.05)


def bench_file(workdir: str, ram: int) -> dict:
    path = os.path.join(workdir, "vm.state")
    src = Vm(workdir, "src", ram)
    try:
        warm(src)
        watch = Watch(src)
        src.qmp.cmd("migrate", uri=f"file:{path}")
        saved = src.wait_migration()
        watch.stop = True
        dst = Vm(workdir, "dst", ram, "-incoming", f"file:{path}")
        try:
            resumed = first_progress(dst)
            restored = dst.wait_migration()
            return {
                "save": saved["total-time"],
                "restore": restored["total-time"],
                "pause": (resumed - watch.last_change) * 1000,
                "bytes": os.path.getsize(path),
            }
        finally:
            dst.close()
    finally:
        src.close()
        if os.path.exists(path):
            os.unlink(path)


def bench_precopy(workdir: str, ram: int) -> dict:
    uri = f"unix:{os.path.join(workdir, 'mig.sock')}"
    dst = Vm(workdir, "dst", ram, "-incoming", uri)
    src = Vm(workdir, "src", ram)
    try:
        warm(src)
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        watch = Watch(src)
        src.qmp.cmd("migrate", uri=uri)
        info = src.wait_migration()
        resumed = first_progress(dst)
        watch.stop = True
        return {
            "total": info["total-time"],
            "downtime": info["downtime"],
            "passes": info["ram"]["dirty-sync-count"],
            "pause": (resumed - watch.last_change) * 1000,
        }
    finally:
        src.close()
        dst.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,1G,4G", help="comma-separated, from " + ", ".join(SIZES))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-migration-") as workdir:
        for name in args.sizes.split(","):
            ram = SIZES[name]
            f = bench_file(workdir, ram)
            p = bench_precopy(workdir, ram)
            rows.append((name, f, p))
            print(f"{name}: done", file=sys.stderr)
    print("normal migration of the A-B walker (times in ms)")
    print(
        f"{'RAM':>5} | {'file save':>9} {'restore':>8} {'pause':>8} {'file MiB':>8} | "
        f"{'precopy':>8} {'downtime':>8} {'pause':>8} {'passes':>6}"
    )
    base = rows[0][1]["pause"]
    for name, f, p in rows:
        print(
            f"{name:>5} | {f['save']:9.0f} {f['restore']:8.0f} {f['pause']:8.0f} {f['bytes'] >> 20:8d} | "
            f"{p['total']:8.0f} {p['downtime']:8.0f} {p['pause']:8.0f} {p['passes']:6d}"
        )
    print(
        "file-migration pause relative to the smallest size: "
        + ", ".join(f"{name} {f['pause'] / base:.1f}x" for name, f, _ in rows)
    )


if __name__ == "__main__":
    main()

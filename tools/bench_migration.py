#!/usr/bin/env python3
"""Normal migration of the A-B walker at several RAM sizes, in one run:
stop-and-copy to a file and live precopy over a unix socket.

For each size it reports the save and restore times (from query-migrate on
each side) and the guest-visible pause: the longest stretch without the
walker's progress, watched from outside through the RAM memfds (both sides
run with aux-ram-share=on). This is the baseline CPR's pause is compared with.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivmm import guests  # noqa: E402
from minivmm.vmprocess import VmProcess, Watch  # noqa: E402

SIZES = {"256M": 256, "1G": 1024, "4G": 4096}


def walker_args(ram: int) -> list[str]:
    return [
        "-kernel",
        guests.path("abwalk.elf"),
        "-m",
        str(ram),
        "-mem-prealloc",
        "-machine",
        "aux-ram-share=on",
        "-serial",
        "null",
    ]


def bench_file(workdir: str, ram: int) -> dict:
    path = os.path.join(workdir, "vm.state")
    src = VmProcess(workdir, "src", walker_args(ram))
    try:
        src.wait_passes(1)
        watch = Watch(src.fd)
        time.sleep(0.2)
        src.qmp.cmd("migrate", uri=f"file:{path}")
        saved = src.wait_migration()
        watch.stopped = True
        watch.join()
        last = watch.changes[-1]
        dst = VmProcess(workdir, "dst", [*walker_args(ram), "-incoming", f"file:{path}"])
        try:
            start = dst.status()
            while dst.status() == start:
                time.sleep(0.0002)
            resumed = time.monotonic()
            restored = dst.wait_migration()
            return {
                "save": saved["total-time"],
                "restore": restored["total-time"],
                "pause": (resumed - last) * 1000,
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
    dst = VmProcess(workdir, "dst", [*walker_args(ram), "-incoming", uri])
    src = VmProcess(workdir, "src", walker_args(ram))
    try:
        src.wait_passes(1)
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        watch = Watch(src.fd)  # the source's RAM: the target's is another memfd
        time.sleep(0.2)
        src.qmp.cmd("migrate", uri=uri)
        info = src.wait_migration()
        watch.stopped = True
        watch.join()
        last = watch.changes[-1]
        start = dst.status()
        while dst.status() == start:
            time.sleep(0.0002)
        return {
            "total": info["total-time"],
            "downtime": info["downtime"],
            "passes": info["ram"]["dirty-sync-count"],
            "pause": (time.monotonic() - last) * 1000,
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
            rows.append((name, bench_file(workdir, SIZES[name]), bench_precopy(workdir, SIZES[name])))
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

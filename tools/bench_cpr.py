#!/usr/bin/env python3
"""The guest-visible pause of cpr-exec, cpr-transfer and a normal file
migration of the same A-B walker at 256 MiB, 1 GiB and 4 GiB, in one run.

The pause is measured from outside: a thread polls the walker's status block
in the RAM memfd every millisecond, and the pause is the time from its last
progress before the update to its first progress after. Medians of --runs
runs per cell; ratios are against the same mode at the smallest size (the
targets: cpr-exec <= 100 ms and cpr-transfer <= 20 ms at 1 GiB, neither
growing more than 20% from 256 MiB to 4 GiB) and against file migration.

For the fastest cpr-exec the new image should import from bytecode: install
minivmm normally (pip compiles it), or run ``python -m compileall`` on an
editable checkout when PYTHONDONTWRITEBYTECODE is set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_migration  # noqa: E402  (this folder: the same normal migration, timed the same way)
from bench_migration import walker_args  # noqa: E402

from minivmm.vmprocess import VmProcess, Watch  # noqa: E402

SIZES = {"256M": 256, "1G": 1024, "4G": 4096}


def bench_exec(workdir: str, ram: int) -> float:
    vm = VmProcess(workdir, "exec", walker_args(ram))
    try:
        vm.wait_passes(2)
        state = os.path.join(workdir, "vm.state")
        vm.qmp.cmd(
            "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [*vm.argv, "-incoming", f"file:{state}"]}
        )
        watch = Watch(vm.fd)
        time.sleep(0.2)
        vm.qmp.cmd("migrate", uri=f"file:{state}")
        pause = watch.pause_ms()
        vm.reconnect()
        info = vm.qmp.cmd("query-migrate")
        phases = " ".join(f"{k} {v:.1f}" for k, v in info["x-phase-times"].items())
        print(
            f"  cpr-exec {ram} MiB: guest-visible {pause:.1f} ms, VMM-reported {info['downtime']} ms ({phases})",
            file=sys.stderr,
        )
        return pause
    finally:
        vm.close()


def bench_transfer(workdir: str, ram: int) -> float:
    main, cpr = os.path.join(workdir, "main.sock"), os.path.join(workdir, "cpr.sock")
    src = VmProcess(workdir, "src", walker_args(ram))
    dst = None
    try:
        src.wait_passes(2)
        cpr_channel = f'{{"channel-type":"cpr","addr":{{"transport":"socket","type":"unix","path":"{cpr}"}}}}'
        dst_args = [*walker_args(ram), "-incoming", f"unix:{main}", "-incoming", cpr_channel]
        dst = _start_target(workdir, dst_args, cpr)
        src.qmp.cmd("migrate-set-parameters", mode="cpr-transfer")
        watch = Watch(src.fd)  # the target maps this very memfd
        time.sleep(0.2)
        src.qmp.cmd(
            "migrate",
            channels=[
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}},
            ],
        )
        return watch.pause_ms()
    finally:
        src.close()
        if dst is not None:
            _kill(dst)


def bench_file(workdir: str, ram: int) -> float:
    return bench_migration.bench_file(workdir, ram)["pause"]


def _start_target(workdir: str, args: list[str], cpr: str):
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "minivmm", *args],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not os.path.exists(cpr):
        time.sleep(0.005)
    return proc


def _kill(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


MODES = {"cpr-exec": bench_exec, "cpr-transfer": bench_transfer, "file": bench_file}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="cpr-exec,cpr-transfer,file")
    args = ap.parse_args()
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    import compileall

    import minivmm

    # The new image of a cpr-exec imports minivmm: from bytecode, as after a normal pip install.
    compileall.compile_dir(os.path.dirname(minivmm.__file__), quiet=1)
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cpr-") as workdir:
        for size in sizes:
            for mode in modes:
                runs = [MODES[mode](workdir, SIZES[size]) for _ in range(args.runs if mode != "file" else 1)]
                results[(mode, size)] = statistics.median(runs)
                print(f"{mode} {size}: {', '.join(f'{r:.1f}' for r in runs)} ms", file=sys.stderr)
    print(f"guest-visible pause of the A-B walker, median ms ({args.runs} runs; file migration 1 run)")
    print(f"{'mode':>13} | " + " | ".join(f"{s:>17}" for s in sizes))
    for mode in modes:
        base = results[(mode, sizes[0])]
        cells = []
        for size in sizes:
            v = results[(mode, size)]
            cells.append(f"{v:8.1f} ({v / base:4.2f}x)")
        print(f"{mode:>13} | " + " | ".join(f"{c:>17}" for c in cells))
    if "file" in modes:
        for mode in (m for m in modes if m != "file"):
            ratios = ", ".join(f"{s} {results[('file', s)] / results[(mode, s)]:.0f}x" for s in sizes)
            print(f"file migration pause / {mode} pause: {ratios}")


if __name__ == "__main__":
    main()

"""``minivmm demo``: minivmm upgrades itself under a running guest.

It boots the shipped A-B memory walker with its RAM in a shared memfd,
performs cpr-exec live updates while the guest runs (the VMM execs a new
copy of itself: same PID, same memfd, no RAM copied), checks from outside
that the guest went on and its memory is intact, and prints each update's
phase timeline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from . import guests
from .guests.abwalk import check_invariant
from .options import OptionError, parse_size
from .vmprocess import VmProcess


def _update(vm: VmProcess, state: str) -> tuple[dict, int, int]:
    """One cpr-exec; (the new image's query-migrate, passes before, passes after)."""
    vm.qmp.cmd(
        "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [*vm.argv, "-incoming", f"file:{state}"]}
    )
    before = vm.status().passes
    vm.qmp.cmd("migrate", uri=f"file:{state}")
    vm.reconnect()
    info = vm.qmp.cmd("query-migrate")
    after = vm.wait_passes(before + 2, timeout=60).passes
    return info, before, after


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="minivmm demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", default="512M", help="guest RAM (default 512M)")
    ap.add_argument("--updates", type=int, default=3, help="how many updates in a row (default 3)")
    args = ap.parse_args(argv)
    try:
        ram = parse_size(args.ram, default_unit="M")
    except OptionError as e:
        ap.error(f"--ram {args.ram}: {e}")
    with tempfile.TemporaryDirectory(prefix="minivmm-demo-") as workdir:
        vm_args = [
            "-kernel",
            guests.path("abwalk.elf"),
            "-m",
            f"{ram >> 20}",
            "-mem-prealloc",
            "-machine",
            "aux-ram-share=on",
            "-serial",
            "null",
        ]
        print(f"minivmm demo: live update (cpr-exec) under a running guest with {ram >> 20} MiB of RAM")
        try:
            vm = VmProcess(workdir, "demo", vm_args)
        except RuntimeError as e:
            print(f"minivmm demo: {e}", file=sys.stderr)
            return 1
        try:
            return _run(vm, workdir, ram, args.updates)
        finally:
            vm.close()


def _run(vm: VmProcess, workdir: str, ram: int, updates: int) -> int:
    pid, inode = vm.proc.pid, os.stat(vm.ram_path()).st_ino
    print(f"  guest: the A-B memory walker (guests/abwalk.S) at CPL3; minivmm pid {pid}, RAM memfd inode {inode}")
    print(f"  waiting for the walker to touch all of RAM... pass {vm.wait_passes(2).passes}")
    print()
    print("  update  downtime |  stop   save    exec    load  resume (ms) | walker passes | state file")
    state = os.path.join(workdir, "vm.state")
    failures = []
    for n in range(1, updates + 1):
        info, before, after = _update(vm, state)
        p = info.get("x-phase-times", {})
        print(
            f"  {n:6d} {info.get('downtime', 0):6d} ms | {p.get('stop', 0):5.1f} {p.get('save', 0):6.1f} "
            f"{p.get('exec', 0):7.1f} {p.get('load', 0):7.1f} {p.get('resume', 0):7.2f}      | "
            f"{before:5d} -> {after:<5d} | {os.path.getsize(state) >> 10} KiB"
        )
        if vm.proc.pid != pid:
            failures.append("the PID changed")
        if os.stat(vm.ram_path()).st_ino != inode:
            failures.append("the RAM memfd changed (RAM was copied)")
        if info.get("ram", {}).get("total", 0):
            failures.append("RAM went into the stream")
    vm.qmp.cmd("stop")
    try:
        pages = check_invariant(vm.fd, ram)
    except AssertionError as e:
        failures.append(f"the walker's memory is inconsistent: {e}")
        pages = 0
    vm.qmp.cmd("quit")
    print()
    if failures:
        print("  FAILED: " + "; ".join(failures))
        return 1
    print(f"  ok: same pid {pid} and same memfd inode {inode} after {updates} updates (no RAM copied),")
    print(f"      the walker kept walking, and all {pages} walked pages are consistent")
    return 0

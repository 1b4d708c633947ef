"""``minivmm demo``: minivmm upgrades itself under a running guest.

It boots the shipped A-B memory walker with its RAM in a shared memfd,
performs cpr-exec live updates while the guest runs (the VMM execs a new
copy of itself: same PID, same memfd, no RAM copied), checks from outside
that the guest went on and its memory is intact, and prints each update's
phase timeline.

With ``--device`` the guest drives minivmm's sample vfio-user device (a separate
server process) through DMA rounds, each ending in an MSI, while minivmm
updates itself: the server's connection and the MSI eventfd must survive the
exec, so the server sees one client throughout and no interrupt is lost.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from . import guests
from .guests.abwalk import check_invariant
from .options import OptionError, parse_size
from .vmprocess import VmProcess, kill_group

ROUNDS_BASE, ROUNDS_PER_UPDATE = 5000, 2500  # DMA rounds: ~2 per ms on a nested host; an update ~1 s
REPORT_EVERY = 100  # the vfiouser guest prints its round every 100 (VU_REPORT_EVERY in guests/timer.S)
MIN_ROUNDS = 4 * REPORT_EVERY
PR_SET_PDEATHSIG = 1
GUEST_EXIT_OK = (0x10 << 1) | 1  # timer.elf writes 0x10 to isa-debug-exit when it is done
_ROUND = re.compile(r"^timer: vfiouser round=(\d+)$", re.M)
_END = re.compile(r"^timer: vfiouser rounds=(\d+) irqs=(\d+) counter=(\d+)$", re.M)


def _cpr_exec(vm: VmProcess, state: str) -> dict:
    """One cpr-exec of the same command line; the new image's query-migrate."""
    vm.qmp.cmd(
        "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": [*vm.argv, "-incoming", f"file:{state}"]}
    )
    vm.qmp.cmd("migrate", uri=f"file:{state}")
    vm.reconnect()
    return vm.qmp.cmd("query-migrate")


def _update(vm: VmProcess, state: str) -> tuple[dict, int, int]:
    """One cpr-exec; (the new image's query-migrate, passes before, passes after)."""
    before = vm.status().passes
    info = _cpr_exec(vm, state)
    after = vm.wait_passes(before + 2, timeout=60).passes
    return info, before, after


# The phases of a cpr-exec, as the new image's query-migrate gives them: with the keeper the guest
# runs during exec and start-up (cpr/keeper.py); without it there is no keep or start-up, and "load".
PHASES = "  update  downtime |  stop   save   keep    exec  start-up  take-over/load  resume (ms) | "


def _phases(n: int, info: dict) -> str:
    """An update's row: its downtime and the phases of the new image's query-migrate."""
    p = info.get("x-phase-times", {})
    cells = [f"{p[k]:{w}.1f}" if k in p else " " * (w - 1) + "-" for k, w in (("stop", 5), ("save", 6), ("keep", 6))]
    cells += [f"{p.get('exec', 0):7.1f}", f"{p['start-up']:9.1f}" if "start-up" in p else " " * 8 + "-"]
    cells += [f"{p.get('take-over', p.get('load', 0)):15.1f}", f"{p.get('resume', 0):7.2f}"]
    return f"  {n:6d} {info.get('downtime', 0):6d} ms | {' '.join(cells)}      | "


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="minivmm demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", default="512M", help="guest RAM (default 512M)")
    ap.add_argument("--updates", type=int, default=3, help="how many updates in a row (default 3)")
    ap.add_argument(
        "--device", action="store_true", help="a guest doing DMA with a vfio-user device (minivmm-vfio-user) instead"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        help=f"with --device: the guest's DMA rounds, enough to outlast the updates "
        f"(default {ROUNDS_BASE} + {ROUNDS_PER_UPDATE} per update)",
    )
    args = ap.parse_args(argv)
    try:
        ram = parse_size(args.ram, default_unit="M")
    except OptionError as e:
        ap.error(f"--ram {args.ram}: {e}")
    if args.device:
        if args.updates < 1:
            ap.error(f"--updates {args.updates}: at least 1 with --device")
        rounds = ROUNDS_BASE + ROUNDS_PER_UPDATE * args.updates if args.rounds is None else args.rounds
        if rounds < MIN_ROUNDS:
            ap.error(f"--rounds {rounds}: at least {MIN_ROUNDS}")
        return _device_demo(ram, args.updates, rounds)
    if args.rounds is not None:
        ap.error("--rounds: only with --device")
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
    print(PHASES + "walker passes | state file")
    state = os.path.join(workdir, "vm.state")
    failures = []
    for n in range(1, updates + 1):
        info, before, after = _update(vm, state)
        print(f"{_phases(n, info)}{before:5d} -> {after:<5d} | {os.path.getsize(state) >> 10} KiB")
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


# --- --device: the same updates while the guest does DMA with a vfio-user device ------------------------


class _Serial:
    """The guest's serial output, in a file the VMM appends to (its fd survives cpr-exec)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def text(self) -> str:
        try:
            with open(self.path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def end(self) -> tuple[int, int, int] | None:
        """The guest's last line: (rounds, irqs, counter), once it is done."""
        m = _END.search(self.text())
        return (int(m[1]), int(m[2]), int(m[3])) if m else None

    def round(self) -> int:
        """The last round the guest reported (every REPORT_EVERY, and at its end)."""
        end = self.end()
        rounds = [int(r) for r in _ROUND.findall(self.text())]
        return max([0, *rounds, *(end[:1] if end else [])])

    def wait_round(self, n: int, vm: VmProcess, timeout: float = 60) -> int:
        """Until the guest reported round ``n``, finished, or exited; the last round seen."""
        deadline = time.monotonic() + timeout
        while (r := self.round()) < n and self.end() is None and vm.proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return r

    def last_line(self) -> str:
        lines = self.text().strip().splitlines()
        return lines[-1] if lines else "(nothing)"


def _start_server(workdir: str) -> tuple[subprocess.Popen, str, str]:
    """minivmm's sample vfio-user server in its own process group: (process, socket, log)."""
    sock, log = os.path.join(workdir, "dev.sock"), os.path.join(workdir, "server.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minivmm.vfio_user.sample", sock],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=f,
            preexec_fn=_die_with_parent(),
        )
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            with open(log) as f:
                raise RuntimeError(f"the vfio-user server did not start: {f.read().strip()}")
        time.sleep(0.01)
    return proc, sock, log


def _die_with_parent() -> Callable[[], None]:
    """For the server's child before its exec: the kernel kills it when the demo dies, even by
    SIGKILL, when no finally runs (it is in a process group of its own, out of a killpg's reach)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _device_demo(ram: int, updates: int, rounds: int) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that the finally blocks run
    with tempfile.TemporaryDirectory(prefix="minivmm-demo-") as workdir:
        print(
            f"minivmm demo --device: live update (cpr-exec) under a guest doing DMA with a vfio-user device, "
            f"{ram >> 20} MiB of RAM"
        )
        try:
            server, sock, log = _start_server(workdir)
        except RuntimeError as e:
            print(f"minivmm demo: {e}", file=sys.stderr)
            return 1
        try:
            serial = _Serial(os.path.join(workdir, "serial.log"))
            vm_args = [
                "-kernel",
                guests.path("timer.elf"),
                "-append",
                f"vfiouser {rounds}",
                "-m",
                f"{ram >> 20}",
                "-mem-prealloc",
                "-machine",
                "aux-ram-share=on",
                "-device",
                f"vfio-user-pci,socket={sock}",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-serial",
                f"file:{serial.path}",
            ]
            try:
                vm = VmProcess(workdir, "demo", vm_args)
            except RuntimeError as e:
                print(f"minivmm demo: {e}", file=sys.stderr)
                return 1
            try:
                return _device_run(vm, workdir, serial, server, log, updates, rounds)
            except RuntimeError as e:
                print(f"minivmm demo: {e}", file=sys.stderr)
                return 1
            finally:
                vm.close()
        finally:
            kill_group(server)


def _device_run(
    vm: VmProcess, workdir: str, serial: _Serial, server: subprocess.Popen, log: str, updates: int, rounds: int
) -> int:
    pid = vm.proc.pid
    print(
        f"  guest: timer.elf 'vfiouser {rounds}' (guests/timer.S) at CPL0: DMA rounds with the sample device "
        f"1234:4d56, each ending in an MSI"
    )
    print(f"  minivmm pid {pid}, minivmm-vfio-user pid {server.pid} (its own process)")
    first = serial.wait_round(2 * REPORT_EVERY, vm)
    if first < 2 * REPORT_EVERY:
        raise RuntimeError(f"the guest's DMA did not start; its serial says: {serial.last_line()}")
    print(f"  waiting for the guest's DMA rounds... round {first}")
    print()
    print(PHASES + "guest DMA rounds")
    state = os.path.join(workdir, "vm.state")
    failures = []
    for n in range(1, updates + 1):
        if serial.end() is not None or vm.proc.poll() is not None:
            failures.append(f"the guest finished before update {n}: give it more --rounds than {rounds}")
            break
        before = serial.round()
        info = _cpr_exec(vm, state)
        after = serial.wait_round(before + 2 * REPORT_EVERY, vm)
        print(f"{_phases(n, info)}{before:6d} -> {after}")
        if vm.proc.poll() is not None and serial.end() is None:
            failures.append(f"minivmm (pid {pid}) exited at update {n}")
            break
        if after <= before:
            failures.append(f"the guest's DMA stopped at update {n} (round {before} -> {after})")
    # Let the guest finish: it prints its rounds, the MSIs it took and the device's COUNTER.
    last, stalled = serial.round(), time.monotonic()
    while vm.proc.poll() is None and time.monotonic() - stalled < 60:
        if (now := serial.round()) != last:
            last, stalled = now, time.monotonic()
        time.sleep(0.05)
    status = vm.proc.poll()
    end = serial.end()
    with open(log) as f:
        server_log = f.read()
    clients = re.findall(r"client (\d+) connected", server_log)
    print()
    print(f"  guest:  {serial.last_line()}")
    for line in server_log.strip().splitlines():
        print(f"  server: {line}")
    print()
    if not failures:
        if status is None:
            failures.append(f"the guest stopped making progress at round {last}")
        elif end is None:
            failures.append(f"the guest did not finish (exit status {status}); its serial says: {serial.last_line()}")
        elif status != GUEST_EXIT_OK:
            failures.append(f"minivmm exited with status {status}, not {GUEST_EXIT_OK}")
    if end is not None and not end[0] == end[1] == end[2] == rounds:
        failures.append(f"rounds={end[0]} irqs={end[1]} counter={end[2]}, not all {rounds}")
    if clients != ["1"]:
        failures.append(f"the server saw clients {clients}, not just client 1 (the connection was not kept)")
    if failures:
        print("  FAILED: " + "; ".join(failures))
        return 1
    print(f"  ok: same pid {pid} after {updates} updates, and the server saw one client (the connection was kept);")
    print(f"      the guest's DMA went on across every update, and rounds = irqs = counter = {rounds}")
    print("      (no MSI lost, the device never reset)")
    return 0

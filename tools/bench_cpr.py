#!/usr/bin/env python3
"""minivmm against QEMU 11, side by side: the guest-visible pause of cpr-exec,
cpr-transfer and a file migration of the same A-B walker, in one run.

Both VMMs boot the very same guest (abwalk-mb.elf, multiboot) with the same
RAM (a shared memfd backend: ``-object memory-backend-memfd,
id=ram0,size=S,share=on -machine memory-backend=ram0,
aux-ram-share=on -m S``). The pause is measured from outside: a thread polls
the walker's status block in the RAM memfd every millisecond, and the pause
is the time from its last progress before the update to its first progress
after (for a file migration: from the source's last progress to the target's
first, the target's start-up included). Runs alternate between the two VMMs,
so load on the machine falls on both; medians of --runs runs per cell, and
the ratio minivmm / QEMU. ``--device`` measures each VMM twice more, with
minivmm's sample vfio-user device attached (one ``minivmm-vfio-user`` server
for the whole run; the walker does not touch it), and gives the ratio with /
without: what keeping the device costs a live update (a file migration is
refused with it, as by QEMU: not measured then).

QEMU is a QEMU 11 qemu-system-x86_64 with KVM (--qemu, default
/tmp/qemu-peer/qemu-system-x86_64); without it only minivmm is measured.
minivmm runs as a user installs it (``--minivmm installed``, the default):
this tool makes a scratch venv with ``pip install`` of this checkout and runs
its ``minivmm`` command, whose new image imports from the bytecode pip
compiled. ``--minivmm source`` runs ``python -m minivmm`` with this
interpreter instead (a development install: an editable one adds its import
finder, about 10 ms, to every start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivmm import guests  # noqa: E402
from minivmm.vmprocess import MINIVMM, VmProcess, Watch, kill_group  # noqa: E402

SIZES = {"256M": 256, "1G": 1024, "4G": 4096}
MiB = 1 << 20
UNLIMITED = 1 << 40  # bytes/s: max-bandwidth for both VMMs (QEMU's default throttles at 128 MiB/s)
STATE_DIR = ""  # --state-dir: where file migration writes (tmpfs measures the VMMs, not the disk)
DEVICE_SOCKET = ""  # --device: the sample vfio-user server's socket


@dataclass(frozen=True)
class Vmm:
    name: str
    program: list[str]
    device: bool = False  # the sample vfio-user device attached

    @property
    def label(self) -> str:
        return self.name + ("+device" if self.device else "")

    def args(self, ram: int) -> list[str]:
        return [
            *(["-accel", "kvm", "-nodefaults", "-display", "none"] if self.name == "QEMU" else []),
            "-kernel",
            guests.path("abwalk-mb.elf"),
            "-object",
            f"memory-backend-memfd,id=ram0,size={ram}M,share=on",
            "-machine",
            "memory-backend=ram0,aux-ram-share=on",
            "-m",
            f"{ram}M",
            "-serial",
            "null",
            *(["-device", self.device_json()] if self.device else []),
        ]

    @staticmethod
    def device_json() -> str:
        return json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": DEVICE_SOCKET}})

    def start(self, workdir: str, name: str, ram: int, *extra: str) -> VmProcess:
        return VmProcess(workdir, name, [*self.args(ram), *extra], program=self.program, ram_bytes=ram * MiB)


def bench_exec(vmm: Vmm, workdir: str, ram: int) -> float:
    vm = vmm.start(workdir, "exec", ram)
    try:
        vm.wait_passes(2)
        state = os.path.join(workdir, "vm.state")
        new = [*vm.argv, "-incoming", f"file:{state}"]
        vm.qmp.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": new})
        watch = Watch(vm.fd)
        time.sleep(0.2)
        vm.qmp.cmd("migrate", uri=f"file:{state}")
        pause = watch.pause_ms()
        vm.reconnect()
        if vm.qmp.cmd("query-status")["status"] != "running":
            raise RuntimeError(f"{vmm.name}: not running after cpr-exec")
        return pause
    finally:
        vm.close()


def bench_transfer(vmm: Vmm, workdir: str, ram: int) -> float:
    main, cpr = os.path.join(workdir, "main.sock"), os.path.join(workdir, "cpr.sock")
    for path in (main, cpr):
        if os.path.exists(path):
            os.unlink(path)
    src = vmm.start(workdir, "src", ram)
    dst = None
    try:
        src.wait_passes(2)
        cpr_channel = f'{{"channel-type":"cpr","addr":{{"transport":"socket","type":"unix","path":"{cpr}"}}}}'
        dst = subprocess.Popen(
            [*vmm.program, *vmm.args(ram), "-incoming", f"unix:{main}", "-incoming", cpr_channel],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not os.path.exists(cpr):
            time.sleep(0.005)
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
            kill_group(dst)


def bench_file(vmm: Vmm, workdir: str, ram: int) -> float:
    """Stop and copy: ``stop``, ``migrate`` to a file, a new process loads it (-incoming), ``cont``.
    RAM is copied both ways. Stopping first keeps it one pass: QEMU migrates a running guest
    to a file by precopy, and this walker dirties all of its RAM faster than any file takes it."""
    path = os.path.join(STATE_DIR or workdir, "vm.state")
    src = vmm.start(workdir, "src", ram)
    try:
        src.wait_passes(1)
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
        watch = Watch(src.fd)
        time.sleep(0.2)
        src.qmp.cmd("stop")
        src.qmp.cmd("migrate", uri=f"file:{path}")
        src.wait_migration()
        watch.stopped = True
        watch.join()
        last = watch.changes[-1]
        src.close()
        dst = vmm.start(workdir, "dst", ram, "-incoming", f"file:{path}")
        try:
            while dst.qmp.cmd("query-status")["status"] != "paused":  # loaded (the source was stopped)
                time.sleep(0.001)
            start = dst.status()
            dst.qmp.cmd("cont")
            while dst.status() == start:
                time.sleep(0.0002)
            return (time.monotonic() - last) * 1000
        finally:
            dst.close()
    finally:
        src.close()
        if os.path.exists(path):
            os.unlink(path)


MODES = {"cpr-exec": bench_exec, "cpr-transfer": bench_transfer, "file": bench_file}


def install(workdir: str) -> list[str]:
    """``pip install`` of this checkout into a scratch venv, as the README's first command: its ``minivmm``."""
    venv = os.path.join(workdir, "venv")
    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # pip compiles the bytecode
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", str(repo)], check=True, env=env)
    return [os.path.join(venv, "bin", "minivmm")]


def compiled_source() -> list[str]:
    """``python -m minivmm`` with this interpreter, its modules compiled first (as pip would)."""
    import compileall

    import minivmm

    compileall.compile_dir(os.path.dirname(minivmm.__file__), quiet=1)
    return MINIVMM


@contextmanager
def device_server(workdir: str, wanted: bool) -> Iterator[None]:
    """The sample vfio-user server, for --device (its process group killed at the end)."""
    global DEVICE_SOCKET
    if not wanted:
        yield
        return
    sock = os.path.join(workdir, "dev.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "minivmm.vfio_user.sample", sock], start_new_session=True, stderr=subprocess.DEVNULL
    )
    try:
        while not os.path.exists(sock):
            if server.poll() is not None:
                raise RuntimeError("the sample vfio-user server did not start")
            time.sleep(0.01)
        DEVICE_SOCKET = sock
        yield
    finally:
        DEVICE_SOCKET = ""
        kill_group(server)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", default="cpr-exec,cpr-transfer,file")
    ap.add_argument("--qemu", default="/tmp/qemu-peer/qemu-system-x86_64", help="the peer; '' to skip it")
    ap.add_argument("--state-dir", default="/dev/shm", help="file migration's directory ('' for a scratch one)")
    ap.add_argument("--minivmm", choices=("installed", "source"), default="installed", help="see above")
    ap.add_argument("--device", action="store_true", help="with the sample vfio-user device attached")
    args = ap.parse_args()
    global STATE_DIR
    STATE_DIR = args.state_dir
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    if args.device:
        modes = [m for m in modes if m != "file"]
    runs: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cpr-") as workdir, device_server(workdir, args.device):
        vmms = [Vmm("minivmm", install(workdir) if args.minivmm == "installed" else compiled_source())]
        if args.qemu and os.access(args.qemu, os.X_OK):
            vmms.append(Vmm("QEMU", [args.qemu]))
        elif args.qemu:
            print(f"no QEMU at {args.qemu} (give one with --qemu): minivmm only", file=sys.stderr)
        if args.device:
            vmms = [v for vmm in vmms for v in (vmm, Vmm(vmm.name, vmm.program, device=True))]
        for size in sizes:
            for mode in modes:
                for _ in range(args.runs):
                    for vmm in vmms:  # alternating: load on the machine falls on all
                        ms = MODES[mode](vmm, workdir, SIZES[size])
                        runs.setdefault((vmm.label, mode, size), []).append(ms)
                for vmm in vmms:
                    got = ", ".join(f"{r:.1f}" for r in runs[(vmm.label, mode, size)])
                    print(f"{mode} {size} {vmm.label}: {got} ms", file=sys.stderr)
    report(vmms, modes, sizes, args.runs, {key: statistics.median(v) for key, v in runs.items()})


def report(vmms: list[Vmm], modes: list[str], sizes: list[str], count: int, median: dict) -> None:
    """The medians, minivmm / QEMU without the device and with it, and with / without for each VMM."""
    names = list(dict.fromkeys(v.name for v in vmms))
    ratios = [(f"{names[0]}/{names[1]}", names[0], names[1])] if len(names) > 1 else []
    if any(v.device for v in vmms):
        ratios = [(f"{a}/{b}+dev", a + "+device", b + "+device") for _, a, b in ratios] + ratios
        ratios += [(f"{n} dev/none", n + "+device", n) for n in names]
    print(f"guest-visible pause of the A-B walker, median of {count} runs, ms")
    columns = [f"{v.label:>14}" for v in vmms] + [f"{r[0]:>16}" for r in ratios]
    print(f"{'mode':>13} {'RAM':>5} | " + " | ".join(columns))
    for mode in modes:
        for size in sizes:
            line = f"{mode:>13} {size:>5} | " + " | ".join(f"{median[(v.label, mode, size)]:14.1f}" for v in vmms)
            for _, a, b in ratios:
                line += f" | {median[(a, mode, size)] / median[(b, mode, size)]:15.2f}x"
            print(line)
    for vmm in vmms:
        if "cpr-exec" in modes and len(sizes) > 1:
            growth = median[(vmm.label, "cpr-exec", sizes[-1])] / median[(vmm.label, "cpr-exec", sizes[0])]
            print(f"{vmm.label} cpr-exec pause at {sizes[-1]} / at {sizes[0]}: {growth:.2f}x")


if __name__ == "__main__":
    main()

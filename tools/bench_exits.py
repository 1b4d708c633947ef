#!/usr/bin/env python3
"""Port-I/O exit cost of minivmm's run loops against a C loop, in one run.

All loops drive the same vCPU of the same VM running the same guest code
(the shipped long64 guest with ``-append bench``: ``out %al, $0x80`` forever).
The C loop is the least a VMM can do per exit: KVM_RUN, check the exit,
nothing else; it is compiled on the fly by cffi (API mode, against
<linux/kvm.h>) and called on vCPU 0 while its thread is paused. minivmm's
loops are the real ones (VcpuThread, bus, post-code device): the C loop of
minivmm/kvm/runloop.c, which does the post-code write in C, and the Python
reference loop, which does it through the bus. Rounds alternate the three
and medians are reported, with each loop's ratio to the C loop (target: the
C run loop within 1.2x).

Also measured, each against a baseline taken in the same invocation:
process start to the first serial byte of the default guest (baseline: a
bare ``python -c pass``), and the VMM's own memory (RSS minus guest RAM;
baseline: a bare Python interpreter's RSS).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cffi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivmm import guests  # noqa: E402
from minivmm.config import ChardevConfig, MachineConfig  # noqa: E402
from minivmm.machine import Machine  # noqa: E402

C_LOOP = r"""
#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <time.h>
/* KVM_RUN n times; every exit must be port I/O. Returns elapsed ns or -errno. */
long run_loop(int fd, struct kvm_run *run, long n)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_IO)
            return -1000 - (long)run->exit_reason;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
}
"""


def build_c_loop(workdir: str):
    """The C loop as a cffi module (its ``ffi`` and ``lib``), compiled in ``workdir``."""
    ffi = cffi.FFI()
    ffi.cdef("struct kvm_run; long run_loop(int fd, struct kvm_run *run, long n);")
    ffi.set_source("_bench_exits_loop", C_LOOP, extra_compile_args=["-O2"])
    spec = importlib.util.spec_from_file_location("_bench_exits_loop", ffi.compile(tmpdir=workdir))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOPS = ("C", "minivmm C", "minivmm Python")


def bench_exits(rounds: int, exits: int) -> dict[str, float]:
    """Median microseconds per exit of each loop in LOOPS."""
    with tempfile.TemporaryDirectory() as tmp:
        bench = build_c_loop(tmp)
        config = MachineConfig(
            kernel=guests.path("long64.elf"),
            append="bench",
            serials=[ChardevConfig("serial0", "null")],
            run_loop="c",
        )
        machine = Machine(config)
        held = None
        try:
            thread = machine.vcpus[0]
            vcpu, runloop = thread.vcpu, thread.runloop
            postcode = next(d for d in machine.devices.devices() if d.name == "post-code")
            held = bench.ffi.from_buffer(vcpu.run_mmap)
            run = bench.ffi.cast("struct kvm_run *", held)
            bench.lib.run_loop(vcpu.fd, run, 1000)  # warm up: boot into the loop
            machine.start()
            machine.control.vm_stop()
            times: dict[str, list[float]] = {name: [] for name in LOOPS}
            for _ in range(rounds):
                vcpu.run.immediate_exit = 0  # the paused thread may have left it set
                ns = bench.lib.run_loop(vcpu.fd, run, exits)
                if ns < 0:
                    raise SystemExit(f"C loop failed: {ns}")
                times["C"].append(ns / exits / 1000)
                for name, loop in (("minivmm C", runloop), ("minivmm Python", None)):
                    thread.runloop = loop  # the thread is paused: it takes the loop at its next run
                    before, count, t0 = thread.exits, postcode.count, time.perf_counter()
                    machine.control.vm_start()
                    time.sleep(exits * times["C"][-1] * 1.3e-6)
                    machine.control.vm_stop()
                    elapsed, done = time.perf_counter() - t0, thread.exits - before
                    if postcode.count - count != done:
                        raise SystemExit(f"{name}: {done} exits but {postcode.count - count} post codes")
                    times[name].append(elapsed / done * 1e6)
            thread.runloop = runloop
            return {name: statistics.median(values) for name, values in times.items()}
        finally:
            if held is not None:
                bench.ffi.release(held)  # kvm_run's mmap cannot close while C holds it
            machine.close()


def _first_byte_latency(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.stdout.read(1)
        return time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def bench_start(rounds: int) -> tuple[float, float]:
    """Median seconds: (python -c print, minivmm to first serial byte)."""
    base = [sys.executable, "-c", "print('x')"]
    vmm = [sys.executable, "-m", "minivmm", "-display", "none"]
    b = [_first_byte_latency(base) for _ in range(rounds)]
    v = [_first_byte_latency(vmm) for _ in range(rounds)]
    return statistics.median(b), statistics.median(v)


def _rss_kib(pid: int, exclude: str | None) -> int:
    total, skip = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                skip = exclude is not None and exclude in line
            elif first == "Rss:" and not skip:
                total += int(line.split()[1])
    return total


def bench_memory(ram: str) -> tuple[int, int]:
    """KiB: (bare interpreter RSS, minivmm RSS minus guest RAM) with the A-B walker running."""
    base = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    vmm = subprocess.Popen(
        [sys.executable, "-m", "minivmm", "-m", ram, "-kernel", guests.path("abwalk.elf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        vmm.stdout.read(2)  # "A" then the first "B": the walker has touched all of RAM
        time.sleep(0.5)
        return _rss_kib(base.pid, None), _rss_kib(vmm.pid, "memfd:pc.ram")
    finally:
        for p in (base, vmm):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        vmm.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exits", type=int, default=100_000)
    ap.add_argument("--ram", default="256M")
    args = ap.parse_args()

    us = bench_exits(args.rounds, args.exits)
    print(f"port-I/O exit round trip, median of {args.rounds} x {args.exits} exits:")
    for name in LOOPS:
        ratio = "" if name == "C" else f"  {us[name] / us['C']:5.2f}x the C loop"
        print(f"  {name + ' loop':19} {us[name]:7.2f} us/exit  {1e6 / us[name]:9.0f} exits/s{ratio}")
    print("  (target: minivmm's C loop within 1.2x of the C loop)")
    base_s, vmm_s = bench_start(args.rounds)
    print(f"start to first serial byte, median of {args.rounds}:")
    print(f"  python -c print  {base_s * 1000:7.1f} ms")
    print(f"  minivmm          {vmm_s * 1000:7.1f} ms  ({vmm_s / base_s:.1f}x the bare interpreter)")
    base_kib, vmm_kib = bench_memory(args.ram)
    print(f"VMM memory with a {args.ram} guest (RSS minus guest RAM):")
    print(f"  python interpreter {base_kib / 1024:6.1f} MiB")
    print(f"  minivmm            {vmm_kib / 1024:6.1f} MiB  ({vmm_kib / base_kib:.1f}x the bare interpreter)")


if __name__ == "__main__":
    main()

"""cpr-exec without stopping the guest for the new image's start-up: the keeper.

A cpr-exec's pause used to run from the stop in the old image to the resume
in the new one, across the exec and everything the new Python image imports
and builds (about 100 ms here, most of it imports). With the keeper
(kvm/keeper.c) the old image, once it has stopped the vCPUs and written the
state file, starts one task per vCPU that shares its address space and runs
the vCPU on: the guest is back after a millisecond or two, and runs while
the old image execs and the new one starts. The new image then stops the
tasks (a second, short pause), finishes any exit they left for a VMM with
its own devices, has them read the vCPU and VM state out of the old VM, and
loads that in place of the state file's, which is older. So:

- **old image** (``Keeper``): after the state file, before the exec. The
  control block (a memfd, in the CPR table as "cpr-keeper") names the old
  vCPU and VM fds, the vCPUs' kvm_run and the coalesced-write ring.
- **new image** (``take_over``): after its machine is built, the state file
  read and the devices' state loaded from it, before the vCPU and VM state
  are. It plays the keeper's logged writes and the accesses it left waiting
  on those devices, then records the ioctls that read the state by
  running its own reading code (arch/x86/vcpu_state.py, vm_state.py) against
  stand-in fds, has the keeper make them on the old fds, then runs the same
  code again, answered from what the keeper wrote. First in the list, the old
  VM lets go of the irqfds, so the new one can bind them.

The userspace devices do not change while the keeper runs: a write to one
is logged and made by the new image, in order, before anything else; a port
read a device answered in advance (``stable_reads``: an idle UART's line
status, which a guest printing polls) is answered by the keeper; any other
exit that needs one stops its vCPU until the new image is there. Machines the keeper
cannot serve stop for the whole update as before (``unusable``).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass, field

from minivmm.arch.x86 import vcpu_state, vm_state
from minivmm.kvm import ioctls as io
from minivmm.kvm import runloop
from minivmm.kvm.system import CoalescedRing, KvmError

from .fdtable import KEEPER as ENTRY
from .holder import HOLD_TIMEOUT, exec_timeout
from .state import CprError

MAGIC = 0x4B505243  # "CRPK"
STEP_TIMEOUT = 5.0  # seconds a keeper task has to answer each step of the take-over
TEARDOWN_DELAY = 1.0  # seconds between the take-over and the tasks' end


def unusable(machine) -> str | None:
    """Why this machine's update stops the guest throughout, or None."""
    if runloop.lib is None:
        return runloop.UNAVAILABLE
    if machine.irqchip.split:
        return "kernel-irqchip=split: minivmm's PIC hands KVM each interrupt before an entry"
    if machine.devices.vfio_host is not None:
        return "an assigned device's DMA mappings are let go when the VM stops"
    if len(machine.vcpus) > runloop.lib.MINIVMM_KEEPER_VCPUS:
        return f"more than {runloop.lib.MINIVMM_KEEPER_VCPUS} vCPUs"
    if len(_irqfds(machine)) > runloop.lib.MINIVMM_KEEPER_VCPUS:
        return f"more than {runloop.lib.MINIVMM_KEEPER_VCPUS} irqfds (device interrupt vectors)"
    return None


# --- ioctls made in the old image ---------------------------------------------------------------


@dataclass
class _Op:
    fd: int  # -1: a copy of ``len(data)`` bytes from address ``request`` (in the old image)
    request: int
    data: bytes  # the argument as given (input), then as the keeper left it (output)
    ret: int = 0


@dataclass
class Recording:
    """A stand-in fd (kvm/system.py's ``ioctl`` calls it): notes the ioctl for the real ``fd``."""

    fd: int
    ops: list[_Op]

    def ioctl(self, request: int, arg: object) -> int:
        obj = getattr(arg, "_obj", None)
        self.ops.append(_Op(self.fd, request, bytes(obj) if obj is not None else b""))
        return 0


@dataclass
class Replay:
    """A stand-in fd: answers each ioctl with the keeper's result for it, in the recorded order."""

    ops: list[_Op]
    at: int = 0

    def ioctl(self, request: int, arg: object) -> int:
        op = self.ops[self.at]
        self.at += 1
        name = io.NAMES.get(request, hex(request))
        if op.request != request:
            raise KvmError(name, errno.EPROTO, "the keeper's answers are out of step")
        obj = getattr(arg, "_obj", None)
        if obj is not None:
            ctypes.memmove(ctypes.addressof(obj), op.data, min(len(op.data), ctypes.sizeof(obj)))
        if op.ret < 0:
            raise KvmError(name, -op.ret, "in the old image")
        return op.ret


def _with_fd(obj, fd):
    stand_in = copy.copy(obj)  # the same methods, on an fd that is a stand-in
    stand_in.fd = fd
    return stand_in


def _reads(machine, fd_of) -> tuple[list[vcpu_state.VcpuState], vm_state.VmState]:
    """Every state read a take-over makes, in order, on the fds ``fd_of`` gives for this machine's
    vCPU and VM fds; then the irqfds let go."""
    vm = _with_fd(machine.vm, fd_of(machine.vm.fd))
    for gsi, efd in _irqfds(machine):  # first, as a source lets go of them before it saves
        vm.irqfd(efd, gsi, assign=False)
    caps = machine.vcpus.caps
    vcpus = [vcpu_state.save(_with_fd(t.vcpu, fd_of(t.vcpu.fd)), caps) for t in machine.vcpus]
    irqchip = machine.irqchip
    return vcpus, vm_state.save(vm, irqchip.kvm_chips, irqchip.kvm_pit)


def _irqfds(machine) -> list[tuple[int, int]]:
    """(GSI, eventfd) of every irqfd: the same fds in both images (the CPR table keeps them)."""
    devices = machine.devices
    return [*devices.irqfds.items(), *((gsi, efd) for efd, (gsi, _) in devices.device_irqfds.items())]


# --- the control block --------------------------------------------------------------------------


class _Block:
    """The control block mapped in this image."""

    def __init__(self, fd: int, size: int | None = None) -> None:
        ffi = runloop.ffi
        if size is not None:
            os.ftruncate(fd, size)
        self.fd = fd
        self.mem = mmap.mmap(fd, os.fstat(fd).st_size)
        self.k = ffi.cast("struct minivmm_keeper *", ffi.from_buffer(self.mem))
        self.data_at = ffi.offsetof("struct minivmm_keeper", "data")

    def vcpus(self) -> list:
        return [self.k.vcpu[i] for i in range(self.k.nvcpus)]

    def wait(self, done, what: str) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                raise CprError(f"cpr-exec: the keeper did not {what} within {STEP_TIMEOUT:g} s")
            time.sleep(0.00005)

    def stop(self) -> None:
        """Every task out of KVM_RUN: stopped, or parked at an exit for the VMM."""
        lib = runloop.lib
        for v in self.vcpus():
            v.command = lib.KEEPER_STOP
            _kick(v.tid)
        self.wait(lambda: all(v.status >= lib.KEEPER_PARKED for v in self.vcpus()), "stop the vCPUs")

    def run(self, ops: list[_Op]) -> None:
        """Have the first task make ``ops`` in the old image; their results into them."""
        lib, ffi, k = runloop.lib, runloop.ffi, self.k
        if len(ops) > lib.MINIVMM_KEEPER_OPS or sum(len(op.data) for op in ops) > self.spare():
            raise CprError(f"cpr-exec: {len(ops)} state reads do not fit the keeper's control block")
        at = self.ops_at()
        for i, op in enumerate(ops):
            o = k.op[i]
            o.fd, o.request, o.offset, o.size, o.ret = op.fd, op.request, at, len(op.data), 0
            ffi.memmove(k.data + at, op.data, len(op.data))
            at += len(op.data)
        k.nops = len(ops)
        k.saved = -1
        k.vcpu[0].command = lib.KEEPER_SAVE
        self.wait(lambda: k.saved >= 0, "read the state")
        for i, op in enumerate(ops):
            o = k.op[i]
            op.ret = o.ret
            op.data = bytes(self.mem[self.data_at + o.offset : self.data_at + o.offset + o.size])

    def ops_at(self) -> int:
        return self.k.log_at + self.k.log_cap * LOG_ENTRY.size

    def spare(self) -> int:
        return self.k.data_size - self.ops_at()

    def logged(self) -> list[tuple[bool, int, bytes]]:
        """(pio, address, data) of each write in the log, oldest first."""
        at = self.data_at + self.k.log_at
        raw = self.mem[at : at + self.k.log_used * LOG_ENTRY.size]
        return [(bool(pio), addr, data[:n]) for addr, n, pio, data in LOG_ENTRY.iter_unpack(raw)]

    def run_copy(self, v) -> memoryview:
        at = self.data_at + v.run_copy
        return memoryview(self.mem)[at : at + v.run_size]

    def complete(self, v) -> None:
        """The access in the vCPU's kvm_run copy is done: KVM finishes the instruction."""
        lib = runloop.lib
        v.command = lib.KEEPER_COMPLETE
        self.wait(lambda: v.status != lib.KEEPER_PARKED, "finish an exit")

    def end(self) -> list[int]:
        """The tasks exit (the last one takes the old address space with it); their tids, to reap."""
        tids = [v.tid for v in self.vcpus()]
        for v in self.vcpus():
            v.command = runloop.lib.KEEPER_EXIT
        return tids

    def close(self) -> None:
        self.k = None
        self.mem.close()


def _kick(tid: int) -> None:
    try:
        os.kill(tid, signal.SIGUSR1)
    except ProcessLookupError:
        pass


def reap(tids: list[int]) -> None:
    for tid in tids:
        try:
            os.waitpid(tid, 0)
        except ChildProcessError:
            pass


# --- the old image --------------------------------------------------------------------------


def prepare(machine) -> int:
    """The control block for this machine, in the CPR table (before the stop, so the watchdog's copy
    of the table has it); its fd. The tasks start later (``start``)."""
    devices = machine.devices
    threads = list(machine.vcpus)
    run_size = devices.run_size
    reads_size = runloop.lib.MINIVMM_KEEPER_READS * runloop.ffi.sizeof("struct minivmm_keeper_read")
    data_size = reads_size + len(threads) * (run_size + READS_PER_VCPU) + LOG_ENTRIES * LOG_ENTRY.size + READS_PER_VM
    irqfds = [efd for _, efd in _irqfds(machine)]
    if len(irqfds) > runloop.lib.MINIVMM_KEEPER_VCPUS:  # vectors the guest enabled since ``unusable``
        raise CprError(f"cpr-exec: {len(irqfds)} irqfds, more than the keeper holds")
    fd = os.memfd_create("minivmm-keeper", os.MFD_CLOEXEC)
    block = _Block(fd, runloop.ffi.sizeof("struct minivmm_keeper") + data_size)
    k = block.k
    k.magic, k.nvcpus, k.data_size, k.vm_fd = MAGIC, len(threads), data_size, machine.vm.fd
    if devices.coalesced is not None:
        k.ring, k.ring_size = devices.coalesced.address, devices.coalesced.size
    k.log_at, k.log_cap = reads_size + len(threads) * run_size, LOG_ENTRIES  # data[]: answered reads first
    k.nkeep = len(irqfds)
    for i, efd in enumerate(irqfds):
        k.keep[i] = efd
    for i, t in enumerate(threads):
        v = k.vcpu[i]
        v.fd, v.run, v.run_size, v.run_copy = (
            t.vcpu.fd,
            ctypes.addressof(t.vcpu.run),
            run_size,
            reads_size + i * run_size,
        )
    machine.fds.save(*ENTRY, fd)
    _kept[fd] = block
    return fd


def start(fd: int, machine) -> None:
    """The vCPUs (stopped, their state written) run again, in the keeper's tasks; their Python threads
    stay parked, and die with the exec. CprError if the tasks cannot start."""
    block = _kept[fd]
    k = block.k
    reads = stable_reads(machine)[: runloop.lib.MINIVMM_KEEPER_READS]
    k.nreads = len(reads)
    table = runloop.ffi.cast("struct minivmm_keeper_read *", k.data)
    for i, (port, size, value, spoil_port, spoil_mask) in enumerate(reads):
        r = table[i]
        r.port, r.size, r.value, r.spoil_port, r.spoil_mask, r.live = port, size, value, spoil_port, spoil_mask, 1
    # Nobody took over (everything after the exec died): the vCPUs stop when the watchdog would have
    # given up, and the tasks end when a holder would have.
    k.run_until = time.monotonic_ns() + int((exec_timeout() + 30) * 1e9)
    k.exit_after = k.run_until + int((HOLD_TIMEOUT + 60) * 1e9)
    err = runloop.lib.minivmm_keeper_start(k)
    if err < 0:
        block.end()
        raise CprError(f"cpr-exec: the keeper's tasks did not start: {os.strerror(-err)}")
    block.wait(lambda: all(v.tid for v in block.vcpus()), "start")


def stable_reads(machine) -> list[tuple[int, int, int, int, int]]:
    """(port, size, value, spoiling port, spoiling bits) of every port read the devices can answer in
    advance, now that they are stopped: the tasks answer them while the VMM is away."""
    found = []
    for r in machine.devices.pio.ranges:
        for s in r.device.stable_reads():
            if r.offset <= s.offset < r.offset + r.length:
                base = r.base - r.offset
                found.append((base + s.offset, s.size, s.value, base + s.spoil_offset, s.spoil_mask))
    return found


def take_back(machine, fd: int) -> None:
    """The exec failed (or the update did before it): the tasks stop and end; an exit one left is
    finished by its thread."""
    block = _kept.pop(fd)
    if any(v.tid for v in block.vcpus()):  # they started
        block.stop()
        machine.devices.flush_coalesced(block.logged())  # older than what the ring still holds
        for t, v in zip(machine.vcpus, block.vcpus()):
            t.pending = v.status == runloop.lib.KEEPER_PARKED  # the exit is in the thread's own kvm_run
        reap([tid for tid in block.end() if tid])
    block.close()
    machine.fds.delete(*ENTRY)
    os.close(fd)


_kept: dict[int, _Block] = {}
READS_PER_VCPU = 64 << 10  # bytes of state reads per vCPU: XSAVE (up to 11 KiB), LAPIC, MSRs, ...
READS_PER_VM = 64 << 10  # the PIC, IOAPIC, PIT and clock, and the ring
LOG_ENTRY = struct.Struct("<QII8s")  # struct kvm_coalesced_mmio: address, length, pio, data
LOG_ENTRIES = 8192  # writes the tasks let by before a vCPU waits (a serial line's worth, many times)


# --- the new image ------------------------------------------------------------------------


@dataclass
class Taken:
    vcpus: list[vcpu_state.VcpuState]
    vm: vm_state.VmState
    exits: list = field(default_factory=list)  # (VcpuThread, VcpuExit): what a stopped vCPU met
    block: _Block | None = None  # its tasks, stopped, to end once the guest runs here


def take_over(machine, fd: int) -> Taken:
    """The guest from the keeper: stopped, its pending accesses done on this machine's devices,
    the state of the old vCPUs and VM read out. The second, short pause of a cpr-exec starts here."""
    if runloop.lib is None:
        raise CprError(f"cpr-exec: the old image's vCPUs run in its keeper, and {runloop.UNAVAILABLE}")
    block = _Block(fd)
    try:
        k = block.k
        if k.magic != MAGIC or k.nvcpus != len(machine.vcpus):
            raise CprError(f"cpr-exec: the keeper's control block is not for this machine ({k.nvcpus} vCPUs)")
        block.stop()
        writes = block.logged()  # the writes the tasks let go by, in order; then the ring's, newer
        if k.ring:
            ring = [_Op(-1, k.ring, bytes(k.ring_size))]
            block.run(ring)
            writes += CoalescedRing.copy(ring[0].data).pop()
        if writes:
            machine.devices.flush_coalesced(writes)
        exits = []
        for t, v in zip(machine.vcpus, block.vcpus()):
            if v.status == runloop.lib.KEEPER_PARKED:
                stop = t.finish(block.run_copy(v))
                if stop is None:
                    block.complete(v)
                else:
                    exits.append((t, stop))
        old = {t.vcpu.fd: v.fd for t, v in zip(machine.vcpus, block.vcpus())} | {machine.vm.fd: k.vm_fd}
        ops: list[_Op] = []
        _reads(machine, lambda fd_: Recording(old[fd_], ops))
        block.run(ops)
        replay = Replay(ops)
        vcpus, vm = _reads(machine, lambda fd_: replay)
        return Taken(vcpus, vm, exits, block)
    except BaseException:
        block.close()
        raise


def after(machine, taken: Taken, table) -> None:
    """The guest runs here: what a stopped keeper vCPU met goes to the run control as its own loop
    would have sent it, the block leaves the CPR table, and the ended tasks are reaped."""
    for thread, stop in taken.exits:
        thread.on_exit(thread, stop)
    fd = table.find(*ENTRY)
    table.delete(*ENTRY)
    global _reaper
    _reaper = threading.Thread(target=_end, args=(taken.block, fd), name="end-keeper", daemon=True)
    _reaper.start()


def _end(block: _Block, fd: int) -> None:
    """A moment after the resume (the old address space's teardown, which the last task's exit does,
    costs about 0.1 s per GiB here and is kept out of the new image's first steps): end the tasks."""
    time.sleep(TEARDOWN_DELAY)
    tids = block.end()
    block.close()
    os.close(fd)
    reap(tids)


def reaped(timeout: float = TEARDOWN_DELAY + STEP_TIMEOUT) -> None:
    """Before the next exec: the last keeper's tasks reaped (an exec would end the reaping thread
    and leave them as zombies nobody knows of)."""
    if _reaper is not None:
        _reaper.join(timeout)


_reaper: threading.Thread | None = None


def halt(table) -> None:
    """A new image that cannot load: the guest stops in the keeper until a retry takes it over."""
    fd = table.find(*ENTRY)
    if fd < 0 or runloop.lib is None:
        return
    block = _Block(fd)
    try:
        block.stop()
    except CprError:
        pass  # the retry's take-over stops them, or the deadline does
    finally:
        block.close()

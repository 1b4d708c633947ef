"""vCPU threads: the KVM_RUN loop and a small state machine around it.

Each vCPU runs in its own thread, in one of the states of ``VcpuRunState``.
Other threads never touch a running vCPU: they ask for a state
(``request``) and the vCPU thread gets there itself. To pause it, the
requester sets ``kvm_run.immediate_exit`` and sends SIG_KICK to the thread:
if the vCPU is inside KVM_RUN the signal makes it return EINTR, and if it is
not, the next KVM_RUN returns EINTR at once (after completing any pending
I/O, so the state KVM reports is consistent). On EINTR the thread parks.

When the guest cannot go on (a triple fault, an emulation failure, a system
event) the thread parks too and reports a typed ``VcpuExit``; what happens
next is the run-state controller's decision.

The exit loop is the hot path: exits are decoded with precompiled structs
from the mmap'd kvm_run rather than through ctypes attributes, and devices
are found through the bus's per-address cache.

Two loops enter KVM_RUN, one handling of exits: the Python loop makes one
KVM_RUN per pass by ctypes; the C loop (kvm/runloop.c, with a ``RunLoop``)
makes KVM_RUNs until an exit it does not handle itself (a post-code write is
one it does), and every other exit comes back here. Work that must come
before *each* KVM_RUN clears ``runloop.hot`` (or sets kvm_run's
request_interrupt_window), and C then returns after every exit.
"""

from __future__ import annotations

import enum
import errno
import signal
import struct
import threading
from collections.abc import Callable
from ctypes import sizeof
from dataclasses import dataclass
from functools import partial

from .devices.bus import Bus
from .kvm import constants as c
from .kvm import ioctls
from .kvm.runloop import RunLoop
from .kvm.structs import RUN_OFFSET_EXIT, RUN_OFFSET_EXIT_REASON, RUN_OFFSET_IMMEDIATE_EXIT, kvm_run
from .kvm.system import KvmError, Vcpu, _ioctl, get_errno

SIG_KICK = signal.SIGUSR1

# exit_reason (offset 8) and, 24 bytes on, the io member of the exit union
_EXIT = struct.Struct("<I20xBBHIQ")
assert RUN_OFFSET_EXIT - RUN_OFFSET_EXIT_REASON == 24
_MMIO = struct.Struct("<Q8sIB")


def install_kick_handler() -> None:
    """SIG_KICK must have a handler (else it kills) that does nothing; main thread only."""
    signal.signal(SIG_KICK, lambda signum, frame: None)


class VcpuRunState(enum.Enum):
    CREATED = "created"  # the thread has not started
    PAUSED = "paused"  # parked, out of KVM_RUN: its state may be read and written
    RUNNING = "running"  # in the KVM_RUN loop
    QUIT = "quit"  # the thread has ended for good


class ExitKind(enum.Enum):
    """Why a vCPU stopped for good."""

    TRIPLE_FAULT = "triple fault"  # KVM_EXIT_SHUTDOWN
    INTERNAL_ERROR = "internal error"  # KVM could not emulate, or minivmm's device code failed
    FAIL_ENTRY = "failed entry"  # the hardware refused the guest state
    POWER_OFF = "power off"  # KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = "reset"  # KVM_SYSTEM_EVENT_RESET
    CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    UNKNOWN = "unknown"  # an exit minivmm does not handle


_SYSTEM_EVENTS = {
    c.KVM_SYSTEM_EVENT_SHUTDOWN: ExitKind.POWER_OFF,
    c.KVM_SYSTEM_EVENT_RESET: ExitKind.RESET,
    c.KVM_SYSTEM_EVENT_CRASH: ExitKind.CRASH,
}


@dataclass
class VcpuExit:
    """Why a vCPU stopped for good: the run-state controller decides what happens next."""

    kind: ExitKind
    message: str
    data: int = 0


class VcpuThread:
    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_exit: Callable[[VcpuThread, VcpuExit], None],
        describe: Callable[[VcpuThread], str],
        runloop: RunLoop | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.index = vcpu.id
        self.pio = pio
        self.mmio = mmio
        self.on_exit = on_exit  # called in this thread when the guest cannot go on
        self.describe = describe  # "RIP=... " context for error messages
        self.runloop = runloop  # the C loop's state for this vCPU; None: the Python loop
        self.cond = threading.Condition()
        self.state = VcpuRunState.CREATED  # where the thread is
        self.wanted = VcpuRunState.PAUSED  # where it was asked to go: PAUSED, RUNNING or QUIT
        self.exits = 0  # number of KVM_RUN returns, for statistics
        # A userspace interrupt controller's hooks (kernel-irqchip=split): work to do before each
        # entry (ExtINT injection), and the EOI of a level-triggered IOAPIC vector.
        self.before_run: Callable[[VcpuThread], None] | None = None
        self.on_eoi: Callable[[int], None] = lambda vector: None
        self.pending = False  # kvm_run holds an exit to finish before the next KVM_RUN
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    @property
    def paused(self) -> bool:
        return self.state in (VcpuRunState.PAUSED, VcpuRunState.QUIT)

    # --- requests, from any thread -------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def request(self, wanted: VcpuRunState) -> None:
        """Ask the thread to run, park or end; a running vCPU is kicked out of KVM_RUN."""
        with self.cond:
            if self.wanted == VcpuRunState.QUIT:
                return
            self.wanted = wanted
            self.cond.notify_all()
            if wanted == VcpuRunState.RUNNING:
                return
        self.kick()

    def kick(self) -> None:
        """Make the thread leave KVM_RUN and pass through ``before_run`` again, without a pause."""
        self.vcpu.run_mmap[RUN_OFFSET_IMMEDIATE_EXIT] = 1
        ident = self.thread.ident
        if ident is not None and self.thread.is_alive() and ident != threading.get_ident():
            try:
                signal.pthread_kill(ident, SIG_KICK)
            except ProcessLookupError:
                pass

    def request_pause(self) -> None:
        self.request(VcpuRunState.PAUSED)

    def resume(self) -> None:
        self.request(VcpuRunState.RUNNING)

    def wait_paused(self, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.paused or not self.thread.is_alive(), timeout)

    def quit(self, timeout: float = 5.0) -> None:
        """End the thread (from another thread) and wait for it."""
        self.request(VcpuRunState.QUIT)
        if self.thread.is_alive() and self.thread.ident != threading.get_ident():
            self.thread.join(timeout)

    # --- the thread ----------------------------------------------------------------
    def _park(self) -> bool:
        """Wait while a pause is wanted; False when the thread should end."""
        with self.cond:
            while self.wanted == VcpuRunState.PAUSED:
                self.state = VcpuRunState.PAUSED
                self.cond.notify_all()
                self.cond.wait()
            if self.wanted == VcpuRunState.QUIT:
                self.state = VcpuRunState.QUIT
                self.cond.notify_all()
                return False
            self.state = VcpuRunState.RUNNING
            self.vcpu.run_mmap[RUN_OFFSET_IMMEDIATE_EXIT] = 0  # a request after this sets it again
            self.cond.notify_all()
            return True

    def _main(self) -> None:
        while self._park():
            try:
                stop = self._run()
            except Exception as e:  # the barrier: a bug in a device or here ends the guest's run, not the thread
                stop = VcpuExit(ExitKind.INTERNAL_ERROR, f"vCPU loop failed: {type(e).__name__}: {e}")
            if stop is not None:
                with self.cond:
                    if self.wanted == VcpuRunState.RUNNING:
                        self.wanted = VcpuRunState.PAUSED
                self.on_exit(self, stop)

    def _run(self) -> VcpuExit | None:
        """Run the guest until a pause is requested (None) or it cannot go on.

        ``enter()`` is one KVM_RUN (the Python loop) or the C loop; either way an
        exit that reaches the code below is handled the same."""
        fd = self.vcpu.fd
        view = memoryview(self.vcpu.run_mmap)
        if self.pending:  # an exit another loop left in kvm_run (a cpr-exec keeper's, taken back)
            self.pending = False
            try:
                stop = self.finish(view)
            except Exception:
                view.release()
                raise
            if stop is not None:
                view.release()
                return stop
        if self.runloop is None:
            enter, last_errno = partial(_ioctl, fd, ioctls.KVM_RUN, None), get_errno
        else:
            enter, last_errno = self.runloop.enter(view), self.runloop.errno
        decode = _EXIT.unpack_from
        pio_cache_get, pio_lookup = self.pio.cache.get, self.pio.lookup
        exit_io, exit_mmio, out = c.KVM_EXIT_IO, c.KVM_EXIT_MMIO, c.KVM_EXIT_IO_OUT
        exits = 0
        reason = 0
        if self.before_run is not None:
            self.before_run(self)
        try:
            while True:
                if enter() < 0:
                    err = last_errno()
                    if err in (errno.EINTR, errno.EAGAIN):
                        return None
                    return VcpuExit(
                        ExitKind.INTERNAL_ERROR, f"{KvmError('KVM_RUN', err)} at {self.describe(self)}", err
                    )
                exits += 1
                reason, direction, size, port, count, offset = decode(view, RUN_OFFSET_EXIT_REASON)
                if reason == exit_io:
                    if direction == out and count == 1 and size == 1:  # the common case, inline
                        device, devoff = pio_cache_get(port) or pio_lookup(port)
                        device.write(devoff, 1, view[offset])
                    else:
                        self._pio(view)
                elif reason == exit_mmio:
                    self._mmio(view)
                elif reason == c.KVM_EXIT_IOAPIC_EOI:
                    self.on_eoi(view[RUN_OFFSET_EXIT])
                elif reason == c.KVM_EXIT_IRQ_WINDOW_OPEN:
                    return None  # back through before_run, which injects
                else:
                    return self._other_exit(reason, view)
        except Exception as e:  # device emulation failed: the guest cannot trust its device any more
            return VcpuExit(ExitKind.INTERNAL_ERROR, f"{self._access(view, reason)} failed: {type(e).__name__}: {e}")
        finally:
            self.exits += exits
            if self.runloop is not None:
                self.exits += self.runloop.leave()
            view.release()

    def _access(self, view: memoryview, reason: int) -> str:
        """The guest access being emulated, for an error message."""
        if reason == c.KVM_EXIT_IO:
            _, direction, size, port, _, _ = _EXIT.unpack_from(view, RUN_OFFSET_EXIT_REASON)
            device = self.pio.lookup(port)[0]
            verb = "write to" if direction == c.KVM_EXIT_IO_OUT else "read of"
            return f"{size}-byte {verb} port {port:#x} ({getattr(device, 'name', type(device).__name__)})"
        if reason == c.KVM_EXIT_MMIO:
            addr, _, length, is_write = _MMIO.unpack_from(view, RUN_OFFSET_EXIT)
            return f"{length}-byte MMIO {'write to' if is_write else 'read of'} {addr:#x}"
        return f"exit {c.EXIT_NAMES.get(reason, reason)}"

    def finish(self, view: memoryview) -> VcpuExit | None:
        """Do the exit in ``view`` (a kvm_run another loop left unfinished: the keeper's, cpr/keeper.py)
        on this vCPU's devices, as the loop would; for an exit the guest cannot go on from, what it is."""
        reason = _EXIT.unpack_from(view, RUN_OFFSET_EXIT_REASON)[0]
        if reason == c.KVM_EXIT_IO:
            self._pio(view)
        elif reason == c.KVM_EXIT_MMIO:
            self._mmio(view)
        elif reason == c.KVM_EXIT_IOAPIC_EOI:
            self.on_eoi(view[RUN_OFFSET_EXIT])
        elif reason != c.KVM_EXIT_IRQ_WINDOW_OPEN:
            return self._other_exit(reason, view)
        return None

    def _pio(self, view: memoryview) -> None:
        _, direction, size, port, count, offset = _EXIT.unpack_from(view, RUN_OFFSET_EXIT_REASON)
        device, devoff = self.pio.lookup(port)
        if direction == c.KVM_EXIT_IO_OUT:
            for at in range(offset, offset + count * size, size):
                device.write(devoff, size, int.from_bytes(view[at : at + size], "little"))
        else:
            for at in range(offset, offset + count * size, size):
                view[at : at + size] = device.read(devoff, size).to_bytes(size, "little")

    def _mmio(self, view: memoryview) -> None:
        addr, data, length, is_write = _MMIO.unpack_from(view, RUN_OFFSET_EXIT)
        if is_write:
            self.mmio.write(addr, length, int.from_bytes(data[:length], "little"))
        else:
            value = self.mmio.read(addr, length)
            at = RUN_OFFSET_EXIT + 8
            view[at : at + length] = value.to_bytes(length, "little")

    def _other_exit(self, reason: int, view: memoryview) -> VcpuExit:
        run = kvm_run.from_buffer_copy(view[: sizeof(kvm_run)])
        where = self.describe(self)
        name = c.EXIT_NAMES.get(reason, str(reason))
        if reason == c.KVM_EXIT_SHUTDOWN:
            return VcpuExit(ExitKind.TRIPLE_FAULT, f"triple fault (KVM_EXIT_SHUTDOWN) at {where}")
        if reason == c.KVM_EXIT_INTERNAL_ERROR:
            err = run.exit.internal
            what = c.INTERNAL_ERROR_NAMES.get(err.suberror, "unknown")
            extra = ""
            if err.suberror == c.KVM_INTERNAL_ERROR_EMULATION:
                ef = run.exit.emulation_failure
                if ef.flags & c.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES and ef.insn_size:
                    size = min(ef.insn_size, 15)
                    extra = "; instruction bytes " + " ".join(f"{b:02x}" for b in ef.insn_bytes[:size])
            data = " ".join(f"{err.data[i]:#x}" for i in range(min(err.ndata, 16)))
            return VcpuExit(
                ExitKind.INTERNAL_ERROR,
                f"KVM internal error, suberror {err.suberror} ({what}) at {where}{extra}"
                + (f"; data: {data}" if data else ""),
                err.suberror,
            )
        if reason == c.KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            return VcpuExit(
                ExitKind.FAIL_ENTRY,
                f"KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {fe.hardware_entry_failure_reason:#x} "
                f"on cpu {fe.cpu} at {where}",
            )
        if reason == c.KVM_EXIT_SYSTEM_EVENT:
            kind = run.exit.system_event.type
            return VcpuExit(_SYSTEM_EVENTS.get(kind, ExitKind.UNKNOWN), f"system event {kind}", kind)
        return VcpuExit(ExitKind.UNKNOWN, f"unexpected exit KVM_EXIT_{name} ({reason}) at {where}", reason)

"""The run-state controller: QEMU's run states, events and requests.

Devices and vCPU threads ask for a shutdown, a reset or a panic from any
thread (``request_*``); the vCPUs are held at once and the request is
carried out on the main loop, which is the only place the run state
changes. ``vm_start``/``vm_stop`` are QEMU's, emitting RESUME and STOP.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from minivmm import runstate
from minivmm.config import MachineConfig
from minivmm.kvm.system import KvmError
from minivmm.log import message
from minivmm.mainloop import MainLoop
from minivmm.vcpu import ExitKind, VcpuExit, VcpuThread

from .vcpus import VcpuManager

# How a run ended, as minivmm's exit status says it, so that a CI job can tell endings apart
# (isa-debug-exit's statuses, (v << 1) | 1, are odd; these are even, except QEMU's 1).
EXIT_POWER_OFF = 0  # the guest powered off (ACPI S5, a KVM shutdown event), or the host asked (quit, a signal)
EXIT_FAILURE = 1  # minivmm or KVM could not go on; also -action panic=exit-failure, as QEMU
EXIT_RESET = 2  # the guest reset the machine and -no-reboot was given
EXIT_PANIC = 4  # the guest reported a panic (pvpanic) and -action panic=shutdown (the default) ended the run
EXIT_TRIPLE_FAULT = 6  # the guest triple-faulted and -no-reboot was given


@dataclass(frozen=True)
class ShutdownRequest:
    reason: str  # QEMU's ShutdownCause: guest-shutdown, guest-reset, host-qmp-quit, host-signal...
    status: int = 0  # the process exit status
    message: str | None = None  # printed on stderr
    force: bool = False  # exit even with -no-shutdown (quit, signals)


class RunControl:
    def __init__(self, config: MachineConfig, loop: MainLoop, vcpus: VcpuManager) -> None:
        self.config = config
        self.loop = loop
        self.vcpus = vcpus
        self.state = runstate.PRELAUNCH
        self.autostart = not config.start_paused  # run when an incoming migration completes
        self.listeners: list[Callable[[str, dict | None], None]] = []
        self.shutdown_request: ShutdownRequest | None = None
        self.exit_status = 0
        self.reset_machine: Callable[[str], None] = lambda reason: None  # the machine sets it
        self.wake_machine: Callable[[], None] = lambda: None  # the machine sets it: S3 resume
        self.wake_delay: Callable[[], float | None] = lambda: None  # seconds until a wake source fires
        self._suspends = 0  # a wake timer of an earlier suspend must not wake a later one
        self._request_lock = threading.Lock()

    # --- events --------------------------------------------------------------------------
    def add_event_listener(self, listener: Callable[[str, dict | None], None]) -> None:
        self.listeners.append(listener)

    def emit(self, event: str, data: dict | None = None) -> None:
        """A QMP event (STOP, RESUME, RESET, SHUTDOWN, ...) for every listener (main thread)."""
        for listener in list(self.listeners):
            listener(event, data)

    def emit_threadsafe(self, event: str, data: dict | None = None) -> None:
        self.loop.call_soon_threadsafe(self.emit, event, data)

    # --- run state (main thread) ---------------------------------------------------------------
    def set_state(self, new: str) -> None:
        runstate.check_transition(self.state, new)
        self.state = new

    def resume_if_running(self) -> None:
        if self.state == runstate.RUNNING:
            self.vcpus.resume_all()

    def vm_start(self) -> None:
        """QEMU's vm_start: run the vCPUs and emit RESUME (nothing when already running)."""
        if self.state == runstate.RUNNING:
            return
        self.set_state(runstate.RUNNING)
        self.vcpus.resume_all()
        self.emit("RESUME")

    def vm_stop(self, state: str = runstate.PAUSED) -> None:
        """QEMU's vm_stop: stop every vCPU, enter ``state`` and emit STOP, if the VM runs."""
        if not runstate.is_live(self.state):
            return
        self.set_state(state)
        self.vcpus.pause_all()
        for t in self.vcpus:
            try:
                t.vcpu.kvmclock_ctrl()  # tell a kvmclock guest it was stopped (no soft lockups)
            except KvmError:
                pass  # the guest does not use kvmclock
        self.emit("STOP")

    def vm_stop_force_state(self, state: str) -> None:
        """QEMU's vm_stop_force_state: stop if running, else just enter ``state``."""
        if runstate.is_live(self.state):
            self.vm_stop(state)
        else:
            self.set_state(state)

    # --- requests: from any thread, carried out on the main loop --------------------------------
    def request_shutdown(self, reason: str, status: int = 0, text: str | None = None, force: bool = False) -> None:
        """QEMU's qemu_system_shutdown_request. ``force`` (quit, signals) ignores -no-shutdown."""
        with self._request_lock:
            if self.shutdown_request is not None:
                return
            self.shutdown_request = ShutdownRequest(reason, status, text, force)
        self.vcpus.hold_all()
        self.loop.call_soon_threadsafe(self._handle_shutdown)

    def request_reset(self, reason: str, text: str | None = None, status: int = EXIT_RESET) -> None:
        """QEMU's qemu_system_reset_request; with -no-reboot it becomes a shutdown, and a reset the
        guest asked for ends with ``status`` and a line saying why."""
        if self.config.no_reboot:
            if reason.startswith("guest"):
                text = text or "the guest reset the machine; -no-reboot was given, so minivmm exits"
                self.request_shutdown(reason, status, text)
            else:
                self.request_shutdown(reason, EXIT_POWER_OFF)
            return
        self.vcpus.hold_all()
        self.loop.call_soon_threadsafe(self._handle_reset, reason)

    def request_suspend(self) -> None:
        """The guest suspends to RAM (ACPI S3): QEMU's qemu_system_suspend_request."""
        self.vcpus.hold_all()
        self.loop.call_soon_threadsafe(self._handle_suspend)

    def wakeup(self, reason: str) -> bool:
        """QEMU's qemu_system_wakeup: a suspended machine resets, RAM kept, and the guest goes on
        from its waking vector; False when it is not suspended."""
        if self.state != runstate.SUSPENDED:
            return False
        self.wake_machine()
        self.set_state(runstate.RUNNING)
        self.vcpus.resume_all()
        self.emit("WAKEUP")
        return True

    def request_panic(self) -> None:
        """The guest says it panicked (pvpanic): QEMU's -action panic=... decides."""
        self.vcpus.hold_all()
        self.loop.call_soon_threadsafe(self._handle_panic)

    def on_vcpu_exit(self, thread: VcpuThread, why: VcpuExit) -> None:
        """A vCPU cannot go on (called on its thread, now parked)."""
        where = f"vcpu{thread.index}: {why.message}"
        if why.kind == ExitKind.TRIPLE_FAULT:
            self.request_reset("guest-reset", f"{where}; -no-reboot was given, so minivmm exits", EXIT_TRIPLE_FAULT)
        elif why.kind == ExitKind.POWER_OFF:
            self.request_shutdown("guest-shutdown")
        elif why.kind == ExitKind.RESET:
            self.request_reset("guest-reset")
        elif why.kind == ExitKind.CRASH:
            self.request_panic()
        else:
            self.loop.call_soon_threadsafe(self._handle_vcpu_failure, where)

    def on_signal(self, signum: int, frame) -> None:
        self.request_shutdown("host-signal", 0, f"terminating on signal {signum}", force=True)

    def install_signal_handlers(self) -> dict:
        """SIGINT, SIGTERM and SIGHUP end the machine cleanly; the previous handlers, to put back."""
        return {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    # --- carrying them out (main thread) -------------------------------------------------------
    def _handle_shutdown(self) -> None:
        req = self.shutdown_request
        if req is None:
            return
        if req.message:
            message(req.message)
        self.emit("SHUTDOWN", {"guest": req.reason.startswith("guest"), "reason": req.reason})
        if self.config.no_shutdown and not req.force:
            self.shutdown_request = None
            self.vm_stop(runstate.SHUTDOWN)
            self.resume_if_running()  # nothing runs unless the state allows it
            return
        self.exit_status = req.status
        self.loop.stop()

    def _handle_reset(self, reason: str) -> None:
        if self.shutdown_request is not None:
            return
        self.vcpus.pause_all()
        self.reset_machine(reason)
        if self.state not in (runstate.RUNNING, runstate.INMIGRATE, runstate.FINISH_MIGRATE):
            self.set_state(runstate.PRELAUNCH)
        self.resume_if_running()

    def _handle_suspend(self) -> None:
        if self.state != runstate.RUNNING or self.shutdown_request is not None:
            self.resume_if_running()
            return
        self.vcpus.pause_all()
        self.set_state(runstate.SUSPENDED)
        self.emit("SUSPEND")
        self._suspends += 1
        delay = self.wake_delay()
        if delay is not None:  # the RTC alarm, when the guest let it wake the machine
            self.loop.call_later(delay, self._wake_if_still, self._suspends)

    def _wake_if_still(self, suspend: int) -> None:
        if suspend == self._suspends:
            self.wakeup("rtc")

    def _handle_panic(self) -> None:
        action = self.config.panic_action
        if action == "none":
            self.emit("GUEST_PANICKED", {"action": "run"})
            self.resume_if_running()
            return
        pause = action == "pause" or (action == "shutdown" and self.config.no_shutdown)
        self.emit("GUEST_PANICKED", {"action": "pause" if pause else "poweroff"})
        self.vm_stop(runstate.GUEST_PANICKED)
        if not pause:
            if action == "exit-failure":
                self.request_shutdown("guest-panic", EXIT_FAILURE, "the guest panicked (-action panic=exit-failure)")
            else:
                self.request_shutdown("guest-panic", EXIT_PANIC, "the guest panicked (-action panic=shutdown)")

    def _handle_vcpu_failure(self, text: str) -> None:
        message(text)
        if self.config.monitors:
            self.vm_stop(runstate.INTERNAL_ERROR)  # stays for the monitor to inspect, as QEMU does
        else:
            self.request_shutdown("host-error", EXIT_FAILURE, force=True)

"""The machine: a KVM VM with its RAM, devices and vCPUs, and what runs it.

It is made of four parts, each in its own module: the builder (from a
MachineConfig, in KVM's order), the vCPU manager, the device manager and
the run-state controller. This module holds them together: start, run,
reset and close.
"""

from __future__ import annotations

import signal
import sys

from minivmm import runstate
from minivmm.arch.x86 import boot
from minivmm.config import MachineConfig
from minivmm.cpr.fdtable import FdTable
from minivmm.kvm.system import Kvm
from minivmm.mainloop import MainLoop
from minivmm.memory import GuestMemory, Slot
from minivmm.vcpu import VcpuThread

from . import builder
from .control import RunControl
from .devices import DeviceManager
from .errors import MachineError
from .vcpus import VcpuManager


class Machine:
    devices: DeviceManager  # set by the builder

    def __init__(self, config: MachineConfig, loop: MainLoop | None = None, fds: FdTable | None = None) -> None:
        self.config = config
        self.loop = loop or MainLoop()
        # Every fd that outlives this process: from the previous minivmm when this is an
        # incoming CPR (fds.inherited), filled as resources open otherwise.
        self.fds = fds if fds is not None else FdTable()
        self.vcpus = VcpuManager()
        self.control = RunControl(config, self.loop, self.vcpus)
        self.control.reset_machine = self.reset
        self.control.wake_machine = self.wake
        self.memory = GuestMemory()
        self.memslots: list[Slot] = []
        self.vm = self.kvm = None
        # The boot images, read and checked. An incoming migration reads them too but loads
        # nothing (RAM comes with the stream): a reset after it boots the machine afresh from them.
        try:
            self.image = boot.prepare(config.kernel, config.append, config.initrd, config.bios)
        except boot.BootError as e:
            raise MachineError("", str(e)) from None
        try:
            self.kvm = Kvm()
        except OSError as e:  # QEMU's wording
            raise MachineError("", f"Could not access KVM kernel module: {e.strerror} (/dev/kvm)") from None
        try:
            builder.build(self)
        except BaseException:
            self.close()
            raise

    @property
    def runstate(self) -> str:
        return self.control.state

    def describe(self, thread: VcpuThread) -> str:
        """Where a vCPU is, for error messages (RIP, mode, the bytes there)."""
        from minivmm.arch.x86 import inspect

        return inspect.describe(thread.vcpu, self.memory)

    def vcpu_paused(self, index: int):
        """One vCPU held out of KVM_RUN while its state is read or changed."""
        return self.vcpus.paused(index, lambda: self.control.state == runstate.RUNNING)

    def start(self) -> None:
        """Start the vCPU threads (once); they run unless the machine starts paused (-S) or incoming."""
        self.vcpus.start()
        if not self.config.start_paused and self.control.state == runstate.PRELAUNCH:
            self.control.vm_start()

    def _power_on_state(self) -> None:
        """vCPUs, irqchips, PIT and devices as at power-on (the vCPUs paused); RAM untouched."""
        self.vcpus.restore_initial()
        self.irqchip.power_on()
        self.devices.reset_all()

    def reset(self, reason: str) -> None:
        """QEMU's qemu_system_reset with the vCPUs paused: power-on vCPU and irqchip
        state, devices reset, boot images reloaded; RESET is emitted."""
        self._power_on_state()
        if self.control.state != runstate.INMIGRATE:  # as QEMU's rom_reset: RAM still to come is not written
            builder.load_boot(self)
        self.control.emit("RESET", {"guest": reason.startswith("guest"), "reason": reason})

    def wake(self) -> None:
        """S3 resume, as firmware does it: the machine resets with RAM kept, and the boot CPU starts
        in real mode at the waking vector the guest left in the FACS (with -bios, or no vector, the
        reset is a plain one: the firmware or a fresh boot decides)."""
        self._power_on_state()
        vector = builder.waking_vector(self)
        if vector:
            builder.enter_real_mode(self, self.vcpus[0].vcpu, vector)
        elif self.image.kind != "bios":
            builder.load_boot(self)

    def run(self) -> int:
        """Run until the guest or the host ends the machine; the process exit status."""
        previous = self.control.install_signal_handlers()
        try:
            self.start()
            self.loop.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.vcpus.pause_all()
        return self.control.exit_status

    def close(self) -> None:
        for name, id_ in [key for key in self.fds.fds if key[0] == "getfd"]:
            self.fds.close(name, id_)
        self.vcpus.close()
        if getattr(self, "devices", None) is not None:
            self.devices.close()
        self.memory.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        sys.stdout.flush()

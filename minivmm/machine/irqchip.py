"""The interrupt controllers, as ``-machine kernel-irqchip=`` chooses them.

``on`` (the default): KVM emulates the PIC pair, the IOAPIC and (unless
``pit=off``) the PIT; a device's line is a KVM_IRQ_LINE on its GSI.

``split``: KVM keeps only the local APICs (KVM_CAP_SPLIT_IRQCHIP) and minivmm
emulates the PIC pair, the IOAPIC and the PIT (devices/i8259.py, ioapic.py,
i8254.py), as QEMU does. An ISA line goes to both the PIC and the IOAPIC, IRQ
0 to IOAPIC pin 2 as the MADT's override says. The IOAPIC delivers through
KVM MSI routes; the PIC's output reaches the boot CPU as ExtINT: its vCPU
thread, before each KVM_RUN, hands KVM the PIC's vector (KVM_INTERRUPT) when
KVM says the guest can take it, and asks for an interrupt-window exit when it
cannot yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from minivmm.arch.x86 import layout
from minivmm.devices import i8254, i8259, ioapic
from minivmm.devices.bus import Bus
from minivmm.kvm import constants as c
from minivmm.kvm.system import Vm
from minivmm.mainloop import MainLoop
from minivmm.vcpu import VcpuThread

from .errors import MachineError

MODES = ("on", "split")


def pc_routes() -> list[tuple[int, int, int]]:
    """The PC's GSIs as QEMU routes them: 0-15 to the PICs (2 is the cascade), and to the
    IOAPIC pin of the same number, but GSI 0 (the PIT) to pin 2, as the MADT's override says.
    KVM's default table sends GSI 0 to pin 0, where no guest that reads the MADT looks."""
    routes = [(gsi, c.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else c.KVM_IRQCHIP_PIC_SLAVE, gsi & 7) for gsi in range(16)]
    routes = [r for r in routes if r[0] != 2]
    routes += [(gsi, c.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi) for gsi in range(ioapic.PINS) if gsi != 2]
    return routes


class KernelIrqchip:
    """KVM's PIC, IOAPIC and PIT; their power-on state is kept for resets."""

    split = False
    kvm_chips = True  # KVM holds the PICs' and IOAPIC's state (saved as kvm-irqchip sections)

    def __init__(self, vm: Vm, pit: bool, pit_reinject: bool) -> None:
        self.vm = vm
        self.device_msi: dict[int, tuple[int, int]] = {}  # GSI -> (address, data) of PCI devices' MSIs
        self.routes_lock = threading.Lock()
        vm.create_irqchip()
        vm.set_gsi_routing(irqchip_routes=pc_routes())
        self.kvm_pit = pit  # KVM holds the PIT's state (the kvm-pit section)
        if pit:
            vm.create_pit2()
            if not pit_reinject:  # lost_tick_policy=discard: ticks the guest missed are not made up
                vm.reinject_control(False)
        self.initial_chips = [vm.get_irqchip(i) for i in range(3)]
        self.initial_pit = vm.get_pit2() if pit else None
        self.set_irq: Callable[[int, int], None] = vm.irq_line

    def set_device_msi(self, gsi: int, route: tuple[int, int] | None) -> None:
        """Route ``gsi`` (past the IOAPIC's pins) to a device's MSI (address, data), or nowhere."""
        with self.routes_lock, _updated(self.device_msi, gsi, route):  # the table goes to KVM whole: one writer
            self.vm.set_gsi_routing(irqchip_routes=pc_routes(), msi_routes=self.device_msi)

    def add_devices(self, pio: Bus, mmio: Bus, loop: MainLoop) -> None:
        """Nothing: KVM answers at their ports and addresses."""

    def attach(self, threads: list[VcpuThread]) -> None:
        """Nothing: KVM delivers every interrupt itself."""

    def held_extint(self, thread: VcpuThread) -> int:
        """None: KVM's own PIC is acknowledged as the vector is injected, which VCPU_EVENTS reports."""
        return -1

    def power_on(self) -> None:
        for chip in self.initial_chips:
            self.vm.set_irqchip(chip)
        if self.initial_pit is not None:
            self.vm.set_pit2(self.initial_pit)


class SplitIrqchip:
    """KVM's local APICs, minivmm's PIC, IOAPIC and PIT."""

    split = True
    kvm_chips = kvm_pit = False  # their state is in minivmm's devices

    def __init__(self, vm: Vm, pit: bool) -> None:
        if not vm.check_extension(c.KVM_CAP_SPLIT_IRQCHIP):
            raise MachineError("-machine kernel-irqchip=split", "this KVM lacks KVM_CAP_SPLIT_IRQCHIP")
        self.vm = vm
        vm.enable_split_irqchip(ioapic.PINS)
        self.pin_routes: dict[int, tuple[int, int]] = {}  # the IOAPIC's, GSI = pin
        self.routes_lock = threading.Lock()
        self.device_msi: dict[int, tuple[int, int]] = {}  # PCI devices' MSIs, past the pins
        self.ioapic = ioapic.IoApic(lambda gsi: vm.irq_line(gsi, 1), self._set_pin_routes)
        self.pic = i8259.Pic(self._pic_output)
        self.pit = pit
        self.boot: VcpuThread | None = None
        self.probed = False  # the boot vCPU's last KVM_RUN was a probe of its "ready" flags
        self.extint: tuple[int, int] | None = None  # (vector, boot vCPU's exit count) at the last KVM_INTERRUPT

    def _set_pin_routes(self, routes: dict[int, tuple[int, int]]) -> None:
        with self.routes_lock:  # the table goes to KVM whole: one writer at a time
            self.pin_routes = dict(routes)
            self.vm.set_gsi_routing(msi_routes={**self.pin_routes, **self.device_msi})

    def set_device_msi(self, gsi: int, route: tuple[int, int] | None) -> None:
        """Route ``gsi`` (past the IOAPIC's pins) to a device's MSI (address, data), or nowhere."""
        with self.routes_lock, _updated(self.device_msi, gsi, route):
            self.vm.set_gsi_routing(msi_routes={**self.pin_routes, **self.device_msi})

    def set_irq(self, gsi: int, level: int) -> None:
        """An ISA or PCI line: ISA IRQs reach both the PIC and the IOAPIC."""
        if gsi < 16:
            self.pic.set_irq(gsi, level)
        self.ioapic.set_irq(2 if gsi == layout.IRQ_PIT else gsi, level)

    def add_devices(self, pio: Bus, mmio: Bus, loop: MainLoop) -> None:
        pio.register(layout.PORT_PIC_MASTER, 2, self.pic)
        pio.register(layout.PORT_PIC_SLAVE, 2, self.pic, offset=2)
        pio.register(layout.PORT_ELCR, 2, self.pic, offset=i8259.OFFSET_ELCR)
        mmio.register(layout.IOAPIC_ADDR, layout.IOAPIC_SIZE, self.ioapic)
        if self.pit:

            def later(delay: float, fn: Callable[[], None]) -> None:  # from any thread
                loop.call_soon_threadsafe(loop.call_later, delay, fn)

            pit = i8254.Pit(lambda level: self.set_irq(layout.IRQ_PIT, level), later)
            pio.register(layout.PORT_PIT, 4, pit)
            pio.register(layout.PORT_SPEAKER, 1, pit, offset=i8254.PORT_61)

    def attach(self, threads: list[VcpuThread]) -> None:
        """IOAPIC EOIs come back on any vCPU; the PIC's output goes to the boot CPU."""
        for t in threads:
            t.on_eoi = self.ioapic.eoi
        self.boot = threads[0]
        self.boot.before_run = self._inject_extint

    def power_on(self) -> None:
        """The devices' resets put the PIC, IOAPIC and PIT in their power-on state."""

    def _pic_output(self, high: bool) -> None:
        if high and self.boot is not None:
            self.boot.kick()  # its next pass through before_run delivers

    def _inject_extint(self, thread: VcpuThread) -> None:
        """QEMU's kvm_arch_pre_run for a userspace PIC, plus a probe: kvm_run's "ready" flags
        are from the last KVM_RUN, which may predate a state load (an incoming migration) or be
        none at all; a vCPU halted in the kernel would then wait forever for a window exit.
        So "not ready" is believed only when fresh: first one KVM_RUN that returns at once."""
        run = thread.vcpu.run
        if not self.pic.output:
            run.request_interrupt_window = 0
            return
        if run.ready_for_interrupt_injection and run.if_flag:
            self.probed = False
            vector = self.pic.acknowledge()
            if vector is not None:
                thread.vcpu.interrupt(vector)
                self.extint = (vector, thread.exits)
        elif not self.probed:
            self.probed = True
            run.immediate_exit = 1  # back here at once, with the flags as of now
            return
        else:
            self.probed = False
        run.request_interrupt_window = 1 if self.pic.output else 0

    def held_extint(self, thread: VcpuThread) -> int:
        """The vector KVM still holds from the last KVM_INTERRUPT, or -1; asked with the vCPU paused.

        KVM keeps it apart (its pending ExtINT) until the guest next enters, and KVM_GET_VCPU_EVENTS
        does not report it: a pause that lands between the injection and the entry (or finds the
        vCPU halted) would leave it out of a saved state, with the PIC's in-service bit set for an
        interrupt the guest never gets. It was taken if the guest exited since, or if KVM's flags
        after the last KVM_RUN say so: ready for another (not ready while it holds one) or IF clear
        (the guest is in the handler: IF was set when it was handed over)."""
        if thread is not self.boot or self.extint is None:
            return -1
        vector, exits = self.extint
        run = thread.vcpu.run
        if thread.exits != exits or run.ready_for_interrupt_injection or not run.if_flag:
            return -1
        return vector


@contextmanager
def _updated(routes: dict[int, tuple[int, int]], gsi: int, route: tuple[int, int] | None) -> Iterator[None]:
    """``routes`` with ``gsi`` routed to ``route`` (None: not routed); put back as it was if the body
    raises (KVM refused the table), so one refused route does not spoil every later update."""
    before = routes.get(gsi)
    if route is None:
        routes.pop(gsi, None)
    else:
        routes[gsi] = route
    try:
        yield
    except BaseException:
        if before is None:
            routes.pop(gsi, None)
        else:
            routes[gsi] = before
        raise


def create(vm: Vm, mode: str, pit: bool, pit_reinject: bool) -> KernelIrqchip | SplitIrqchip:
    """Before any vCPU: KVM takes the irqchip mode only then."""
    if mode == "split":
        return SplitIrqchip(vm, pit)
    return KernelIrqchip(vm, pit, pit_reinject)

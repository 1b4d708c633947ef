"""The device manager: the PC's devices, declared in tables the builder
walks, on the two buses (port I/O and MMIO), with their chardevs and their
interrupt lines.

``BOARD`` lists what every machine has, ``MODELS`` what ``-device`` can add
(QEMU's names and property defaults); serial ports come from ``-serial``.
Every device follows devices.device.Device: reset and the optional persist
part are declared, not looked for.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minivmm.arch.x86 import layout
from minivmm.arch.x86.e820 import memory_map
from minivmm.chardev import Chardev, ChardevError, FileChardev, SocketChardev, StdioChardev
from minivmm.config import ChardevConfig, DeviceConfig, MachineConfig
from minivmm.cpr.fdtable import FdTable
from minivmm.devices import edu, fw_cfg, ioapic, pc_testdev, pci_testdev, pvpanic
from minivmm.devices.acpi_pm import (
    RESET_CONTROL_RST_CPU,
    RESET_CONTROL_SYS_RST,
    RTC_EN,
    AcpiPm,
    Pm1Event,
    PmTimer,
    ResetControl,
)
from minivmm.devices.bus import Bus, BusError
from minivmm.devices.debug_exit import DebugExit
from minivmm.devices.device import Device
from minivmm.devices.i8042 import COMMAND as I8042_COMMAND
from minivmm.devices.i8042 import I8042
from minivmm.devices.pci import INTERRUPT_PIN, DmaSpace
from minivmm.devices.postcode import PostCode
from minivmm.devices.rtc import Rtc
from minivmm.devices.serial import Serial
from minivmm.kvm import constants as c
from minivmm.kvm.system import CoalescedRing, Kvm, KvmError, Vcpu, Vm
from minivmm.mainloop import MainLoop
from minivmm.memory import GuestMemory

from .control import RunControl
from .errors import MachineError
from .irqchip import KernelIrqchip, SplitIrqchip
from .pci import PciBus
from .ram import DeviceSlots
from .vfio import VfioHost, check_vfio_pci, vfio_user_options

if TYPE_CHECKING:  # imported where they are made: a machine without them (a cpr-exec image) pays nothing
    from minivmm.devices import intel_iommu, vfio_function, vfio_pci, vfio_user_pci


@dataclass(frozen=True)
class Board:
    """A device every machine has, at a fixed port range."""

    name: str
    port: int
    size: int
    make: Callable[[DeviceManager, MachineConfig], Device]
    offset: int = 0  # the device offset of ``port``


BOARD = (
    Board("post-code", layout.PORT_POST, 1, lambda dm, cfg: PostCode(trace="postcode" in cfg.trace)),
    Board("fw_cfg", layout.PORT_FW_CFG, layout.FW_CFG_PORTS_SIZE, lambda dm, cfg: dm.make_fw_cfg(cfg)),
    Board("acpi-pm1-evt", layout.PORT_ACPI_PM1A_EVT, 4, lambda dm, cfg: dm.pm1_event),
    Board("acpi-pm-timer", layout.PORT_ACPI_PM_TMR, 4, lambda dm, cfg: PmTimer(time.monotonic_ns)),
    Board(
        "reset-control",
        layout.PORT_RESET_CONTROL,
        1,
        lambda dm, cfg: ResetControl(lambda: dm.control.request_reset("guest-reset")),
    ),
    Board("i8042", layout.PORT_I8042_DATA, 1, lambda dm, cfg: dm.i8042),
    Board("i8042", layout.PORT_I8042_CMD, 1, lambda dm, cfg: dm.i8042, offset=I8042_COMMAND),
    Board("rtc", layout.PORT_CMOS, 2, lambda dm, cfg: dm.rtc),
    Board(
        "acpi-pm",
        layout.PORT_ACPI_PM1A_CNT,
        2,
        lambda dm, cfg: AcpiPm(lambda: dm.control.request_shutdown("guest-shutdown"), dm.control.request_suspend),
    ),
)


@dataclass(frozen=True)
class Model:
    """A device model ``-device`` adds: QEMU's name, its properties with their defaults, how to make it.

    ``make`` returns where the device answers: (bus, base, size, device) for each range, or raises
    ModelError naming what in the machine or the properties it cannot work with. ``switches``:
    the properties that take QEMU's on/off/auto (as strings) rather than numbers.
    """

    name: str
    bus: str
    description: str
    props: dict[str, int | str]
    make: Callable[[DeviceManager, dict[str, int | str]], list[tuple[str, int, int, Device]]]
    switches: tuple[str, ...] = ()


class ModelError(ValueError):
    """A device model refuses this machine or these properties (the message says why)."""


SWITCH_VALUES = ("on", "off", "auto")


def _pc_testdev(dm: DeviceManager, props: dict[str, int]) -> list[tuple[str, int, int, Device]]:
    ports = pc_testdev.TestDevPorts(dm.memory.flush_page)
    return [
        ("pio", pc_testdev.PORT_BASE, 12, ports),
        ("pio", pc_testdev.PORT_IRQ, pc_testdev.IRQ_LINES, pc_testdev.TestDevIrq(dm.irq_line)),
        ("mmio", pc_testdev.IOMEM_BASE, pc_testdev.IOMEM_SIZE, pc_testdev.TestDevMemory(ports)),
    ]


def _edu(dm: DeviceManager) -> edu.Edu:
    """edu, its DMA and MSIs going through the IOMMU when there is one (bus 0: requester id = devfn)."""
    function = edu.Edu(dm.memory)
    function.registers.memory = DmaSpace(dm.memory, lambda: function.slot << 3, lambda: dm.iommu)
    function.send_msi = lambda address, data: dm.send_msi(address, data, function.slot << 3)
    return function


def _intel_iommu(dm: DeviceManager, props: dict[str, int | str]) -> list[tuple[str, int, int, Device]]:
    """q35's VT-d unit; interrupt remapping needs minivmm's IOAPIC (split irqchip), as QEMU's does."""
    if dm.machine.ecam is None:  # the pc machine has no place for it, as QEMU says it
        raise ModelError("Parameter 'driver' expects a dynamic sysbus device type for the machine")
    if dm.iommu is not None:
        raise ModelError("minivmm does not support multiple vIOMMUs for x86 yet.")
    intremap = props["intremap"] == "on" or (props["intremap"] == "auto" and dm.irqchip.split)
    if intremap and not dm.irqchip.split:
        raise ModelError("Interrupt Remapping cannot work with kernel-irqchip=on, please use 'split|off'.")
    if props["eim"] == "on":
        if not intremap:
            raise ModelError("eim=on cannot be selected without intremap=on")
        raise ModelError("eim=on is not supported: minivmm has no x2APIC interrupt remapping (Extended Interrupt Mode)")
    from minivmm.devices import intel_iommu

    ioapic = dm.irqchip.ioapic if dm.irqchip.split else None
    iommu = intel_iommu.IntelIommu(
        dm.memory, dm.signal_msi, intremap, ioapic.refresh_routes if ioapic is not None else lambda: None
    )
    if intremap:
        ioapic.remap = lambda address, data: iommu.remap_msi(address, data, None)
    dm.iommu = iommu
    return [("mmio", layout.IOMMU_ADDR, layout.IOMMU_SIZE, iommu)]


def _pci(make):
    """A PCI model: the function goes on the machine's PCI bus, which maps its BARs."""

    def add(dm: DeviceManager, props: dict[str, int]) -> list[tuple[str, int, int, Device]]:
        dm.pci.add(make(dm))
        return []

    return add


MODELS = {
    m.name: m
    for m in (
        Model(
            "isa-debug-exit",
            "ISA",
            "a write of v ends minivmm with exit status (v << 1) | 1",
            {"iobase": layout.PORT_DEBUG_EXIT_DEFAULT, "iosize": 2},
            lambda dm, p: [
                (
                    "pio",
                    p["iobase"],
                    p["iosize"],
                    DebugExit(lambda status: dm.control.request_shutdown("guest-shutdown", status)),
                )
            ],
        ),
        Model(
            "edu",
            "PCI",
            "QEMU's educational PCI device: identification, liveness, factorial, interrupts, DMA",
            {},
            _pci(_edu),
        ),
        Model(
            "intel-iommu",
            "System",
            "Intel IOMMU (VT-d) DMA Remapping device",
            {"intremap": "auto", "eim": "auto"},
            _intel_iommu,
            switches=("intremap", "eim"),
        ),
        Model(
            "pci-testdev",
            "PCI",
            "PCI Test Device",
            {},
            _pci(lambda dm: pci_testdev.PciTestDev()),
        ),
        Model(
            "pc-testdev",
            "ISA",
            "kvm-unit-tests' test device: scratch ports, interrupt lines, flush page, scratch MMIO",
            {},
            _pc_testdev,
        ),
        Model(
            "pvpanic",
            "ISA",
            "pvpanic device: the guest reports a panic; -action panic= decides",
            {"ioport": pvpanic.DEFAULT_IOPORT},
            lambda dm, p: [
                (
                    "pio",
                    p["ioport"],
                    1,
                    pvpanic.PvPanic(dm.control.request_panic, lambda: dm.control.emit_threadsafe("GUEST_CRASHLOADED")),
                )
            ],
        ),
    )
}


def device_help() -> str:
    """``-device help``, in QEMU's format (test runners grep it for device names)."""
    lines = ["Misc devices:"]
    lines += [f'name "{m.name}", bus {m.bus}, desc "{m.description}"' for m in MODELS.values()]
    lines.append('name "vfio-pci", bus PCI, desc "VFIO-based PCI device assignment"')
    lines.append('name "vfio-user-pci", bus PCI, desc "a PCI device served by another process over vfio-user"')
    return "\n".join(lines) + "\n"


MAX_GSI_ROUTES = 4096  # KVM_MAX_IRQ_ROUTES, the kernel's own (not in its uapi headers): what KVM_SET_GSI_ROUTING takes


class DeviceManager:
    def __init__(
        self,
        kvm: Kvm,
        vm: Vm,
        memory: GuestMemory,
        loop: MainLoop,
        fds: FdTable,
        control: RunControl,
        irqchip: KernelIrqchip | SplitIrqchip,
    ) -> None:
        self.kvm, self.vm, self.memory, self.loop, self.fds, self.control = kvm, vm, memory, loop, fds, control
        self.irqchip = irqchip
        self.irq_line = irqchip.set_irq  # (GSI, level)
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.chardevs: list[Chardev] = []
        self.irqfds: dict[int, int] = {}  # GSI -> eventfd for KVM_IRQFD: the ISA lines'
        # and the PCI devices' (their devices own the eventfds): eventfd -> (GSI, INTx resample eventfd or None)
        self.device_irqfds: dict[int, tuple[int, int | None]] = {}
        self.next_msi_gsi = ioapic.PINS  # GSIs past the IOAPIC's pins carry device MSIs
        self.irqfds_bound = False  # an incoming CPR binds them once the source has let go
        self.ram_ranges: list[tuple[int, int]] = []
        self.vfio_user: list[vfio_user_pci.VfioUserPci] = []
        self.vfio_pci: list[vfio_pci.VfioPci] = []
        self.vfio_host: VfioHost | None = None  # the kernel side of the vfio-pci devices, with the first
        self.device_slots = DeviceSlots(vm, len(memory.mappings))  # after RAM's (ram.add_memslots)
        self.iommu: intel_iommu.IntelIommu | None = None
        self.coalesced: CoalescedRing | None = None
        self._flush_lock = threading.RLock()
        self._flushing = False

    def build(self, cfg: MachineConfig, ram_ranges: list[tuple[int, int]]) -> None:
        """Serial ports, the board, then -device, in that order (the order their state is saved in)."""
        self.ram_ranges = ram_ranges
        self.machine = cfg.machine
        self.rtc = Rtc(ram_ranges[0][1], sum(size for _, size in ram_ranges[1:]))  # below and above 4 GiB
        self.pm1_event = Pm1Event()
        self.i8042 = I8042(lambda: self.control.request_reset("guest-reset"))
        self.control.wake_delay = self.wake_delay
        self.irqchip.add_devices(self.pio, self.mmio, self.loop)
        serials = cfg.serials or [ChardevConfig("serial0", "stdio", option="-serial stdio")]
        if len(serials) > len(layout.COM_PORTS):
            raise MachineError(serials[len(layout.COM_PORTS)].option, f"at most {len(layout.COM_PORTS)} serial ports")
        for index, cc in enumerate(serials):
            if cc.backend != "none":
                self._add_serial(index, cc)
        for board in BOARD:
            self.pio.register(board.port, board.size, board.make(self, cfg), board.offset)
        self.pci = PciBus(self.pio, self.mmio, self.irq_line, cfg.machine)
        self.iommufds = cfg.iommufds
        for dev in cfg.devices:
            self._add_model(dev)
        if self.iommu is not None and self.vfio_functions:
            raise MachineError(  # its DMA and MSIs would bypass the unit's translation
                next(d.option for d in cfg.devices if d.driver in ("vfio-user-pci", "vfio-pci")),
                "minivmm does not put vfio-user or vfio-pci devices behind intel-iommu",
            )

    def coalesce(self, vcpu: Vcpu) -> None:
        """Writes to the CMOS index port wait in KVM's coalesced ring instead of exiting, as QEMU
        has them: such a write does nothing until the data port is accessed, and the RTC replays
        the ring first (``flush_coalesced``). Without KVM_CAP_COALESCED_PIO they exit as before."""
        page = self.kvm.check_extension(c.KVM_CAP_COALESCED_MMIO)
        if not page or not self.vm.check_extension(c.KVM_CAP_COALESCED_PIO):
            return
        self.coalesced = CoalescedRing(vcpu, page)
        self.vm.register_coalesced(layout.PORT_CMOS, 1, pio=True)
        self.rtc.flush_coalesced = self.flush_coalesced

    def flush_coalesced(self, writes: Iterable[tuple[bool, int, bytes]] | None = None) -> None:
        """Replay the queued writes on their bus, in order (any thread; QEMU's kvm_flush_coalesced_mmio_buffer);
        ``writes``: (pio, address, data) another VM's guest made (a cpr-exec keeper's) instead of the ring."""
        with self._flush_lock:
            if self._flushing:  # a replayed write reached a device that flushes first: this flush
                return
            self._flushing = True
            try:
                for pio, addr, data in self.coalesced.pop() if writes is None else writes:
                    (self.pio if pio else self.mmio).write(addr, len(data), int.from_bytes(data, "little"))
            finally:
                self._flushing = False

    @property
    def run_size(self) -> int:
        """The bytes of a vCPU's kvm_run mapping an exit uses (its PIO data page with it), short of
        the coalesced ring's page, which all vCPUs share."""
        page = self.kvm.check_extension(c.KVM_CAP_COALESCED_MMIO) or self.kvm.vcpu_mmap_size() // mmap.PAGESIZE
        return min(page * mmap.PAGESIZE, self.kvm.vcpu_mmap_size())

    def make_fw_cfg(self, cfg: MachineConfig) -> fw_cfg.FwCfg:
        """QEMU's fw_cfg with the PC's items: CPU counts, RAM size, the e820 map (DMA into guest RAM)."""
        ram = sum(size for _, size in self.ram_ranges)
        e820 = memory_map(self.ram_ranges, cfg.machine.reserved())
        return fw_cfg.pc(self.memory, ncpus=cfg.smp, ram_size=ram, e820=e820)

    def acpi_config(self, ncpus: int):
        """What the ACPI tables describe (an acpi.AcpiConfig): this machine's CPUs and devices."""
        from minivmm.arch.x86 import acpi

        ports = {r.base: r.device for r in self.pio.ranges}
        serial = tuple(i for i, (port, _irq) in enumerate(layout.COM_PORTS) if port in ports)
        pvpanic_port = next((r.base for r in self.pio.ranges if isinstance(r.device, pvpanic.PvPanic)), None)
        return acpi.AcpiConfig(
            ncpus=ncpus,
            serial=serial,
            pvpanic_port=pvpanic_port,
            fw_cfg_port=layout.PORT_FW_CFG,
            pm_timer=True,
            pci=True,
            s3=True,
            reset=(layout.PORT_RESET_CONTROL, RESET_CONTROL_SYS_RST | RESET_CONTROL_RST_CPU),
            mcfg=self.machine.ecam,
            prt=self.pci.routing_table(),
            dmar=None if self.iommu is None else (layout.IOMMU_ADDR, self.iommu.intremap),
        )

    def wake_delay(self) -> float | None:
        """Seconds until the RTC alarm wakes a suspended machine, if the guest enabled RTC wake."""
        if not self.pm1_event.enable & RTC_EN:
            return None
        return self.rtc.seconds_to_alarm()

    def devices(self) -> list[Device]:
        return self.pio.devices() + self.mmio.devices()

    @property
    def vfio_functions(self) -> list:
        """The functions whose device is outside minivmm (vfio_function.VfioFunction), in -device order."""
        return [*self.vfio_user, *self.vfio_pci]

    def persistent(self) -> list[Device]:
        """The devices with state, in a fixed order (the assigned functions last: they are not on a bus
        while their BARs are off)."""
        return [d for d in self.devices() if d.vmstate is not None] + self.vfio_functions

    def reset_all(self) -> None:
        for device in self.devices():
            device.reset()

    # --- serial ports and their back-ends -------------------------------------------------------------
    def _add_serial(self, index: int, cc: ChardevConfig) -> None:
        chardev = self._open_chardev(cc)
        self.chardevs.append(chardev)
        port, irq = layout.COM_PORTS[index]
        uart = Serial(chardev.write, self._isa_irq(irq), name=f"serial{index}", room_available=chardev.frontend_ready)
        chardev.attach(self.loop, uart)
        self.pio.register(port, 8, uart)

    def _open_chardev(self, cc: ChardevConfig) -> Chardev:
        """A back-end; an inherited fd is kept only if this command line describes the same file or socket."""
        try:
            if cc.backend == "stdio":
                return StdioChardev(cc.id)
            if cc.backend == "file":
                return FileChardev(cc.id, cc.path, self.fds, cc.append)
            if cc.backend == "socket":
                if cc.fd is not None and self.fds.missing("chardev-socket", cc.id):
                    raise MachineError(cc.option, f"cannot find saved value for fd {cc.id}")
                return SocketChardev(cc.id, cc.path, cc.wait, self.fds, cc.fd)
            return Chardev(cc.id)
        except ChardevError as e:
            raise MachineError(cc.option, str(e)) from None

    # --- interrupts -----------------------------------------------------------------------------------
    def signal_msi(self, address: int, data: int) -> None:
        """One MSI to the local APICs; one that no APIC takes is lost, as on a real bus."""
        try:
            self.vm.signal_msi(address, data)
        except KvmError:
            pass

    def send_msi(self, address: int, data: int, requester_id: int) -> None:
        """A PCI function's MSI, remapped by the IOMMU when it has interrupt remapping on."""
        if self.iommu is not None:
            message = self.iommu.remap_msi(address, data, requester_id)
            if message is None:
                return  # blocked: the IOMMU recorded the fault
            address, data = message
        self.signal_msi(address, data)

    def _isa_irq(self, gsi: int) -> Callable[[int], None]:
        """An edge-triggered ISA interrupt line, as Firecracker wires its devices: through
        an irqfd (an eventfd KVM listens on) when KVM has them and emulates the PIC and
        IOAPIC itself; else the level goes to KVM_IRQ_LINE or to minivmm's controllers.

        The eventfd is a device fd like VFIO's interrupt eventfds: it is kept in the CPR
        table ("irqfd", "gsiN"), so an update binds the very same eventfd to the new VM.
        A rising edge is all an edge-triggered PIC or IOAPIC input sees of a level, so a
        pulse per rise of the device's level is the same interrupt.
        """
        if self.irqchip.split or not self.kvm.check_extension(c.KVM_CAP_IRQFD):
            return lambda level: self.irq_line(gsi, level)  # a userspace PIC/IOAPIC sees the level
        fd = self.irqfds.get(gsi)
        if fd is None:
            fd, _ = self.fds.open("irqfd", f"gsi{gsi}", lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self.irqfds[gsi] = fd

        def raise_edge(level: int) -> None:
            if level:
                os.eventfd_write(fd, 1)  # while unbound the count waits; binding injects it

        return raise_edge

    def bind_irqfds(self, bind: bool = True) -> None:
        """Bind the irqfds to this VM, or let them go (a CPR source, stopped, before the new VM binds them)."""
        if bind == self.irqfds_bound:
            return
        for gsi, fd in self.irqfds.items():
            self.vm.irqfd(fd, gsi, assign=bind)
        for fd, (gsi, resample) in self.device_irqfds.items():
            self.vm.irqfd(fd, gsi, assign=bind, resample=resample)
        self.irqfds_bound = bind

    def add_irqfd(self, gsi: int, fd: int, resample: int | None = None) -> None:
        """A device's interrupt eventfd on its GSI (an MSI vector's; or INTx's, level-triggered, with
        the eventfd KVM signals at its EOI), bound now if this VM's irqfds are (else with them)."""
        self.device_irqfds[fd] = (gsi, resample)
        if self.irqfds_bound:
            self.vm.irqfd(fd, gsi, resample=resample)

    def remove_irqfd(self, fd: int) -> None:
        bound = self.device_irqfds.pop(fd, None)
        if bound is not None and self.irqfds_bound:
            self.vm.irqfd(fd, bound[0], assign=False)

    def intx_by_irqfd(self) -> bool:
        """Whether a device outside minivmm can have INTx: KVM's own IOAPIC and PIC, and irqfds that
        lower the line at the guest's EOI (minivmm's split-irqchip IOAPIC cannot tell it the EOI)."""
        return not self.irqchip.split and bool(self.kvm.check_extension(c.KVM_CAP_IRQFD_RESAMPLE))

    # --- -device ----------------------------------------------------------------------------------------
    def _add_model(self, dev: DeviceConfig) -> None:
        if dev.driver == "vfio-pci":
            self._add_vfio_pci(dev)
            return
        if dev.driver == "vfio-user-pci":
            self._add_vfio_user(dev)
            return
        model = MODELS.get(dev.driver)
        if model is None:
            raise MachineError(dev.option, f"'{dev.driver}' is not a valid device model name")
        props = dict(model.props)
        for key, value in dev.props.items():
            if key not in props:
                raise MachineError(dev.option, f"Property '{dev.driver}.{key}' not found")
            if key in model.switches:
                if value not in SWITCH_VALUES:
                    raise MachineError(dev.option, f"Parameter '{key}' does not accept value '{value}'")
                props[key] = value
                continue
            try:
                props[key] = int(value, 0)
            except ValueError:
                raise MachineError(dev.option, f"Property '{dev.driver}.{key}' takes a number, not '{value}'") from None
        try:
            ranges = model.make(self, props)
        except ModelError as e:
            raise MachineError(dev.option, str(e)) from None
        for bus, base, size, device in ranges:
            limit = 1 << 16 if bus == "pio" else 1 << 64
            if not (base >= 0 and size >= 1 and base + size <= limit):
                raise MachineError(dev.option, f"{bus} range {base:#x}+{size:#x} is outside 0-{limit - 1:#x}")
            try:
                (self.pio if bus == "pio" else self.mmio).register(base, size, device)
            except BusError as e:
                raise MachineError(dev.option, str(e)) from None

    def _add_vfio_user(self, dev: DeviceConfig) -> None:
        from minivmm.devices import vfio_user_pci

        dev_id, path = vfio_user_options(dev, len(self.vfio_user))
        try:
            function = vfio_user_pci.VfioUserPci(dev_id, path, self._wiring())
        except vfio_user_pci.VfioUserError as e:
            raise MachineError(dev.option, str(e)) from None
        self.vfio_user.append(function)
        self._plug(function, dev)

    def _wiring(self) -> vfio_function.Wiring:
        """A new function's plumbing: the CPR table, guest RAM, GSIs of its own for its MSI or MSI-X
        vectors, its BARs' memory slots."""
        from minivmm.devices import vfio_function

        return vfio_function.Wiring(
            self.fds,
            self.memory.mappings,
            self._msi_gsis,
            self.irqchip.set_device_msi,
            self.add_irqfd,
            self.remove_irqfd,
            self.device_slots.place,
            self.intx_by_irqfd(),
        )

    def _msi_gsis(self, count: int) -> list[int]:
        """``count`` GSIs past the IOAPIC's pins, in the order devices are built (the same in every image)."""
        from minivmm.devices.vfio_function import FunctionError

        first = self.next_msi_gsi
        if first + count > MAX_GSI_ROUTES:
            raise FunctionError(f"{count} MSI-X vectors: more than KVM's {MAX_GSI_ROUTES} GSI routes hold")
        self.next_msi_gsi += count
        return list(range(first, first + count))

    def _add_vfio_pci(self, dev: DeviceConfig) -> None:
        """A host device: its kernel side (container and group, or iommufd and cdev; its DMA; the KVM
        VFIO device), then the function on the bus (devices/vfio_pci.py)."""
        opts = check_vfio_pci(dev, self.iommufds)
        from minivmm.devices import vfio_function, vfio_pci

        if self.vfio_host is None:
            self.vfio_host = VfioHost(self.vm, self.memory, self.fds)
        device = self.vfio_host.attach(opts, dev.option)
        try:
            function = vfio_pci.VfioPci(opts.dev_id, device, self._wiring())
        except (vfio_function.FunctionError, vfio_function.TransportError) as e:
            raise MachineError(dev.option, f"vfio {opts.name}: {e}") from None
        function.iommufd_id = opts.iommufd.id if opts.iommufd is not None else None
        if opts.iommufd is not None:
            function.ioas_id = self.vfio_host.iommufds[opts.iommufd.id].ioas_id
        self.vfio_pci.append(function)
        self.vfio_host.functions.append(function)
        self._plug(function, dev)

    def _plug(self, function: vfio_function.VfioFunction, dev: DeviceConfig) -> None:
        """A function of a device outside minivmm on the bus; a new one (not a CPR's, which runs on as
        the previous image left it) is told the command register the bus gave it as firmware."""
        try:
            self.pci.add(function)
        except BusError as e:
            raise MachineError(dev.option, str(e)) from None
        if not function.kept:
            function.push_command()
        function.plugged(self.pci.irq_of(function) if function.config[INTERRUPT_PIN] else None)

    def cpr_release(self) -> None:
        """A CPR source, stopped: what the devices' kernel side must let go before another process takes
        it (a container's DMA addresses, QEMU's pre_save)."""
        if self.vfio_host is not None:
            self.vfio_host.release()

    def cpr_resume(self) -> None:
        """After a load (the new image), or a CPR that failed (the source): the devices' DMA mappings are
        this process's again (QEMU's post_load). Raises MachineError when the kernel refuses."""
        if self.vfio_host is None:
            return
        try:
            self.vfio_host.resume()
        except Exception as e:  # noqa: BLE001 - kernel.VfioError or OSError, one line either way
            raise MachineError("-device vfio-pci", str(e)) from None

    @contextmanager
    def lend_connections(self) -> Iterator[None]:
        """cpr-transfer's source, until the target has built its VM: the device servers' connections
        are the target's to ask about the devices (a vCPU touching one here waits)."""
        for function in self.vfio_user:
            function.link.lend()
        try:
            yield
        finally:
            for function in self.vfio_user:
                function.link.give_back()

    def hand_over_connections(self) -> None:
        """cpr-transfer's source, the guest handed over: the connections are the target's for good."""
        for function in self.vfio_user:
            function.link.dead = True

    def migration_blockers(self) -> list[str]:
        """Why this machine's state cannot go into a stream (QEMU's wording): the devices whose state
        lives in another process. CPR keeps them, as their connection goes with the fds."""
        return [f"{f.dev_id}: VFIO device doesn't support migration" for f in self.vfio_functions]

    def cpr_blockers(self) -> list[str]:
        """Why a CPR would lose a device: a connection already broken cannot be handed on; a kernel that
        cannot move DMA mappings to a new process (QEMU's wording)."""
        found = [f"{f.dev_id}: its vfio-user server is gone" for f in self.vfio_user if f.link.dead]
        if self.vfio_host is not None:
            found += self.vfio_host.cpr_blockers()
        return found

    def close(self) -> None:
        """This image's hold on the devices; nothing here resets or unmaps them (a CPR's new image has them)."""
        for function in self.vfio_functions:
            function.close()
        self.vfio_user.clear()
        self.vfio_pci.clear()
        if self.vfio_host is not None:
            self.vfio_host.close()
        if self.coalesced is not None:
            self.coalesced.close()
            self.coalesced = None
        for chardev in self.chardevs:
            chardev.close()
        for gsi, fd in self.irqfds.items():
            self.fds.delete("irqfd", f"gsi{gsi}")
            os.close(fd)
        self.irqfds.clear()

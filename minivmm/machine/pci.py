"""The machine's PCI bus: the host bridge, the devices ``-device`` puts on
it, and what firmware would do before a direct kernel boot: a slot for
each, its BARs given addresses and decoding enabled, its interrupt line set.

Memory BARs come from PCI_MMIO_BASE up (in the 32-bit hole, below the
IOAPIC; a 64-bit BAR too, as SeaBIOS places those that fit there), I/O BARs
from PCI_IO_BASE up, each aligned to its size. A BAR the guest moves
follows on the machine's buses (``remap``), a 64-bit one anywhere.

The machine type decides the chipset: ``pc`` has the i440FX host bridge and
the PIIX's INTx routing to IRQs 10 and 11; ``q35`` the MCH host bridge with
its ECAM window (moved as the guest writes PCIEXBAR), the ICH9 LPC bridge at
00:1f.0, and INTx on GSIs 16-23 (q35.pirq_gsi).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from minivmm.arch.x86 import layout
from minivmm.arch.x86.machine_types import PC, MachineType
from minivmm.devices import q35
from minivmm.devices.bus import Bus, BusError
from minivmm.devices.pci import (
    CMD_IO,
    CMD_MASTER,
    CMD_MEMORY,
    COMMAND,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    HostBridge,
    PciFunction,
    PciHost,
    PciHostPort,
)
from minivmm.devices.pcie import Ecam

# The PIIX routes INTA-INTD of slot s to PIRQ[(s + pin - 1) % 4]; firmware gives PIRQA-D these IRQs.
PIRQ_IRQS = (10, 10, 11, 11)


def piix_irq(slot: int, pin: int) -> int:
    """The IRQ INTx pin ``pin`` (1-4) of ``slot`` reaches on the pc machine."""
    return PIRQ_IRQS[(slot + pin - 1) % 4]


class PciBus:
    def __init__(self, pio: Bus, mmio: Bus, irq_line: Callable[[int, int], None], machine: MachineType = PC) -> None:
        self.pio, self.mmio, self.irq_line = pio, mmio, irq_line
        self.host = PciHost()
        self.next_mmio, self.next_io = layout.PCI_MMIO_BASE, layout.PCI_IO_BASE
        self.mapped: dict[int, tuple[str, int]] = {}  # id(bar device) -> (bus kind, address) while mapped
        # The latch is one 32-bit port at 0xcf8 (0xcf9 is the reset control), the data four at 0xcfc.
        pio.register(layout.PORT_PCI_CONFIG, 1, PciHostPort(self.host, 0))
        pio.register(layout.PORT_PCI_CONFIG + 4, 4, PciHostPort(self.host, 4))
        self.ecam: Ecam | None = None
        self.ecam_at: int | None = None  # the window's base while mapped
        if machine.ecam is None:  # pc: the i440FX and the PIIX
            self.route = piix_irq
            self.routes_in_acpi = False  # the interrupt line's ISA IRQ is what an OS uses without a _PRT
            self.reserved: frozenset[int] = frozenset()
            self.add(HostBridge())
        else:  # q35: the MCH with its ECAM window, and the ICH9
            self.route = q35.pirq_gsi
            self.routes_in_acpi = True  # GSIs 16-23, which an OS in APIC mode learns only from ACPI
            self.reserved = frozenset({q35.LPC_SLOT})  # -device never takes the LPC's slot
            self.ecam = Ecam(self.host)
            mch = q35.MchHostBridge()
            mch.map_ecam = self.map_ecam
            self.add(mch)
            self.map_ecam(*mch.ecam_window())
            self.add(q35.Ich9Lpc(), q35.LPC_SLOT)

    @property
    def functions(self) -> list[PciFunction]:
        return [self.host.functions[slot] for slot in sorted(self.host.functions)]

    def add(self, function: PciFunction, slot: int | None = None) -> None:
        """Put ``function`` in ``slot``, or the first free one, as firmware found it."""
        if slot is None:
            free = [s for s in range(32) if s not in self.host.functions and s not in self.reserved]
            if not free:
                raise BusError(f"PCI bus 0 is full ({32 - len(self.reserved)} slots)")
            slot = free[0]
        function.slot = slot
        self.host.functions[slot] = function
        for index, bar in enumerate(function.bars):
            if bar is None:
                continue
            if bar.kind == "mmio":
                self.next_mmio = -(-self.next_mmio // bar.size) * bar.size
                function.set_bar_address(index, self.next_mmio)
                self.next_mmio += bar.size
            else:
                self.next_io = -(-self.next_io // bar.size) * bar.size
                function.set_bar_address(index, self.next_io)
                self.next_io += bar.size
        if function.rom is not None:
            self.next_mmio = -(-self.next_mmio // function.rom.size) * function.rom.size
            function.set_rom_address(self.next_mmio)
            self.next_mmio += function.rom.size
        if self.next_mmio > layout.PCI_MMIO_END or self.next_io > layout.PCI_IO_END:
            raise BusError("the PCI BAR windows are full")
        if function.config[INTERRUPT_PIN]:
            irq = self.irq_of(function)
            function.config[INTERRUPT_LINE] = irq
            function.set_irq = lambda level: self.irq_line(irq, level)  # INTx is level-triggered
        command = CMD_IO | CMD_MEMORY | CMD_MASTER
        struct.pack_into("<H", function.config, COMMAND, command)
        function.initial = bytes(function.config)  # what a reset comes back to, as firmware left it
        function.remap = self.remap
        self.remap(function)

    def irq_of(self, function: PciFunction) -> int:
        """The GSI of the function's INTx pin, as the chipset routes it."""
        return self.route(function.slot, function.config[INTERRUPT_PIN])

    def routing_table(self) -> tuple[tuple[int, int, int], ...]:
        """The DSDT's _PRT, (slot, pin 0-3, GSI) for every slot and pin, where the chipset needs one."""
        if not self.routes_in_acpi:
            return ()
        return tuple((slot, pin - 1, self.route(slot, pin)) for slot in range(32) for pin in range(1, 5))

    def map_ecam(self, enabled: bool, base: int, size: int) -> None:
        """Put the ECAM window where the MCH's PCIEXBAR says, or nowhere when it is disabled."""
        if self.ecam_at is not None:
            self.mmio.unregister(self.ecam)
            self.ecam_at = None
        if enabled:
            try:
                self.mmio.register(base, size, self.ecam)
                self.ecam_at = base
            except BusError:
                pass  # over another device: the guest's choice leaves the window unreachable, as a BAR's

    def remap(self, function: PciFunction) -> None:
        """Put each BAR's device where its BAR says, if decoding is on (else nowhere); the expansion
        ROM too, while it is enabled."""
        for bar in [*function.bars, function.rom]:
            if bar is None:
                continue
            bus = self.mmio if bar.kind == "mmio" else self.pio
            was = self.mapped.pop(id(bar.device), None)
            if was is not None:
                bus.unregister(bar.device)
            limit = 1 << 16 if bar.kind == "pio" else 1 << 64 if bar.wide else 1 << 32
            on = function.rom_enabled() if bar is function.rom else function.decoding(bar.kind)
            at = None
            if on and bar.address and bar.address + bar.size <= limit:
                try:
                    bus.register(bar.address, bar.size, bar.device)
                    self.mapped[id(bar.device)] = (bar.kind, bar.address)
                    at = bar.address
                except BusError:
                    pass  # over another device: the guest's choice leaves the BAR unreachable, as on hardware
            if bar.place is not None and (was or (None, None))[1] != at:
                bar.place(at)  # the BAR's pages follow as a memory slot (or leave with it)


CLASS_NAMES = {0x0600: "Host bridge", 0x0601: "ISA bridge", 0x00FF: "Class 00ff"}


def describe(function: PciFunction) -> dict:
    """One function as QMP's query-pci gives it (PciDeviceInfo)."""
    vendor, device = function.ids
    sub_vendor, sub_id = struct.unpack_from("<HH", function.config, 0x2C)
    out = {
        "bus": 0,
        "slot": function.slot,
        "function": 0,
        "class_info": {"class": function.class_code >> 8},
        "id": {"vendor": vendor, "device": device, "subsystem-vendor": sub_vendor, "subsystem": sub_id},
        "qdev_id": "",
        "regions": [],
    }
    desc = CLASS_NAMES.get(function.class_code >> 8)
    if desc is not None and not desc.startswith("Class"):
        out["class_info"]["desc"] = desc
    pin = function.config[INTERRUPT_PIN]
    if pin:
        out["irq_pin"] = pin
        out["irq"] = function.config[INTERRUPT_LINE]
    for index, bar in enumerate(function.bars):
        if bar is not None:
            region = {"bar": index, "type": "memory" if bar.kind == "mmio" else "io"}
            region.update(address=bar.address, size=bar.size)
            if bar.kind == "mmio":
                region.update(prefetch=bar.prefetch, mem_type_64=bar.wide)
            out["regions"].append(region)
    if function.rom is not None:  # QEMU lists the ROM as region 6
        rom = function.rom
        region = {"bar": 6, "type": "memory", "address": rom.address, "size": rom.size}
        out["regions"].append(region | {"prefetch": False, "mem_type_64": False})
    return out

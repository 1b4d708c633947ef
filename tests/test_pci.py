"""The PCI bus's configuration space rules, in-process (no guest needed: these are the
machine's own bookkeeping): BAR sizing and moving, decoding on and off, unclaimed slots."""

from __future__ import annotations

from minivmm.devices import pci, pci_testdev
from minivmm.devices.bus import UNCLAIMED, Bus
from minivmm.machine.pci import PciBus

ENABLE = 0x80000000


def _bus() -> tuple[PciBus, Bus, Bus, pci_testdev.PciTestDev]:
    pio, mmio = Bus("pio"), Bus("mmio")
    bus = PciBus(pio, mmio, lambda irq, level: None)
    dev = pci_testdev.PciTestDev()
    bus.add(dev)
    return bus, pio, mmio, dev


def _config(pio: Bus, slot: int, reg: int, value: int | None = None) -> int:
    pio.write(0xCF8, 4, ENABLE | slot << 11 | reg)
    if value is not None:
        pio.write(0xCFC, 4, value)
    return pio.read(0xCFC, 4)


def test_a_bar_is_sized_moved_and_unmapped_as_the_guest_writes_it():
    bus, pio, mmio, dev = _bus()
    bar0 = dev.bars[0]
    assert mmio.lookup(bar0.address)[0] is bar0.device  # firmware's placement, decoding on
    assert _config(pio, 1, 0x10, 0xFFFFFFFF) == 0xFFFFF000  # sizing: 4 KiB, 32-bit memory
    _config(pio, 1, 0x10, 0xE8000000)  # moved
    assert mmio.lookup(0xE8000000)[0] is bar0.device
    assert mmio.lookup(0xE0000000)[0] is UNCLAIMED
    assert _config(pio, 1, 0x14, 0xFFFFFFFF) == 0xFFFFFF01  # the I/O BAR: 256 ports
    _config(pio, 1, 0x14, 0xD000)
    _config(pio, 1, 0x04, 0)  # decoding off: neither BAR answers
    assert mmio.lookup(0xE8000000)[0] is UNCLAIMED and pio.lookup(0xD000)[0] is UNCLAIMED
    _config(pio, 1, 0x04, pci.CMD_MEMORY | pci.CMD_IO)
    assert mmio.lookup(0xE8000000)[0] is bar0.device and pio.lookup(0xD000)[0] is dev.bars[1].device


def test_empty_slots_and_other_buses_read_all_ones_and_the_latch_keeps_0xcf9_free():
    bus, pio, mmio, dev = _bus()
    assert _config(pio, 5, 0) == 0xFFFFFFFF
    pio.write(0xCF8, 4, ENABLE | 1 << 16)  # bus 1
    assert pio.read(0xCFC, 4) == 0xFFFFFFFF
    assert pio.lookup(0xCF9)[0] is UNCLAIMED  # the PIIX reset control's port, not the latch's
    assert _config(pio, 0, 0) == 0x12378086  # the host bridge


def test_reset_brings_back_what_firmware_left():
    bus, pio, mmio, dev = _bus()
    _config(pio, 1, 0x10, 0xE8000000)
    bus.host.reset()
    assert dev.bars[0].address == 0xE0000000 and mmio.lookup(0xE0000000)[0] is dev.bars[0].device

"""The PCI bus's configuration space rules, in-process (no guest needed: these are the
machine's own bookkeeping): BAR sizing and moving, decoding on and off, unclaimed slots;
on q35 the MCH and LPC, ECAM and the MCH's PCIEXBAR, INTx routing to GSIs 16-23."""

from __future__ import annotations

import pytest

from minivmm.arch.x86 import layout
from minivmm.arch.x86.machine_types import Q35
from minivmm.devices import pci, pci_testdev, q35
from minivmm.devices.bus import UNCLAIMED, Bus, BusError
from minivmm.machine.pci import PciBus, describe

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


def test_a_64_bit_bar_is_sized_in_both_halves_and_moves_above_4_gib():
    """A 64-bit memory BAR (type bits 10) takes the next register as its upper half: firmware
    places it below 4 GiB, sizing answers in both halves, and the guest may move it anywhere."""
    pio, mmio = Bus("pio"), Bus("mmio")
    bus = PciBus(pio, mmio, lambda irq, level: None)
    fn, window = pci.PciFunction(0x1234, 0x5678, 0xFF00), pci_testdev.TestRegion("mmio")
    fn.add_bar(2, pci.Bar("mmio", 0x4000, window, wide=True, prefetch=True))
    bus.add(fn)
    low = fn.bars[2].address
    assert layout.PCI_MMIO_BASE <= low < 1 << 32 and mmio.lookup(low)[0] is window
    assert _config(pio, 1, 0x18) == low | 0xC and _config(pio, 1, 0x1C) == 0  # 64-bit, prefetchable
    assert _config(pio, 1, 0x18, 0xFFFFFFFF) == 0xFFFFC00C and _config(pio, 1, 0x1C, 0xFFFFFFFF) == 0xFFFFFFFF
    _config(pio, 1, 0x18, 0x40000000)
    _config(pio, 1, 0x1C, 0x1)  # 0x1_4000_0000: above 4 GiB
    assert fn.bars[2].address == 0x140000000 and mmio.lookup(0x140000000)[0] is window
    assert mmio.lookup(low)[0] is UNCLAIMED
    region = next(r for r in describe(fn)["regions"] if r["bar"] == 2)
    assert (region["address"], region["mem_type_64"], region["prefetch"]) == (0x140000000, True, True)
    with pytest.raises(ValueError, match="BAR5: a 64-bit BAR"):
        fn.add_bar(5, pci.Bar("mmio", 0x1000, window, wide=True))


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


# --- q35: the MCH, the LPC, ECAM -------------------------------------------------------------------------------

ECAM = layout.PCIE_ECAM_BASE


def _q35() -> tuple[PciBus, Bus, Bus, list]:
    pio, mmio = Bus("pio"), Bus("mmio")
    lines = []
    bus = PciBus(pio, mmio, lambda gsi, level: lines.append((gsi, level)), Q35)
    return bus, pio, mmio, lines


def _ecam(slot: int, reg: int, bus: int = 0) -> int:
    return ECAM + (bus << 20 | slot << 15 | reg)


def test_q35_has_the_mch_and_the_lpc_and_ecam_reaches_what_0xcf8_does():
    bus, pio, mmio, _ = _q35()
    bus.add(pci_testdev.PciTestDev())
    assert [(f.slot, f.ids) for f in bus.functions] == [(0, (0x8086, 0x29C0)), (1, (0x1B36, 5)), (31, (0x8086, 0x2918))]
    for slot in (0, 1, 31):
        for reg in range(0, 256, 4):
            assert mmio.read(_ecam(slot, reg), 4) == _config(pio, slot, reg), (slot, reg)
    assert mmio.read(_ecam(31, 0x08), 4) == 0x06010002  # ISA bridge, revision 2
    assert mmio.read(_ecam(31, 0x0C), 4) >> 16 & 0xFF == 0x80  # multifunction, as QEMU's
    assert mmio.read(_ecam(0, 0x60), 8) == ECAM | 1  # PCIEXBAR: enabled, 256 MiB
    assert mmio.read(_ecam(31, 0x40), 4) == 0x601  # PMBASE: the PM block at 0x600, as the FADT says


def test_ecam_past_256_bytes_other_buses_and_functions_read_all_ones_and_ignore_writes():
    bus, pio, mmio, _ = _q35()
    assert mmio.read(_ecam(0, 0x100), 4) == 0xFFFFFFFF  # a conventional function: QEMU's all ones
    mmio.write(_ecam(0, 0xFFC), 4, 0)
    assert mmio.read(_ecam(0, 0, bus=1), 4) == 0xFFFFFFFF  # only bus 0 exists
    assert mmio.read(_ecam(0, 0, bus=255), 2) == 0xFFFF
    assert mmio.read(ECAM + (31 << 15 | 2 << 12), 4) == 0xFFFFFFFF  # 00:1f.2: no SATA
    assert mmio.read(_ecam(5, 0), 1) == 0xFF
    assert mmio.lookup(ECAM + layout.PCIE_ECAM_SIZE)[0] is UNCLAIMED


def test_a_bar_is_sized_and_moved_through_ecam():
    bus, pio, mmio, _ = _q35()
    dev = pci_testdev.PciTestDev()
    bus.add(dev)
    assert mmio.read(_ecam(1, 0x10), 4) == layout.PCI_MMIO_BASE  # firmware's placement
    mmio.write(_ecam(1, 0x10), 4, 0xFFFFFFFF)
    assert mmio.read(_ecam(1, 0x10), 4) == 0xFFFFF000
    mmio.write(_ecam(1, 0x10), 4, 0xE8000000)
    assert mmio.lookup(0xE8000000)[0] is dev.bars[0].device and _config(pio, 1, 0x10) == 0xE8000000
    mmio.write(_ecam(1, 0x04), 2, 0)  # a 16-bit write of the command register: decoding off
    assert mmio.lookup(0xE8000000)[0] is UNCLAIMED


def test_pciexbar_moves_and_disables_the_window_and_a_reset_brings_it_back():
    bus, pio, mmio, _ = _q35()
    mmio.write(_ecam(0, 0x60), 4, 0xE0000000 | 2 << 1 | 1)  # 64 MiB at 0xe0000000
    assert mmio.lookup(ECAM)[0] is UNCLAIMED
    assert mmio.read(0xE0000000, 4) == 0x29C08086
    assert mmio.read(0xE0000000 + (64 << 20), 4) == 0xFFFFFFFF  # past the 64 buses: nothing there
    _config(pio, 0, 0x60, 0xE0000000)  # through 0xcf8: the enable bit off
    assert mmio.lookup(0xE0000000)[0] is UNCLAIMED and _config(pio, 0, 0x60) == 0xE0000000
    _config(pio, 0, 0x60, 0xC0000000 | 3 << 1 | 1)  # the reserved length: no window
    assert mmio.lookup(0xC0000000)[0] is UNCLAIMED
    bus.host.reset()
    assert mmio.read(ECAM, 4) == 0x29C08086


def test_q35_routes_intx_to_gsis_16_to_23_and_keeps_the_lpcs_slot():
    bus, pio, mmio, lines = _q35()
    for _ in range(29):
        bus.add(pci_testdev.PciTestDev())
    edu_like = pci.PciFunction(0x1234, 0x11E8, 0xFF00, interrupt_pin=2)  # INTB
    bus.add(edu_like)
    assert edu_like.slot == 30 and edu_like.config[pci.INTERRUPT_LINE] == q35.pirq_gsi(30, 2) == 16 + 5
    with pytest.raises(BusError, match="PCI bus 0 is full"):
        bus.add(pci_testdev.PciTestDev())  # slot 31 is the LPC's
    edu_like.set_irq(1)
    assert lines == [(21, 1)]
    assert [q35.pirq_gsi(slot, 1) for slot in (0, 1, 2, 3, 4)] == [20, 21, 22, 23, 20]  # PIRQ E-H
    assert [q35.pirq_gsi(31, pin) for pin in (1, 2, 3, 4)] == [16, 17, 18, 19]  # D31IR: PIRQ A-D
    table = bus.routing_table()
    assert len(table) == 128 and (1, 0, 21) in table and (31, 3, 19) in table


def test_pc_has_neither_ecam_nor_a_routing_table():
    bus, pio, mmio, dev = _bus()
    assert bus.ecam is None and bus.routing_table() == ()
    assert mmio.lookup(ECAM)[0] is UNCLAIMED


def test_a_moved_ecam_window_is_where_the_loaded_state_says():
    src, _, src_mmio, _ = _q35()
    src_mmio.write(_ecam(0, 0x60), 4, 0xC0000000 | 1)
    dst, _, dst_mmio, _ = _q35()
    dst.host.load_state(src.host.save_state())
    assert dst_mmio.lookup(ECAM)[0] is UNCLAIMED and dst_mmio.read(0xC0000000, 4) == 0x29C08086

"""The PIO/MMIO interval registry."""

import pytest

from minivmm.devices.bus import UNCLAIMED, Bus, BusError


class Recorder:
    def __init__(self, name):
        self.name = name
        self.writes = []

    def read(self, offset, size):
        return 0x40 + offset

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_routes_by_range_with_offsets():
    bus = Bus("pio")
    a, b = Recorder("a"), Recorder("b")
    bus.register(0x3F8, 8, a)
    bus.register(0x60, 5, b)
    assert bus.read(0x3FD, 1) == 0x45
    bus.write(0x64, 1, 0xFE)
    assert b.writes == [(4, 1, 0xFE)]
    assert bus.lookup(0x3FF) == (a, 7)
    assert bus.lookup(0x400) == (UNCLAIMED, 0)


def test_unclaimed_reads_all_ones_and_ignores_writes():
    bus = Bus("pio")
    assert bus.read(0x1234, 1) == 0xFF
    assert bus.read(0x1234, 2) == 0xFFFF
    assert bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 1, 0)  # nothing claims it: nothing happens


def test_overlap_is_refused_naming_both_devices():
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder("serial0"))
    with pytest.raises(BusError, match=r"debug.*0x3fc-0x3fd overlaps serial0 at 0x3f8-0x3ff"):
        bus.register(0x3FC, 2, Recorder("debug"))


def test_registering_after_lookups_invalidates_the_cache():
    bus = Bus("mmio")
    assert bus.lookup(0xD0000000)[0] is UNCLAIMED
    dev = Recorder("dev")
    bus.register(0xD0000000, 0x1000, dev)
    assert bus.lookup(0xD0000000) == (dev, 0)

"""QEMU's pci-testdev (1b36:0005), the PCI device kvm-unit-tests use to test
I/O exits: BAR0 is 4 KiB of MMIO, BAR1 256 I/O ports.

Each BAR offers three tests, selected by writing their number (0-2) to
offset 0: ``no-eventfd``, ``wildcard-eventfd`` (any write counts) and
``datamatch-eventfd`` (only a byte of the test's data value counts). A test's
header is read at offset 0 as bytes: test number, access width, the offset
to write to, the data value, the count of writes that hit, and the test's
name ("mmio-wildcard-eventfd"). QEMU counts the eventfd variants through
KVM ioeventfds; minivmm counts every variant on its exit path, which a
guest cannot tell apart.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from minivmm.devices.device import Device

from .pci import Bar, PciFunction

TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
MMIO_SIZE, PIO_SIZE = 2048, 128  # the half of each BAR before the tests' write targets
DATAMATCH, NOMATCH = 0xFA, 0xCE
_HEADER = struct.Struct("<BB2xIB3xI")  # test, width, offset, data, count; the name follows


@dataclass
class _Test:
    number: int
    offset: int
    data: int
    name: bytes
    count: int = 0

    @property
    def matches_data(self) -> bool:
        return TESTS[self.number % 3] != "wildcard-eventfd"

    def header(self) -> bytes:
        return _HEADER.pack(self.number, 1, self.offset, self.data, self.count) + self.name + b"\0"


@dataclass
class TestRegion(Device):
    """One BAR's window: ``kind`` is "mmio" (tests 0-2) or "portio" (tests 3-5)."""

    kind: str
    name: str = "pci-testdev"
    current: int = -1
    tests: list[_Test] = field(default_factory=list)

    def __post_init__(self) -> None:
        first = 0 if self.kind == "mmio" else 3
        base = MMIO_SIZE if self.kind == "mmio" else PIO_SIZE
        for i, test in enumerate(TESTS):
            number = first + i
            data = NOMATCH if test == "wildcard-eventfd" else DATAMATCH
            self.tests.append(_Test(number, base + number, data, f"{self.kind}-{test}".encode()))

    def read(self, offset: int, size: int) -> int:
        if self.current < 0:
            return 0
        header = self.tests[self.current].header()
        return int.from_bytes(header[offset : offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.current = -1
            if value & 0xFF < len(TESTS):
                self.current = value & 0xFF
                self.tests[self.current].count = 0
            return
        if self.current < 0:
            return
        test = self.tests[self.current]
        if offset != test.offset:
            return
        if test.matches_data and (size != 1 or value & 0xFF != test.data):
            return
        test.count = (test.count + 1) & 0xFFFFFFFF

    def reset(self) -> None:
        self.current = -1


class PciTestDev(PciFunction):
    name = "pci-testdev"

    def __init__(self) -> None:
        super().__init__(0x1B36, 0x0005, 0x00FF00)  # Red Hat's test device, class "other"
        self.add_bar(0, Bar("mmio", 2 * MMIO_SIZE, TestRegion("mmio")))
        self.add_bar(1, Bar("pio", 2 * PIO_SIZE, TestRegion("portio")))

    def reset(self) -> None:
        super().reset()
        for bar in self.bars:
            if bar is not None:
                bar.device.reset()

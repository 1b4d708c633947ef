"""One interval registry for port I/O and MMIO (kvmtool's model): devices
claim [base, base+length) and see (offset, size, value); nothing else.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .device import Device


class BusError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    base: int
    length: int
    device: Device
    offset: int = 0  # the device offset of ``base``: one device may answer in several ranges

    @property
    def end(self) -> int:
        return self.base + self.length


class Unclaimed(Device):
    """What answers at an address no device claims: reads are all ones, writes vanish (Device's defaults)."""

    name = "unclaimed"


UNCLAIMED = Unclaimed()
_CACHE_LIMIT = 4096


class Bus:
    """Address ranges -> devices.

    ``cache`` maps addresses already seen to (device, offset), unclaimed ones
    included, so the vCPU loop's common case is one dict lookup; it is
    cleared when a range is added and bounded for MMIO's large space.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ranges: list[Range] = []
        self._bases: list[int] = []
        self.cache: dict[int, tuple[Device, int]] = {}

    def register(self, base: int, length: int, device: Device, offset: int = 0) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: {device.name}: empty range at {base:#x}")
        new = Range(base, length, device, offset)
        for r in self.ranges:
            if r.base < new.end and new.base < r.end:
                raise BusError(
                    f"{self.name}: {device.name} at {base:#x}-{new.end - 1:#x} overlaps "
                    f"{r.device.name} at {r.base:#x}-{r.end - 1:#x}"
                )
        i = bisect.bisect(self._bases, base)
        self.ranges.insert(i, new)
        self._bases.insert(i, base)
        self.cache.clear()

    def unregister(self, device: Device) -> None:
        """Take every range of ``device`` off the bus (a PCI BAR that moves)."""
        keep = [(r, b) for r, b in zip(self.ranges, self._bases) if r.device is not device]
        self.ranges = [r for r, _ in keep]
        self._bases = [b for _, b in keep]
        self.cache.clear()

    def lookup(self, addr: int) -> tuple[Device, int]:
        """(device, offset) for ``addr``; UNCLAIMED when no device claims it."""
        hit = self.cache.get(addr)
        if hit is not None:
            return hit
        hit = (UNCLAIMED, 0)
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0 and addr < self.ranges[i].end:
            r = self.ranges[i]
            hit = (r.device, addr - r.base + r.offset)
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        self.cache[addr] = hit
        return hit

    def read(self, addr: int, size: int) -> int:
        device, offset = self.lookup(addr)
        return device.read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        device, offset = self.lookup(addr)
        device.write(offset, size, value)

    def devices(self) -> list[Device]:
        """Each device once, in address order of its first range."""
        seen: set[int] = set()  # by identity: some devices are dataclasses, which do not hash
        out = []
        for r in self.ranges:
            if id(r.device) not in seen:
                seen.add(id(r.device))
                out.append(r.device)
        return out

"""One interval registry for port I/O and MMIO (kvmtool's model): devices
claim [base, base+length) and see (offset, size, value); nothing else.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol


class Device(Protocol):
    name: str

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Address ranges -> devices. Unclaimed reads return all ones, writes vanish."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ranges: list[Range] = []
        self._bases: list[int] = []
        self._cache: dict[int, tuple[Device, int]] = {}

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: {device.name}: empty range at {base:#x}")
        new = Range(base, length, device)
        for r in self.ranges:
            if r.base < new.end and new.base < r.end:
                raise BusError(
                    f"{self.name}: {device.name} at {base:#x}-{new.end - 1:#x} overlaps "
                    f"{r.device.name} at {r.base:#x}-{r.end - 1:#x}"
                )
        i = bisect.bisect(self._bases, base)
        self.ranges.insert(i, new)
        self._bases.insert(i, base)
        self._cache.clear()

    def lookup(self, addr: int) -> tuple[Device, int] | None:
        """(device, offset) for ``addr``, or None when nothing claims it."""
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.end:
                hit = self._cache[addr] = (r.device, addr - r.base)
                return hit
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.lookup(addr)
        if hit is None:
            return (1 << (8 * size)) - 1
        return hit[0].read(hit[1], size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.lookup(addr)
        if hit is not None:
            hit[0].write(hit[1], size, value)

    def devices(self) -> list[Device]:
        return [r.device for r in self.ranges]

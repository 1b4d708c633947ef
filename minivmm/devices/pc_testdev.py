"""QEMU's pc-testdev, the ISA test device kvm-unit-tests drive (``-device pc-testdev``).

- ports 0xe0-0xe3: a 32-bit scratch register, any access width, byte lanes kept;
- ports 0xe4-0xe7: a 32-bit write of a guest-physical address drops and restores
  the host mapping of that page (tests that KVM notices host mapping changes);
- ports 0xe8-0xeb: the scratch register again, a byte at a time;
- ports 0x2000-0x2017: a byte written to port 0x2000+n sets the level of
  interrupt line n (0 low, anything else high);
- MMIO 0xff000000-0xff00ffff: 64 KiB of scratch memory behind MMIO exits.

Each part is a small Device of its own, so the buses route to them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.devices.device import Device
from minivmm.vmstate import VMSD, Field

PORT_BASE = 0xE0  # scratch, flush, scratch by bytes: 12 ports
PORT_IRQ = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000
FLUSH, BYTES = 4, 8  # offsets of the flush port and the byte view in the 12-port range


VMSTATE = VMSD("pc-testdev", 1, 1, (Field("data", "u32"), Field("iomem", "bytes", size=IOMEM_SIZE)))


@dataclass
class TestDevPorts(Device):
    """0xe0-0xeb: the scratch register and the flush-page port."""

    flush_page: Callable[[int], object]
    name: str = "pc-testdev"
    vmstate = VMSTATE
    data: int = 0
    iomem: bytearray = field(default_factory=lambda: bytearray(IOMEM_SIZE))

    def _lanes(self, offset: int, size: int) -> tuple[int, int]:
        shift = 8 * (offset & 3)
        width = min(size, 4 - (offset & 3))
        return shift, ((1 << (8 * width)) - 1) << shift

    def read(self, offset: int, size: int) -> int:
        if FLUSH <= offset < BYTES:
            return (1 << (8 * size)) - 1
        if offset >= BYTES:
            size = 1  # the byte view answers one byte at a time
        shift, mask = self._lanes(offset, size)
        return (self.data & mask) >> shift

    def write(self, offset: int, size: int, value: int) -> None:
        if FLUSH <= offset < BYTES:
            if offset == FLUSH and size == 4:
                self.flush_page(value & 0xFFFFFFFF)
            return
        if offset >= BYTES:
            size = 1
        shift, mask = self._lanes(offset, size)
        self.data = (self.data & ~mask) | ((value << shift) & mask)

    def reset(self) -> None:
        self.data = 0
        self.iomem[:] = bytes(IOMEM_SIZE)

    def save_state(self) -> dict:
        return {"data": self.data, "iomem": bytes(self.iomem)}

    def load_state(self, state: dict) -> None:
        self.data, self.iomem = state["data"], bytearray(state["iomem"])


@dataclass
class TestDevIrq(Device):
    """0x2000-0x2017: interrupt line n follows the byte written to port 0x2000+n."""

    set_irq: Callable[[int, int], None]
    name: str = "pc-testdev-irq-line"

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < IRQ_LINES:
            self.set_irq(offset, 1 if value & 0xFF else 0)


@dataclass
class TestDevMemory(Device):
    """0xff000000: 64 KiB of scratch memory the guest reaches through MMIO exits (shares the ports' state)."""

    ports: TestDevPorts
    name: str = "pc-testdev-iomem"

    def read(self, offset: int, size: int) -> int:
        size = max(0, min(size, IOMEM_SIZE - offset))
        return int.from_bytes(self.ports.iomem[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        size = max(0, min(size, IOMEM_SIZE - offset))
        self.ports.iomem[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

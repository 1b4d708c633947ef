"""PCI Express enhanced configuration access (ECAM, QEMU's "MMCONFIG"): every
function's 4 KiB configuration space in a memory window, at offset
``bus << 20 | device << 15 | function << 12 | register``. The window has no
latch to share between vCPUs, and reaches the registers past 255 that
configuration mechanism #1 cannot address.

The q35 machine maps it where the MCH's PCIEXBAR says (q35.py); both
mechanisms reach the same functions through the PciHost. Only bus 0 exists:
the other buses' functions read all ones, as empty slots do.
"""

from __future__ import annotations

from dataclasses import dataclass

from minivmm.devices.device import Device

from .pci import EXT_CONFIG_SIZE, PciHost

BUS_SHIFT, DEVICE_SHIFT, FUNCTION_SHIFT = 20, 15, 12
REGISTER_MASK = EXT_CONFIG_SIZE - 1


@dataclass
class Ecam(Device):
    host: PciHost
    name: str = "pcie-mmcfg-mmio"  # QEMU's name for the window (info mtree)

    @staticmethod
    def decode(offset: int) -> tuple[int, int, int, int]:
        """(bus, device, function, register) of an offset in the window."""
        return (
            (offset >> BUS_SHIFT) & 0xFF,
            (offset >> DEVICE_SHIFT) & 0x1F,
            (offset >> FUNCTION_SHIFT) & 0x7,
            (offset & REGISTER_MASK),
        )

    def read(self, offset: int, size: int) -> int:
        if size > 4:  # a quadword is two dwords, as QEMU splits it
            return self.read(offset, 4) | self.read(offset + 4, size - 4) << 32
        bus, slot, fn, reg = self.decode(offset)
        size = min(size, EXT_CONFIG_SIZE - reg)
        return self.host.config_read(bus, slot, fn, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size > 4:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, size - 4, value >> 32)
            return
        bus, slot, fn, reg = self.decode(offset)
        self.host.config_write(bus, slot, fn, reg, min(size, EXT_CONFIG_SIZE - reg), value)

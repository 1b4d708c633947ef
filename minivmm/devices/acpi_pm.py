"""The PM1a control register of QEMU's PC ACPI (port 0x604): writing SLP_EN
powers the machine off, which is how tiny guests shut QEMU down
(``outw(0x604, 0x2000)``). Sleep types other than S5 are treated as off too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from minivmm.devices.device import Device
from minivmm.vmstate import VMSD, Field

SLP_EN = 1 << 13


# SLP_EN reads as 0: writing it powers off rather than being stored.
VMSTATE = VMSD("acpi-pm", 1, 1, (Field("control", "u16", mask=0xFFFF & ~SLP_EN),))


@dataclass
class AcpiPm(Device):
    vmstate = VMSTATE
    poweroff: Callable[[], None]
    name: str = "acpi-pm"
    control: int = 0

    def reset(self) -> None:
        self.control = 0

    def save_state(self) -> dict:
        return {"control": self.control}

    def load_state(self, state: dict) -> None:
        self.control = state["control"]

    def read(self, offset: int, size: int) -> int:
        return (self.control >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        """A byte write to one half leaves the other half as it was."""
        lanes = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFF
        value = self.control & ~lanes | (value << (8 * offset)) & lanes
        if value & SLP_EN:
            self.poweroff()
        self.control = value & ~SLP_EN

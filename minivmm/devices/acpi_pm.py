"""The PM1a control register of QEMU's PC ACPI (port 0x604): writing SLP_EN
powers the machine off, which is how tiny guests shut QEMU down
(``outw(0x604, 0x2000)``), or, with SLP_TYP 1 (the DSDT's ``_S3``),
suspends it to RAM. Other sleep types are taken as off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from minivmm.devices.device import Device
from minivmm.vmstate import VMSD, Field

SLP_EN = 1 << 13
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7
SLP_TYP_S3 = 1  # as the DSDT's _S3 package says (QEMU's PIIX encoding)
RTC_EN = 1 << 10  # PM1 enable: the RTC alarm may wake the machine


# SLP_EN reads as 0: writing it powers off rather than being stored.
VMSTATE = VMSD("acpi-pm", 1, 1, (Field("control", "u16", mask=0xFFFF & ~SLP_EN),))


@dataclass
class AcpiPm(Device):
    vmstate = VMSTATE
    poweroff: Callable[[], None]
    suspend: Callable[[], None] = lambda: None
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
        self.control = value & ~SLP_EN
        if value & SLP_EN:
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S3:
                self.suspend()
            else:
                self.poweroff()


PM_TIMER_HZ = 3_579_545  # the ACPI PM timer's fixed frequency
PM_TIMER_MASK = 0xFFFFFF  # 24 bits (the FADT does not set TMR_VAL_EXT)


@dataclass
class PmTimer(Device):
    """The ACPI PM timer (port 0x608): a free-running 24-bit counter at 3.579545 MHz.

    It counts from the host's monotonic clock, so it needs no state of its own: a
    migrated guest sees it jump by the time it was stopped, as on a real suspend.
    """

    clock_ns: Callable[[], int]
    name: str = "acpi-pm-timer"

    def read(self, offset: int, size: int) -> int:
        ticks = self.clock_ns() * PM_TIMER_HZ // 1_000_000_000 & PM_TIMER_MASK
        return (ticks >> (8 * offset)) & ((1 << (8 * size)) - 1)


PM1_EVT_VMSTATE = VMSD("acpi-pm1-evt", 1, 1, (Field("status", "u16"), Field("enable", "u16")), optional=True)


@dataclass
class Pm1Event(Device):
    """The PM1a event block (ports 0x600-0x603): status (write 1 to clear) and enable.

    No fixed event (power button, timer overflow) is ever raised, so no SCI: the
    registers only hold what the guest writes, as an idle PIIX4 does.
    """

    name: str = "acpi-pm1-evt"
    vmstate = PM1_EVT_VMSTATE
    status: int = 0
    enable: int = 0

    def read(self, offset: int, size: int) -> int:
        value = self.status | self.enable << 16
        return (value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        lanes = (((1 << (8 * size)) - 1) << (8 * offset)) & 0xFFFFFFFF
        value = (value << (8 * offset)) & lanes
        self.status &= ~(value & 0xFFFF)
        enable_lanes = lanes >> 16
        self.enable = (self.enable & ~enable_lanes | value >> 16) & 0xFFFF

    def reset(self) -> None:
        self.status = self.enable = 0

    def save_state(self) -> dict:
        return {"status": self.status, "enable": self.enable}

    def load_state(self, state: dict) -> None:
        self.status, self.enable = state["status"], state["enable"]


RESET_CONTROL_SYS_RST, RESET_CONTROL_RST_CPU = 0x02, 0x04


@dataclass
class ResetControl(Device):
    """The PIIX reset control register (port 0xcf9): writing RST_CPU with SYS_RST resets
    the machine; it is the FADT's reset register, as on QEMU's PC."""

    reset_machine: Callable[[], None]
    name: str = "reset-control"
    value: int = 0

    def read(self, offset: int, size: int) -> int:
        return self.value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if value & RESET_CONTROL_RST_CPU:
            self.value = 0
            self.reset_machine()
        else:
            self.value = value & RESET_CONTROL_SYS_RST

    def reset(self) -> None:
        self.value = 0

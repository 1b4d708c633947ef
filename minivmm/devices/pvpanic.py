"""QEMU's pvpanic ISA device (port 0x505): the guest reports a panic by writing
bit 0, a loaded crash kernel by writing bit 1; reads say which are supported.
What a panic does is QEMU's ``-action panic=`` choice, made by the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from minivmm.devices.device import Device

PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
DEFAULT_IOPORT = 0x505


@dataclass
class PvPanic(Device):
    panicked: Callable[[], None]
    crash_loaded: Callable[[], None]
    name: str = "pvpanic"

    def read(self, offset: int, size: int) -> int:
        return PVPANIC_PANICKED | PVPANIC_CRASH_LOADED

    def write(self, offset: int, size: int, value: int) -> None:
        if value & PVPANIC_PANICKED:
            self.panicked()
        elif value & PVPANIC_CRASH_LOADED:
            self.crash_loaded()

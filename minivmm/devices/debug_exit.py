"""QEMU's isa-debug-exit: a write of v ends minivmm with exit status (v << 1) | 1,
of which, as for any process, only the low 8 bits reach the parent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from minivmm.devices.device import Device


@dataclass
class DebugExit(Device):
    exit: Callable[[int], None]  # called with the process exit status
    name: str = "isa-debug-exit"

    def write(self, offset: int, size: int, value: int) -> None:
        self.exit(((value << 1) | 1) & 0xFF)

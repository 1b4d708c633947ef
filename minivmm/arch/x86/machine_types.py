"""QEMU's two PC machine types, as far as they differ in what minivmm builds.

``pc`` is the i440FX host bridge with the PIIX's PCI interrupt routing;
``q35`` the MCH host bridge with PCI Express enhanced configuration (ECAM)
and the ICH9 LPC bridge, whose PCI interrupts reach the IOAPIC on GSIs
16-23. Both share the rest of the board (docs/platform.md). QEMU's
versioned names (``pc-i440fx-9.2``, ``pc-q35-9.2``) name the same machine
here: minivmm's machines do not change between versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import layout


@dataclass(frozen=True)
class MachineType:
    name: str  # "pc" or "q35": what a migration stream says it was saved from
    description: str  # QEMU's -machine help text
    ram_split_threshold: int  # RAM of at least this size is split around the 32-bit hole
    ram_below_4g_when_split: int
    ecam: tuple[int, int] | None = None  # (base, size) of the PCI Express configuration window

    def ram_ranges(self, size: int) -> list[tuple[int, int]]:
        """(guest-physical base, size) of RAM: below 4 GiB, or split around the hole when large."""
        if size < self.ram_split_threshold:
            return [(0, size)]
        below = self.ram_below_4g_when_split
        return [(0, below), (layout.FOUR_GIB, size - below)]

    def reserved(self) -> tuple[tuple[int, int], ...]:
        """Windows the e820 map reserves besides the BIOS areas: the ECAM window, as QEMU's q35 firmware does."""
        return (self.ecam,) if self.ecam is not None else ()


PC = MachineType("pc", "Standard PC (i440FX + PIIX, 1996)", layout.RAM_SPLIT_THRESHOLD, layout.RAM_BELOW_4G_WHEN_SPLIT)
Q35 = MachineType(
    "q35",
    "Standard PC (Q35 + ICH9, 2009)",
    layout.Q35_RAM_SPLIT_THRESHOLD,
    layout.Q35_RAM_BELOW_4G_WHEN_SPLIT,
    ecam=(layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE),
)
MACHINE_TYPES = {t.name: t for t in (PC, Q35)}
_VERSIONED = {"pc": re.compile(r"pc-i440fx-\d+\.\d+"), "q35": re.compile(r"pc-q35-\d+\.\d+")}


def find(name: str) -> MachineType | None:
    """The machine type QEMU's name stands for: ``pc``, ``q35``, or a versioned ``pc-i440fx-X.Y``, ``pc-q35-X.Y``."""
    if name in MACHINE_TYPES:
        return MACHINE_TYPES[name]
    return next((MACHINE_TYPES[t] for t, pattern in _VERSIONED.items() if pattern.fullmatch(name)), None)


def machine_help() -> str:
    """``-machine help``, in QEMU's format."""
    lines = ["Supported machines are:"]
    lines += [f"{t.name:<20} {t.description}{' (default)' if t is PC else ''}" for t in MACHINE_TYPES.values()]
    return "\n".join(lines) + "\n"

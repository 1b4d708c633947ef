"""The machine's memory map as every boot protocol reports it (the BIOS's e820
picture): multiboot's mmap, Linux's boot_params e820 table, PVH's memmap and
fw_cfg's etc/e820 all come from ``memory_map``.

Conventional memory up to the EBDA; the EBDA page (MP floating pointer)
reserved; 0xe0000-0x100000 reserved (the ACPI tables and the MP table); RAM
from 1 MiB, split around the 32-bit MMIO hole when large; and the windows the
machine type reserves (q35's ECAM, as its firmware reserves it for QEMU).
"""

from __future__ import annotations

from . import layout

RAM, RESERVED = 1, 2  # e820 types


def memory_map(
    ram_ranges: list[tuple[int, int]], reserved: tuple[tuple[int, int], ...] = ()
) -> list[tuple[int, int, int]]:
    """(base, length, type) entries, by address, for RAM placed at ``ram_ranges`` (guest-physical
    base, size) and the ``reserved`` windows (base, size) of the machine type."""
    entries = [
        (0, layout.EBDA_ADDR, RAM),
        (layout.EBDA_ADDR, layout.LOW_RAM_END - layout.EBDA_ADDR, RESERVED),
        (layout.ACPI_RSDP_ADDR, layout.BIOS_ALIAS_END - layout.ACPI_RSDP_ADDR, RESERVED),
    ]
    for base, size in ram_ranges:
        lo = max(base, layout.HIGH_RAM_START)
        if base + size > lo:
            entries.append((lo, base + size - lo, RAM))
    entries += [(base, size, RESERVED) for base, size in reserved]
    return sorted(entries)

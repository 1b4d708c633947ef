"""The Intel MultiProcessor table (spec 1.4): how guests (and Linux with
``noacpi``) learn how many CPUs there are and where the IOAPIC is. The
floating pointer sits in the EBDA, the configuration table in the BIOS area,
where there is room for MP_MAX_CPUS processor entries.
"""

from __future__ import annotations

import struct

from . import layout

_APIC_VERSION = 0x14
_IOAPIC_VERSION = 0x11
_NR_ISA_IRQS = 16
_MP_INT, _MP_EXTINT, _MP_NMI = 0, 3, 1


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build(ncpus: int, cpu_signature: int, cpu_features: int) -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes): the floating pointer and the configuration table."""
    if not 1 <= ncpus <= layout.MP_MAX_CPUS:
        raise ValueError(f"an MP table describes 1 to {layout.MP_MAX_CPUS} CPUs, not {ncpus}")
    entries = []
    for apic_id in range(ncpus):
        flags = 1 | (2 if apic_id == 0 else 0)  # enabled, bootstrap processor
        entries.append(struct.pack("<BBBBII8x", 0, apic_id, _APIC_VERSION, flags, cpu_signature, cpu_features))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))
    ioapic_id = ncpus
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, _IOAPIC_VERSION, 1, layout.IOAPIC_ADDR))
    for irq in range(_NR_ISA_IRQS):
        entries.append(struct.pack("<BBHBBBB", 3, _MP_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", 4, _MP_EXTINT, 0, 0, 0, 0xFF, 0))  # LINT0: ExtINT
    entries.append(struct.pack("<BBHBBBB", 4, _MP_NMI, 0, 0, 0, 0xFF, 1))  # LINT1: NMI
    body = b"".join(entries)
    table_addr = layout.MP_CONFIG_ADDR
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        b"PCMP",
        44 + len(body),
        4,
        0,
        b"MINIVMM ",
        b"PC          ",
        0,
        0,
        len(entries),
        layout.LAPIC_ADDR,
        0,
        0,
        0,
    )
    table = header + body
    table = table[:7] + bytes([_checksum(table)]) + table[8:]
    fp = struct.pack("<4sIBBBB4x", b"_MP_", table_addr, 1, 4, 0, 0)
    fp = fp[:10] + bytes([_checksum(fp)]) + fp[11:]
    assert table_addr + len(table) <= layout.MP_CONFIG_END
    return [(layout.MP_FLOATING_ADDR, fp), (table_addr, table)]

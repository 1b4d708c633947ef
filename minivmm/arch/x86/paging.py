"""Identity page tables for the 64-bit boot: 1 GiB pages when the guest CPU
has pdpe1gb, else 2 MiB pages. Entries are user-accessible so test guests can
drop to CPL3 without building tables of their own (CPL0 code is slow under
nested paravirtual KVM).
"""

from __future__ import annotations

import struct

from . import layout

PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
_FLAGS = PTE_P | PTE_RW | PTE_US


def identity_map(limit: int, gib_pages: bool) -> list[tuple[int, bytes]]:
    """(guest address, bytes) pieces mapping [0, limit) 1:1, rounded up to 1 GiB."""
    n_gib = -(-limit // layout.GiB)
    if n_gib > 512:
        raise ValueError(f"identity map of {limit:#x} needs more than one PDPT (512 GiB)")
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | _FLAGS)
    if gib_pages:
        pdpt = struct.pack(f"<{n_gib}Q", *((i * layout.GiB) | _FLAGS | PTE_PS for i in range(n_gib)))
        return [(layout.PML4_ADDR, pml4), (layout.PDPT_ADDR, pdpt)]
    if layout.PD_ADDR + n_gib * layout.PAGE_SIZE > layout.PD_AREA_END:
        most = (layout.PD_AREA_END - layout.PD_ADDR) // layout.PAGE_SIZE
        raise ValueError(f"2 MiB page tables cover at most {most} GiB without pdpe1gb; the guest needs {n_gib} GiB")
    pdpt = struct.pack(f"<{n_gib}Q", *((layout.PD_ADDR + i * layout.PAGE_SIZE) | _FLAGS for i in range(n_gib)))
    n_pde = n_gib * 512
    pds = struct.pack(f"<{n_pde}Q", *((i << 21) | _FLAGS | PTE_PS for i in range(n_pde)))
    return [(layout.PML4_ADDR, pml4), (layout.PDPT_ADDR, pdpt), (layout.PD_ADDR, pds)]

"""CPU entry states: the segment, control-register and GDT set-up for each way
a guest can be entered (x86 reset state, 32-bit flat protected mode for
multiboot, PVH and Linux's 32-bit entry, 64-bit long mode for ELF64 and
Linux's 64-bit entry).
"""

from __future__ import annotations

import struct

from minivmm.kvm.structs import kvm_segment, kvm_sregs

from . import layout, msr

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10

SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_TSS_BUSY = 0xB


def flat_segment(selector: int, *, code: bool, long: bool = False) -> kvm_segment:
    """A present, DPL0, 4 GiB flat segment (long-mode code ignores base and limit)."""
    return kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=SEG_TYPE_CODE_XR_ACCESSED if code else SEG_TYPE_DATA_RW_ACCESSED,
        present=1,
        dpl=0,
        db=0 if long else 1,
        s=1,
        l=1 if long else 0,
        g=1,
    )


def tss_segment() -> kvm_segment:
    return kvm_segment(base=0, limit=0x67, selector=layout.SEL_TSS, type=SEG_TYPE_TSS_BUSY, present=1, s=0)


def gdt_entry(seg: kvm_segment) -> int:
    """The 8-byte descriptor matching a kvm_segment (the TSS's upper half is zero here)."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    flags = (seg.g << 3) | (seg.db << 2) | (seg.l << 1) | seg.avl
    access = seg.type | (seg.s << 4) | (seg.dpl << 5) | (seg.present << 7)
    return (
        (limit & 0xFFFF)
        | ((seg.base & 0xFFFFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | (((seg.base >> 24) & 0xFF) << 56)
    )


def gdt_bytes(code: kvm_segment, data: kvm_segment, tss: kvm_segment | None) -> bytes:
    """The boot GDT: null, null, code at 0x10, data at 0x18, and a 16-byte TSS at 0x20 if given."""
    entries = [0, 0, gdt_entry(code), gdt_entry(data)] + ([gdt_entry(tss), 0] if tss is not None else [])
    return struct.pack(f"<{len(entries)}Q", *entries)


def _load_flat(sregs: kvm_sregs, code: kvm_segment, data: kvm_segment, tss: kvm_segment | None) -> bytes:
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    gdt = gdt_bytes(code, data, tss)
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(gdt) - 1
    if tss is not None:
        sregs.tr = tss
        sregs.idt.base, sregs.idt.limit = 0, 0
    return gdt


def protected_mode(sregs: kvm_sregs) -> bytes:
    """32-bit flat protected mode, paging off, as QEMU's multiboot loader leaves it: CS 0x10,
    the data selectors 0x18, and TR and IDTR as after reset (TR base 0, limit 0xffff: guests
    written against QEMU rely on it). Returns the GDT to write."""
    code, data = flat_segment(layout.SEL_CODE64, code=True), flat_segment(layout.SEL_DATA, code=False)
    gdt = _load_flat(sregs, code, data, None)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    return gdt


def pvh_mode(sregs: kvm_sregs) -> bytes:
    """The PVH ABI's entry state: 32-bit flat protected mode, paging off, as for multiboot, but with
    TR a 32-bit busy TSS at base 0 and limit 0x67, as the ABI states it. Returns the GDT to write."""
    gdt = protected_mode(sregs)
    sregs.tr = kvm_segment(base=0, limit=0x67, selector=0, type=SEG_TYPE_TSS_BUSY, present=1, s=0)
    return gdt


def long_mode(sregs: kvm_sregs, pml4: int) -> bytes:
    """64-bit long mode with paging through ``pml4``; SSE enabled. Returns the GDT to write."""
    code = flat_segment(layout.SEL_CODE64, code=True, long=True)
    gdt = _load_flat(sregs, code, flat_segment(layout.SEL_DATA, code=False), tss_segment())
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = pml4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = msr.EFER_LME | msr.EFER_LMA | msr.EFER_SCE | msr.EFER_NX
    return gdt

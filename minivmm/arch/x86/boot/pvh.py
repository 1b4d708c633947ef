"""PVH direct boot (Xen's HVM start-of-day ABI, which Linux, QEMU and
Firecracker use for an uncompressed ``vmlinux``): the entry point from the
XEN_ELFNOTE_PHYS32_ENTRY note, and the ``hvm_start_info`` structure handed
over in %ebx with the command line, the memory map and the modules (the
initrd). The kernel starts in 32-bit flat protected mode, paging off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout
from . import elf

XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO_MAGIC = 0x336EC578
START_INFO_VERSION = 1  # the version with the memory map

# struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), 56 bytes
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type, reserved


class PvhError(ValueError):
    pass


def entry_point(image: elf.ElfImage) -> int | None:
    """The 32-bit physical entry from the Xen PHYS32_ENTRY note, or None without one."""
    note = image.find_note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) not in (4, 8):
        raise PvhError(f"XEN_ELFNOTE_PHYS32_ENTRY has {len(note.desc)} bytes, not 4 or 8")
    entry = int.from_bytes(note.desc, "little")
    if entry >= layout.FOUR_GIB:
        raise PvhError(f"PVH entry point {entry:#x} is above 4 GiB (it runs with paging off)")
    return entry


@dataclass(frozen=True)
class Module:
    paddr: int
    size: int


def start_info(base: int, cmdline_addr: int, modules: list[Module], e820: list[tuple[int, int, int]]) -> bytes:
    """hvm_start_info at ``base``, then the memory map and the module list it points at."""
    memmap = b"".join(MEMMAP_ENTRY.pack(b, n, t, 0) for b, n, t in e820)
    memmap_addr = base + START_INFO.size
    modlist = b"".join(MODLIST_ENTRY.pack(m.paddr, m.size, 0, 0) for m in modules)
    modlist_addr = memmap_addr + len(memmap) if modules else 0
    info = START_INFO.pack(
        START_INFO_MAGIC,
        START_INFO_VERSION,
        0,  # flags
        len(modules),
        modlist_addr,
        cmdline_addr,
        layout.ACPI_RSDP_ADDR,
        memmap_addr,
        len(e820),
        0,
    )
    blob = info + memmap + modlist
    if len(blob) > layout.PAGE_SIZE:
        raise PvhError(f"start info, memory map and module list take {len(blob)} bytes, more than a page")
    return blob

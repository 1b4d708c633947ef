"""Multiboot v1: finding the header, loading the image (ELF32 or the a.out
kludge), and building the multiboot information structure.

The same information structure is handed to ELF64 kernels (in RBX), so every
minivmm guest learns its RAM, command line and modules one way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout
from ..e820 import memory_map
from . import elf

MB_FLAG_PAGE_ALIGN = 1 << 0
MB_FLAG_MEMORY_INFO = 1 << 1
MB_FLAG_VIDEO_MODE = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16
_SUPPORTED_REQUIRED = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMORY_INFO | MB_FLAG_VIDEO_MODE

INFO_MEM, INFO_BOOTDEV, INFO_CMDLINE, INFO_MODS, INFO_MMAP, INFO_LOADER_NAME = 1, 2, 4, 8, 64, 512
LOADER_NAME = b"minivmm\0"


class MultibootError(ValueError):
    pass


@dataclass(frozen=True)
class Header:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class Module:
    data: bytes
    cmdline: str


def find_header(data: bytes) -> Header | None:
    for off in range(0, min(len(data), layout.MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == layout.MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & MB_FLAG_AOUT_KLUDGE:
                if off + 32 > len(data):
                    raise MultibootError("multiboot header truncated")
                return Header(off, flags, *struct.unpack_from("<5I", data, off + 12))
            return Header(off, flags)
    return None


def load_image(data: bytes, header: Header) -> tuple[list[elf.Segment], int]:
    """The segments to place in RAM and the entry point."""
    unsupported = header.flags & 0xFFFF & ~_SUPPORTED_REQUIRED
    if unsupported:
        raise MultibootError(f"multiboot header requires unsupported features (flags {unsupported:#x})")
    if header.flags & MB_FLAG_AOUT_KLUDGE:
        h = header
        start = h.offset - (h.header_addr - h.load_addr)
        if start < 0 or h.load_addr > h.header_addr:
            raise MultibootError("multiboot a.out kludge addresses are inconsistent")
        size = (h.load_end_addr - h.load_addr) if h.load_end_addr else len(data) - start
        if start + size > len(data):
            raise MultibootError("multiboot load range lies outside the file")
        memsz = max(size, (h.bss_end_addr - h.load_addr) if h.bss_end_addr else 0)
        chunk = data[start : start + size]
        return [elf.Segment(h.load_addr, h.load_addr, chunk, memsz)], h.entry_addr
    image = elf.parse(data)
    if image.elf_class != elf.ELFCLASS32:
        raise MultibootError("multiboot kernels must be ELF32 (or use the a.out kludge)")
    return image.segments, image.entry_paddr()


def mem_upper_kib(ram_ranges: list[tuple[int, int]]) -> int:
    """KiB of contiguous RAM from 1 MiB up (below the 32-bit hole)."""
    for base, size in ram_ranges:
        if base <= layout.HIGH_RAM_START < base + size:
            return (base + size - layout.HIGH_RAM_START) // 1024
    return 0


INFO_SIZE = 72  # the multiboot v1 information structure up to the loader name (68 bytes), 8-aligned


def build_info(
    ram_ranges: list[tuple[int, int]],
    modules: list[tuple[int, int, bytes]],
    cmdline: bytes,
    base: int,
    e820: list[tuple[int, int, int]] | None = None,
) -> bytes:
    """The info structure at ``base``, followed by what it points at: the memory map, the
    kernel command line, the module list and its strings, the loader name.

    As QEMU's loader does, all of it goes after the kernel and its modules (``base``),
    never over a loaded segment. ``modules`` are (start, end, command line) of modules
    already in RAM; ``e820`` the memory map (by default RAM's alone).
    """
    extra = bytearray()

    def put(blob: bytes) -> int:
        addr = base + INFO_SIZE + len(extra)
        extra.extend(blob)
        extra.extend(b"\0" * (-len(extra) % 8))
        return addr

    mmap_blob = b"".join(struct.pack("<IQQI", 20, b, n, t) for b, n, t in e820 or memory_map(ram_ranges))
    mmap_addr = put(mmap_blob)
    cmdline_addr = put(cmdline + b"\0")
    strings = [put(text + b"\0") for _s, _e, text in modules]
    mod_list = b"".join(struct.pack("<IIII", s, e, string, 0) for (s, e, _c), string in zip(modules, strings))
    mods_addr = put(mod_list) if modules else 0
    name_addr = put(LOADER_NAME)
    flags = INFO_MEM | INFO_BOOTDEV | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME | (INFO_MODS if modules else 0)
    info = struct.pack(
        "<IIIIIII16xII12xI",
        flags,
        layout.LOW_RAM_END // 1024,
        mem_upper_kib(ram_ranges),
        0x8000FFFF,  # boot device: none (as QEMU reports it)
        cmdline_addr,
        len(modules),
        mods_addr,
        len(mmap_blob),
        mmap_addr,
        name_addr,
    )
    return info.ljust(INFO_SIZE, b"\0") + bytes(extra)

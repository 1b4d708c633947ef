"""Just enough ELF to load kernels: the header and PT_LOAD program headers."""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELFCLASS32, ELFCLASS64 = 1, 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
ET_EXEC = 2


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    paddr: int
    vaddr: int
    data: bytes  # the file part; the rest up to memsz is zeroed
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    elf_class: int
    machine: int
    entry: int
    segments: list[Segment]

    def entry_paddr(self) -> int:
        """The entry point as a physical address (kernels may link it virtually)."""
        for seg in self.segments:
            if seg.vaddr <= self.entry < seg.vaddr + seg.memsz:
                return self.entry - seg.vaddr + seg.paddr
        return self.entry

    @property
    def end(self) -> int:
        return max(seg.paddr + seg.memsz for seg in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse(data: bytes) -> ElfImage:
    if not is_elf(data) or len(data) < 52:
        raise ElfError("not an ELF file")
    elf_class, endian = data[4], data[5]
    if endian != 1:
        raise ElfError("not a little-endian ELF file")
    e_type = struct.unpack_from("<H", data, 16)[0]
    if e_type != ET_EXEC:
        kind = {1: "a relocatable object", 3: "a shared object or PIE program", 4: "a core dump"}.get(e_type, "")
        raise ElfError(f"not an executable ELF file ({kind or f'type {e_type}'}); kernels are linked ET_EXEC")
    if elf_class == ELFCLASS64:
        if len(data) < 64:
            raise ElfError("truncated ELF header")
        machine, entry, phoff, phentsize, phnum = (
            struct.unpack_from("<H", data, 18)[0],
            *struct.unpack_from("<QQ", data, 24)[:2],
            *struct.unpack_from("<HH", data, 54),
        )
        fmt = "<IIQQQQQQ"
    elif elf_class == ELFCLASS32:
        machine = struct.unpack_from("<H", data, 18)[0]
        entry, phoff = struct.unpack_from("<II", data, 24)
        phentsize, phnum = struct.unpack_from("<HH", data, 42)
        fmt = "<IIIIIIII"
    else:
        raise ElfError(f"unknown ELF class {elf_class}")
    if phentsize < struct.calcsize(fmt) or phoff + phnum * phentsize > len(data):
        raise ElfError("program headers lie outside the file")
    segments = []
    for i in range(phnum):
        fields = struct.unpack_from(fmt, data, phoff + i * phentsize)
        if elf_class == ELFCLASS64:
            p_type, _flags, offset, vaddr, paddr, filesz, memsz, _align = fields
        else:
            p_type, offset, vaddr, paddr, filesz, memsz, _flags, _align = fields
        if p_type != PT_LOAD or memsz == 0:
            continue
        if offset + filesz > len(data) or filesz > memsz:
            raise ElfError(f"segment {i} lies outside the file")
        segments.append(Segment(paddr, vaddr, data[offset : offset + filesz], memsz))
    if not segments:
        raise ElfError("no loadable segments")
    return ElfImage(elf_class, machine, entry, segments)

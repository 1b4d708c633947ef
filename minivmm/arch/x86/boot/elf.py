"""Just enough ELF to load kernels: the header, PT_LOAD program headers, and the
notes in PT_NOTE segments (the PVH entry point, minivmm's own boot note)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ELFCLASS32, ELFCLASS64 = 1, 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
PT_NOTE = 4
ET_EXEC = 2
MAX_NOTES = 256  # far more than any kernel carries; bounds what a crafted file can make us hold

# minivmm's ELF64 boot note (guests/elf64note.ld puts it in every shipped ELF64 guest): the kernel
# asks for the direct long-mode boot (identity map, multiboot information in RBX). An ELF64 without
# it, or a PVH note, is not run: it would be entered at a point that may expect anything.
MINIVMM_NOTE_NAME = b"minivmm"
MINIVMM_NOTE_ELF64_BOOT = 1


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    paddr: int
    vaddr: int
    data: bytes  # the file part; the rest up to memsz is zeroed
    memsz: int


@dataclass(frozen=True)
class Note:
    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    elf_class: int
    machine: int
    entry: int
    segments: list[Segment]
    notes: list[Note] = field(default_factory=list)

    def find_note(self, name: bytes, note_type: int) -> Note | None:
        return next((n for n in self.notes if n.name == name and n.type == note_type), None)

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
    segments: list[Segment] = []
    notes: list[Note] = []
    for i in range(phnum):
        fields = struct.unpack_from(fmt, data, phoff + i * phentsize)
        if elf_class == ELFCLASS64:
            p_type, _flags, offset, vaddr, paddr, filesz, memsz, _align = fields
        else:
            p_type, offset, vaddr, paddr, filesz, memsz, _flags, _align = fields
        if p_type == PT_NOTE:
            if offset + filesz > len(data):
                raise ElfError(f"note segment {i} lies outside the file")
            notes += parse_notes(data[offset : offset + filesz])
            if len(notes) > MAX_NOTES:
                raise ElfError(f"more than {MAX_NOTES} ELF notes")
            continue
        if p_type != PT_LOAD or memsz == 0:
            continue
        if offset + filesz > len(data) or filesz > memsz:
            raise ElfError(f"segment {i} lies outside the file")
        segments.append(Segment(paddr, vaddr, data[offset : offset + filesz], memsz))
    if not segments:
        raise ElfError("no loadable segments")
    return ElfImage(elf_class, machine, entry, segments, notes)


def parse_notes(blob: bytes) -> list[Note]:
    """The notes of one PT_NOTE segment: (namesz, descsz, type), name and desc each padded to 4."""
    notes = []
    pos = 0
    while pos + 12 <= len(blob) and len(notes) <= MAX_NOTES:
        namesz, descsz, note_type = struct.unpack_from("<III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + -(-namesz // 4) * 4
        end = desc_at + -(-descsz // 4) * 4
        if desc_at + descsz > len(blob):
            raise ElfError("an ELF note runs past the end of its segment")
        notes.append(Note(blob[name_at : name_at + namesz].rstrip(b"\0"), note_type, blob[desc_at : desc_at + descsz]))
        pos = end
    return notes

"""Guest RAM: named RAM blocks in memfds (or files), their guest-physical map,
and bounds-checked access from the VMM.

A RamBlock is what QEMU calls a RAMBlock: one host mapping with a stable name
("pc.ram", a backend id, "pc.bios"). CPR keeps these fds and maps them again in
the next process, so everything that identifies a block lives here. The
GuestMemory map places (parts of) blocks at guest-physical addresses and is
what the KVM memory slots are made from.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass, field

MFD_CLOEXEC = 0x1
MFD_HUGETLB = 0x4
PAGE_SIZE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)


class GuestMemoryError(Exception):
    """A guest-physical access outside RAM, or RAM that cannot be set up."""


@dataclass
class RamBlock:
    """A named host mapping of guest RAM.

    ``fd`` is the memfd or file behind it (-1 for anonymous memory); ``shared``
    says the mapping is MAP_SHARED, so the fd's pages *are* guest RAM and a new
    process mapping the same fd sees the same memory (the CPR requirement).
    """

    name: str
    size: int
    fd: int
    shared: bool
    kind: str  # "memfd", "file" or "ram": what QEMU's backend type would be
    path: str | None = None
    readonly: bool = False  # read-only for the guest (a ROM); the VMM may still write it
    prealloc: bool = False  # fault every page in at mmap time (QEMU's prealloc=on)
    mem: mmap.mmap = field(repr=False, default=None)  # type: ignore[assignment]
    host_addr: int = 0

    @classmethod
    def memfd(cls, name: str, size: int, *, shared: bool, hugetlb: bool = False, prealloc: bool = False) -> RamBlock:
        flags = MFD_CLOEXEC | (MFD_HUGETLB if hugetlb else 0)
        try:
            fd = os.memfd_create(name, flags)
        except OSError as e:
            raise GuestMemoryError(f"cannot create memfd for '{name}': {e.strerror}") from None
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise GuestMemoryError(f"cannot set up guest memory '{name}': {e.strerror}") from None
        return cls._mapped(cls(name, size, fd, shared, "memfd", prealloc=prealloc))

    @classmethod
    def file(cls, name: str, size: int, path: str, *, shared: bool, prealloc: bool = False) -> RamBlock:
        """A file-backed block (memory-backend-file): the file outlives the process."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_TMPFILE if os.path.isdir(path) else os.O_CREAT)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise GuestMemoryError(f"can't open backing store {path} for guest RAM: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise GuestMemoryError(f"cannot set up guest memory '{name}': {e.strerror}") from None
        return cls._mapped(cls(name, size, fd, shared, "file", path=path, prealloc=prealloc))

    @classmethod
    def anonymous(cls, name: str, size: int, *, shared: bool, prealloc: bool = False) -> RamBlock:
        return cls._mapped(cls(name, size, -1, shared, "ram", prealloc=prealloc))

    @classmethod
    def from_fd(cls, name: str, size: int, fd: int, *, shared: bool, kind: str) -> RamBlock:
        """Map an fd handed over by a previous minivmm (CPR): its contents are kept."""
        return cls._mapped(cls(name, size, fd, shared, kind))

    @classmethod
    def _mapped(cls, block: RamBlock) -> RamBlock:
        flags = (mmap.MAP_SHARED if block.shared else mmap.MAP_PRIVATE) | (mmap.MAP_POPULATE if block.prealloc else 0)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            if block.fd >= 0:
                block.mem = mmap.mmap(block.fd, block.size, flags, prot)
            else:
                block.mem = mmap.mmap(-1, block.size, flags | mmap.MAP_ANONYMOUS, prot)
        except OSError as e:
            block.close()
            raise GuestMemoryError(f"cannot set up guest memory '{block.name}': {e.strerror}") from None
        anchor = ctypes.c_char.from_buffer(block.mem)
        block.host_addr = ctypes.addressof(anchor)
        del anchor  # an exported buffer would keep mmap.close() from working
        return block

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Mapping:
    """``size`` bytes of ``block`` from ``offset`` appear at guest-physical ``gpa``."""

    gpa: int
    size: int
    block: RamBlock
    offset: int
    label: str | None = None  # a name for this view of the block ("ram-below-4g")

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass
class Slot:
    """A KVM memory slot and the mapping it was made from."""

    slot: int
    mapping: Mapping


class GuestMemory:
    """The guest-physical memory map and bounds-checked access to it.

    Mappings added later take precedence where they overlap earlier ones
    (the BIOS alias below 1 MiB punches a hole into RAM), so the final map is
    a list of disjoint ranges, one KVM memory slot each.
    """

    def __init__(self) -> None:
        self.blocks: list[RamBlock] = []
        self.mappings: list[Mapping] = []

    def add_block(self, block: RamBlock) -> RamBlock:
        if any(b.name == block.name for b in self.blocks):
            raise GuestMemoryError(f"RAM block '{block.name}' already exists")
        self.blocks.append(block)
        return block

    def block(self, name: str) -> RamBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def map(self, gpa: int, size: int, block: RamBlock, offset: int = 0, label: str | None = None) -> None:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or offset % PAGE_SIZE or offset + size > block.size:
            raise GuestMemoryError(
                f"bad mapping of '{block.name}' at {gpa:#x}+{size:#x} (offset {offset:#x}, block size {block.size:#x})"
            )
        kept: list[Mapping] = []
        for m in self.mappings:
            if m.end <= gpa or m.gpa >= gpa + size:
                kept.append(m)
                continue
            if m.gpa < gpa:
                kept.append(Mapping(m.gpa, gpa - m.gpa, m.block, m.offset, m.label))
            if m.end > gpa + size:
                cut = gpa + size - m.gpa
                kept.append(Mapping(gpa + size, m.end - gpa - size, m.block, m.offset + cut, m.label))
        kept.append(Mapping(gpa, size, block, offset, label))
        self.mappings = sorted(kept, key=lambda m: m.gpa)

    def _find(self, gpa: int, length: int) -> tuple[Mapping, int]:
        for m in self.mappings:
            if m.gpa <= gpa < m.end:
                if length > m.end - gpa:
                    break
                return m, m.offset + gpa - m.gpa
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def read(self, gpa: int, length: int) -> bytes:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest-physical range {gpa:#x}+{length:#x}")
        m, off = self._find(gpa, length)
        return m.block.mem[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        m, off = self._find(gpa, len(data))
        m.block.mem[off : off + len(data)] = data

    def zero(self, gpa: int, length: int) -> None:
        """Zero a range (a segment's bss) without a buffer of its size: all of it must be RAM."""
        for block, off, n in self.pieces(gpa, length):
            for at in range(off, off + n, ZERO_CHUNK):
                end = min(at + ZERO_CHUNK, off + n)
                block.mem[at:end] = _ZEROS[: end - at]

    def pieces(self, gpa: int, length: int) -> list[tuple[RamBlock, int, int]]:
        """(block, offset, length) covering [gpa, gpa+length) across mappings; all of it must be RAM."""
        out = []
        start, total = gpa, length
        while length > 0:
            try:
                m, off = self._find(gpa, 1)
            except GuestMemoryError:
                raise GuestMemoryError(f"guest-physical range {start:#x}+{total:#x} is not all RAM") from None
            n = min(length, m.end - gpa)
            out.append((m.block, off, n))
            gpa += n
            length -= n
        return out

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string the guest points at, bounded by ``limit`` and by RAM."""
        m, off = self._find(gpa, 1)
        end = min(off + limit, m.offset + m.size)
        raw = m.block.mem[off:end]
        nul = raw.find(b"\0")
        return raw if nul < 0 else raw[:nul]

    def flush_page(self, gpa: int) -> bool:
        """Drop and restore the host mapping of the page at ``gpa``, so KVM must fault it in again
        (its MMU notifier sees the change); False when ``gpa`` is not RAM."""
        try:
            m, off = self._find(gpa & ~(PAGE_SIZE - 1), PAGE_SIZE)
        except GuestMemoryError:
            return False
        addr = m.block.host_addr + off
        _libc.mprotect(addr, PAGE_SIZE, mmap.PROT_NONE)
        _libc.mprotect(addr, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE)
        return True

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def close(self) -> None:
        for b in self.blocks:
            b.close()
        self.blocks.clear()
        self.mappings.clear()

"""QEMU's firmware configuration device (fw_cfg) on the PC's I/O ports: how
firmware and test guests (kvm-unit-tests reads the CPU count here) learn
about the machine, and how a boot loader finds the kernel, initrd and
command line of a ``-kernel`` boot.

The range is 12 bytes at 0x510 (QEMU's docs/specs/fw_cfg.rst):

- offset 0: the selector, a 16-bit write. It picks an item and rewinds the
  data offset to 0. Bit 15 selects the architecture-local items (0x8000 up),
  bit 14 (the write channel) is ignored: no item is writable.
- offsets 0 and 1: the data register, one byte per 8-bit read, advancing
  through the item; past its end, or with no such item, it reads 0. 8-bit
  writes to it are ignored, as QEMU does since 2.4.
- offsets 4-11: the DMA address, big-endian: a 32-bit write at 4 sets the
  high half, a 32-bit write at 8 the low half and starts the transfer.
  Reads there return the signature "QEMU CFG", byte by byte.

A DMA request is a FWCfgDmaAccess in guest memory: be32 control, be32
length, be64 address. Control bits: SELECT (with the selector in bits
16-31) first, then READ, or WRITE, or SKIP. The device copies at most what
is left of the item (QEMU would zero-fill guest memory for the rest of an
overlong read; here no request writes more than the item holds), refuses
every WRITE (ERROR, as QEMU does for a read-only item), and finishes by
writing the control word back: 0, or ERROR. Every guest-controlled
address and length goes through ``memory``, whose read/write raise
GuestMemoryError outside RAM; that sets ERROR and nothing more.

Items are the machine's (built from the command line each start), so only
the selector, the offset and a half-written DMA address are state.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from minivmm.arch.x86 import layout
from minivmm.devices.state import LockedState
from minivmm.memory import GuestMemoryError
from minivmm.vmstate import VMSD, Field

# --- item keys (QEMU's fw_cfg_keys.h, Linux's uapi qemu_fw_cfg.h) -----------------------------------
SIGNATURE = 0x00
ID = 0x01
UUID = 0x02
RAM_SIZE = 0x03
NOGRAPHIC = 0x04
NB_CPUS = 0x05
MACHINE_ID = 0x06
KERNEL_ADDR = 0x07
KERNEL_SIZE = 0x08
KERNEL_CMDLINE = 0x09
INITRD_ADDR = 0x0A
INITRD_SIZE = 0x0B
BOOT_DEVICE = 0x0C
NUMA = 0x0D
BOOT_MENU = 0x0E
MAX_CPUS = 0x0F
KERNEL_ENTRY = 0x10
KERNEL_DATA = 0x11
INITRD_DATA = 0x12
CMDLINE_ADDR = 0x13
CMDLINE_SIZE = 0x14
CMDLINE_DATA = 0x15
SETUP_ADDR = 0x16
SETUP_SIZE = 0x17
SETUP_DATA = 0x18
FILE_DIR = 0x19
FILE_FIRST = 0x20
FILE_SLOTS = 0x20  # QEMU's default number of file slots
WRITE_CHANNEL = 0x4000
ARCH_LOCAL = 0x8000
ENTRY_MASK = 0xFFFF & ~(WRITE_CHANNEL | ARCH_LOCAL)
INVALID = 0xFFFF
# x86 architecture-local items (QEMU's hw/i386/fw_cfg.h)
ACPI_TABLES = ARCH_LOCAL + 0
SMBIOS_ENTRIES = ARCH_LOCAL + 1
IRQ0_OVERRIDE = ARCH_LOCAL + 2
E820_TABLE = ARCH_LOCAL + 3

ID_TRADITIONAL, ID_DMA = 1 << 0, 1 << 1
SIGNATURE_DATA = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"
DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10
DMA_ACCESS_SIZE = 16  # be32 control, be32 length, be64 address
FILE_NAME_MAX = 55  # 56 bytes in a directory entry, NUL-terminated
ITEM_MAX = 0xFFFFFFFE  # sizes are 32-bit in the directory; QEMU keeps them below UINT32_MAX
E820_RAM, E820_RESERVED = 1, 2
LEGACY_E820_ENTRIES = 16

# offsets in the 12-byte port range
OFF_SELECTOR, OFF_DATA, OFF_DMA_HIGH, OFF_DMA_LOW = 0, 1, 4, 8
PORTS_SIZE = layout.FW_CFG_PORTS_SIZE  # 0x510-0x51b


class GuestMemoryAccess(Protocol):
    """What DMA needs of guest memory (minivmm.memory.GuestMemory has it): both raise GuestMemoryError
    for a range that is not all RAM."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass
class FwCfgState:
    selector: int = SIGNATURE
    offset: int = 0  # the next byte of the selected item
    dma_addr: int = 0  # the high half, between the write at 0x514 and the one at 0x518


VMSTATE = VMSD(
    "fw_cfg",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("selector", "u16"),
        Field("offset", "u32", max=ITEM_MAX),
        Field("dma_addr", "u64", mask=0xFFFFFFFF << 32),  # only the high half outlives a port write
    ),
    post_load=lambda v: FwCfgState(v["selector"], v["offset"], v["dma_addr"]),
    optional=True,
)


def e820_entries(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """(address, length, type) as packed {le64 address, le64 length, le32 type} records: "etc/e820"."""
    out = b""
    for addr, length, kind in entries:
        if not (0 <= addr < 1 << 64 and 0 <= length < 1 << 64 and 0 <= kind < 1 << 32):
            raise ValueError(f"e820 entry ({addr:#x}, {length:#x}, {kind}) does not fit its fields")
        out += struct.pack("<QQI", addr, length, kind)
    return out


def legacy_e820_table(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """The old arch-local E820_TABLE: le32 count, then 16 packed records (QEMU put only reserved ranges here)."""
    entries = list(entries)
    if len(entries) > LEGACY_E820_ENTRIES:
        raise ValueError(f"legacy e820 table: {len(entries)} entries, it holds {LEGACY_E820_ENTRIES}")
    body = e820_entries(entries)
    return struct.pack("<I", len(entries)) + body + bytes(20 * (LEGACY_E820_ENTRIES - len(entries)))


class FwCfg(LockedState):
    name = "fw_cfg"
    vmstate = VMSTATE

    def __init__(self, memory: GuestMemoryAccess | None = None, file_slots: int = FILE_SLOTS) -> None:
        """``memory``: where DMA reads and writes; None leaves DMA out (the ID says so)."""
        self.memory = memory
        self.file_slots = file_slots
        self.items: dict[int, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.s = FwCfgState()
        self.lock = threading.Lock()
        self.add_bytes(SIGNATURE, SIGNATURE_DATA)
        self.add_i32(ID, ID_TRADITIONAL | (ID_DMA if memory is not None else 0))
        self._directory()

    # --- items (the machine's side) ------------------------------------------------------------------

    def add_bytes(self, key: int, data: bytes) -> None:
        """A fixed item: keys below FILE_FIRST, or arch-local ones (0x8000 + n); files go through add_file."""
        index = key & ENTRY_MASK
        if not 0 <= key <= 0xFFFF or key & WRITE_CHANNEL or index >= FILE_FIRST or key == FILE_DIR:
            raise ValueError(f"fw_cfg key {key:#x} is not a fixed item key (0x00-0x1f, 0x8000-0x801f, not 0x19)")
        if key in self.items:
            raise ValueError(f"fw_cfg key {key:#x} is already set")
        if len(data) > ITEM_MAX:
            raise ValueError(f"fw_cfg key {key:#x}: {len(data)} bytes, the most is {ITEM_MAX}")
        self.items[key] = bytes(data)

    def add_i16(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<H", value))

    def add_i32(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<I", value))

    def add_i64(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<Q", value))

    def add_string(self, key: int, text: str) -> None:
        """A NUL-terminated string item, as QEMU's fw_cfg_add_string."""
        self.add_bytes(key, text.encode() + b"\0")

    def add_file(self, name: str, data: bytes) -> None:
        """A named item ("etc/e820"): listed in FILE_DIR, selectors from FILE_FIRST in name order (as QEMU)."""
        raw = name.encode()
        if not raw or len(raw) > FILE_NAME_MAX or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r}: 1 to {FILE_NAME_MAX} bytes without NUL")
        if name in self.files:
            raise ValueError(f"fw_cfg file {name!r} already exists")
        if len(self.files) >= self.file_slots:
            raise ValueError(f"fw_cfg file {name!r}: all {self.file_slots} file slots are taken")
        if len(data) > ITEM_MAX:
            raise ValueError(f"fw_cfg file {name!r}: {len(data)} bytes, the most is {ITEM_MAX}")
        self.files[name] = bytes(data)
        self._directory()

    def file_selector(self, name: str) -> int:
        return FILE_FIRST + sorted(self.files).index(name)

    def _directory(self) -> None:
        """FILE_DIR: be32 count, then per file be32 size, be16 selector, be16 reserved, 56-byte name."""
        names = sorted(self.files)
        out = struct.pack(">I", len(names))
        for i, n in enumerate(names):
            out += struct.pack(">IHH56s", len(self.files[n]), FILE_FIRST + i, 0, n.encode())
            self.items[FILE_FIRST + i] = self.files[n]
        self.items[FILE_DIR] = out

    def add_kernel(self, addr: int, data: bytes, entry: int | None = None) -> None:
        """KERNEL_ADDR/SIZE/DATA (the protected-mode part of a bzImage, or a whole kernel), KERNEL_ENTRY."""
        self.add_i32(KERNEL_ADDR, addr)
        self.add_i32(KERNEL_SIZE, len(data))
        self.add_bytes(KERNEL_DATA, data)
        if entry is not None:
            self.add_i32(KERNEL_ENTRY, entry)

    def add_setup(self, addr: int, data: bytes) -> None:
        """SETUP_ADDR/SIZE/DATA: a bzImage's real-mode setup sectors."""
        self.add_i32(SETUP_ADDR, addr)
        self.add_i32(SETUP_SIZE, len(data))
        self.add_bytes(SETUP_DATA, data)

    def add_initrd(self, addr: int, data: bytes) -> None:
        self.add_i32(INITRD_ADDR, addr)
        self.add_i32(INITRD_SIZE, len(data))
        self.add_bytes(INITRD_DATA, data)

    def add_cmdline(self, addr: int, text: str) -> None:
        """CMDLINE_ADDR/SIZE/DATA; the size counts the NUL (as QEMU's x86 loader)."""
        self.add_i32(CMDLINE_ADDR, addr)
        self.add_i32(CMDLINE_SIZE, len(text.encode()) + 1)
        self.add_string(CMDLINE_DATA, text)

    # --- the guest's side -------------------------------------------------------------------------------

    def _item(self) -> bytes | None:
        return self.items.get(self.s.selector & ~WRITE_CHANNEL)

    def _select(self, key: int) -> None:
        self.s.selector = key & 0xFFFF
        self.s.offset = 0

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        with self.lock:
            if offset in (OFF_SELECTOR, OFF_DATA):
                if size != 1:
                    return ones  # QEMU takes only byte reads here
                item = self._item()
                if item is None or self.s.offset >= len(item):
                    return 0
                value = item[self.s.offset]
                self.s.offset += 1
                return value
            if OFF_DMA_HIGH <= offset < PORTS_SIZE and self.memory is not None:
                start = offset - OFF_DMA_HIGH
                raw = DMA_SIGNATURE[start : start + size].ljust(size, b"\xff")
                return int.from_bytes(raw, "little") & ones
            return ones

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset == OFF_SELECTOR and size == 2:
                self._select(value)
            elif self.memory is None or size != 4:
                return  # data writes are ignored; the DMA registers take 32-bit writes only
            elif offset == OFF_DMA_HIGH:
                self.s.dma_addr = _be32(value) << 32
            elif offset == OFF_DMA_LOW:
                addr, self.s.dma_addr = self.s.dma_addr | _be32(value), 0
                self._dma(addr)

    def _dma(self, addr: int) -> None:
        """One FWCfgDmaAccess at ``addr``; the control word is written back 0 or ERROR."""
        mem = self.memory
        assert mem is not None
        try:
            control, length, address = struct.unpack(">IIQ", mem.read(addr, DMA_ACCESS_SIZE))
        except GuestMemoryError:
            _finish(mem, addr, DMA_ERROR)
            return
        if control & DMA_SELECT:
            self._select(control >> 16)
        status = 0
        if control & DMA_READ or (control & DMA_SKIP and not control & DMA_WRITE):  # QEMU's order
            item = self._item() or b""
            n = min(length, max(len(item) - self.s.offset, 0))  # never more than the item holds
            if n and control & DMA_READ:
                try:
                    mem.write(address, item[self.s.offset : self.s.offset + n])
                except GuestMemoryError:
                    status = DMA_ERROR
            if not status:
                self.s.offset += n
        elif control & DMA_WRITE and length:
            status = DMA_ERROR  # no item is writable
        _finish(mem, addr, status)


def _finish(mem: GuestMemoryAccess, addr: int, status: int) -> None:
    """Write the control word back; an address outside RAM leaves nowhere to report to."""
    try:
        mem.write(addr, struct.pack(">I", status))
    except GuestMemoryError:
        pass


def _be32(value: int) -> int:
    """A 32-bit port write of a big-endian register: the guest wrote the bytes in memory order."""
    return int.from_bytes((value & 0xFFFFFFFF).to_bytes(4, "little"), "big")


def pc(
    memory: GuestMemoryAccess | None,
    *,
    ncpus: int,
    ram_size: int,
    max_cpus: int | None = None,
    uuid: bytes = bytes(16),
    nographic: bool = True,
    boot_menu: bool = False,
    e820: Iterable[tuple[int, int, int]] = (),
    acpi_tables: bytes = b"",
) -> FwCfg:
    """The items QEMU's PC sets: signature, ID, UUID, RAM size, CPU counts, display and boot menu flags,
    the arch-local ACPI tables (user tables: none by default), IRQ0 override, legacy E820 table (the
    reserved ranges) and the "etc/e820" file. Kernel, initrd and command line are added by the loader."""
    if len(uuid) != 16:
        raise ValueError(f"fw_cfg uuid: {len(uuid)} bytes, a UUID has 16")
    if not 1 <= ncpus <= 0xFFFF:
        raise ValueError(f"fw_cfg ncpus={ncpus}: 1 to 65535")
    max_cpus = ncpus if max_cpus is None else max_cpus
    if not ncpus <= max_cpus <= 0xFFFF:
        raise ValueError(f"fw_cfg max_cpus={max_cpus}: from ncpus ({ncpus}) to 65535")
    if not 0 <= ram_size < 1 << 64:
        raise ValueError(f"fw_cfg ram_size={ram_size}: does not fit 64 bits")
    e820 = list(e820)
    fw = FwCfg(memory)
    fw.add_bytes(UUID, uuid)
    fw.add_i16(NOGRAPHIC, int(nographic))
    fw.add_i16(BOOT_MENU, int(boot_menu))
    fw.add_i16(NB_CPUS, ncpus)
    fw.add_i16(MAX_CPUS, max_cpus)  # QEMU: the APIC id limit; minivmm's APIC ids are 0..ncpus-1
    fw.add_i64(RAM_SIZE, ram_size)
    fw.add_bytes(ACPI_TABLES, acpi_tables)
    fw.add_i32(IRQ0_OVERRIDE, 1)
    fw.add_bytes(E820_TABLE, legacy_e820_table(e for e in e820 if e[2] == E820_RESERVED))
    if e820:
        fw.add_file("etc/e820", e820_entries(e820))
    return fw

"""The Linux x86 boot protocol (Documentation/arch/x86/boot.rst, versions 2.06
to 2.15) for a bzImage: its setup header, where the protected-mode part and
the initrd go, and the zero page (``struct boot_params``) a loader fills.

minivmm enters the kernel the way Firecracker and Cloud Hypervisor do, past
the real-mode setup code: through the 64-bit entry (load address + 0x200)
in long mode when the header says XLF_KERNEL_64, else through the 32-bit one
(``code32_start``) in flat protected mode. Either way ``%rsi`` holds the
zero page. Every value read from the file is checked here, so a crafted
bzImage gives one ``LinuxError`` line and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout

HDR_START = 0x1F1  # the setup header, in the file and in the zero page
HDR_MAGIC_AT = 0x202
HDR_MAGIC = b"HdrS"
HDR_MAX_END = 0x290  # struct boot_params: the header area ends at edd_mbr_sig_buffer
MIN_VERSION = 0x0206  # cmdline_size, the first field a loader needs that older headers lack
SECTOR = 512
DEFAULT_SETUP_SECTS = 4  # "if this field is 0, the real value is 4"
ENTRY64_OFFSET = 0x200  # the 64-bit entry point, from the load address

LOADED_HIGH = 0x01  # loadflags: the protected-mode part runs at 0x100000 (a bzImage)
XLF_KERNEL_64 = 0x01  # xloadflags: has the 64-bit entry at +0x200
TYPE_OF_LOADER_UNDEFINED = 0xFF  # "boot loader without an assigned id"

# boot_params fields outside the setup header (zero-page.rst)
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: packed, 20 bytes
ZERO_PAGE_SIZE = layout.PAGE_SIZE

# setup header fields (boot.rst's table: offset, struct format, first protocol version)
FIELDS: dict[str, tuple[int, str, int]] = {
    "setup_sects": (0x1F1, "B", 0),
    "boot_flag": (0x1FE, "H", 0),
    "version": (0x206, "H", 0x0200),
    "type_of_loader": (0x210, "B", 0x0200),
    "loadflags": (0x211, "B", 0x0200),
    "code32_start": (0x214, "I", 0x0200),
    "ramdisk_image": (0x218, "I", 0x0200),
    "ramdisk_size": (0x21C, "I", 0x0200),
    "cmd_line_ptr": (0x228, "I", 0x0202),
    "initrd_addr_max": (0x22C, "I", 0x0203),
    "kernel_alignment": (0x230, "I", 0x0205),
    "relocatable_kernel": (0x234, "B", 0x0205),
    "xloadflags": (0x236, "H", 0x020C),
    "cmdline_size": (0x238, "I", 0x0206),
    "payload_offset": (0x248, "I", 0x0208),
    "payload_length": (0x24C, "I", 0x0208),
    "pref_address": (0x258, "Q", 0x020A),
    "init_size": (0x260, "I", 0x020A),
}
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # before 2.03


class LinuxError(ValueError):
    pass


def _field_end(name: str) -> int:
    offset, fmt, _v = FIELDS[name]
    return offset + struct.calcsize("<" + fmt)


@dataclass(frozen=True)
class SetupHeader:
    """What a loader needs from the header; ``raw`` is the header itself (0x1f1 to its end)."""

    version: int
    setup_sects: int  # 0 already replaced by 4
    loadflags: int
    code32_start: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    initrd_addr_max: int
    init_size: int
    pref_address: int
    payload_offset: int
    payload_length: int
    raw: bytes

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def setup_size(self) -> int:
        """Bytes of the file before the protected-mode part (the boot sector and the setup sectors)."""
        return (self.setup_sects + 1) * SECTOR

    @property
    def kernel_64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)


@dataclass(frozen=True)
class Kernel:
    header: SetupHeader
    protected: bytes  # the protected-mode part, loaded at the load address

    @property
    def memory_needed(self) -> int:
        """Bytes from the load address the kernel may use while it starts (init_size, at least the image)."""
        return max(self.header.init_size, len(self.protected))


def is_bzimage(data: bytes) -> bool:
    return data[HDR_MAGIC_AT : HDR_MAGIC_AT + 4] == HDR_MAGIC


def parse(data: bytes) -> Kernel:
    """The setup header and protected-mode part of a bzImage, checked against the file's size."""
    if not is_bzimage(data):
        raise LinuxError("not a Linux bzImage (no HdrS at 0x202)")
    if len(data) < HDR_MAGIC_AT + 6:
        raise LinuxError(f"truncated: {len(data)} bytes end inside the setup header")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < MIN_VERSION:
        raise LinuxError(
            f"Linux boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
            f"(minivmm loads {MIN_VERSION >> 8}.{MIN_VERSION & 0xFF:02d} and later)"
        )
    if data[0x200] != 0xEB:  # a short jmp over the header: its operand gives the header's end
        raise LinuxError(f"setup header: no short jump at 0x200 (byte {data[0x200]:#04x})")
    end = HDR_MAGIC_AT + data[0x201]
    needed = max(_field_end(name) for name, (_o, _f, since) in FIELDS.items() if since <= version)
    if end > HDR_MAX_END or end < needed:
        raise LinuxError(f"setup header ends at {end:#x}: protocol {version:#06x} needs {needed:#x}..{HDR_MAX_END:#x}")
    if len(data) < end:
        raise LinuxError(f"truncated: {len(data)} bytes, the setup header ends at {end:#x}")

    def get(name: str) -> int:
        offset, fmt, since = FIELDS[name]
        return struct.unpack_from("<" + fmt, data, offset)[0] if since <= version else 0

    loadflags = get("loadflags")
    if not loadflags & LOADED_HIGH:
        raise LinuxError("loadflags lacks LOADED_HIGH: a zImage (loaded at 0x10000), which minivmm does not load")
    relocatable = bool(get("relocatable_kernel"))
    alignment = get("kernel_alignment")
    if relocatable and (alignment == 0 or alignment & (alignment - 1) or alignment > layout.GiB):
        raise LinuxError(f"kernel_alignment {alignment:#x} is not a power of two up to 1 GiB")
    header = SetupHeader(
        version=version,
        setup_sects=get("setup_sects") or DEFAULT_SETUP_SECTS,
        loadflags=loadflags,
        code32_start=get("code32_start"),
        kernel_alignment=alignment,
        relocatable=relocatable,
        xloadflags=get("xloadflags"),
        cmdline_size=get("cmdline_size"),
        initrd_addr_max=get("initrd_addr_max") if version >= 0x0203 else DEFAULT_INITRD_ADDR_MAX,
        init_size=get("init_size"),
        pref_address=get("pref_address"),
        payload_offset=get("payload_offset"),
        payload_length=get("payload_length"),
        raw=bytes(data[HDR_START:end]),
    )
    if len(data) <= header.setup_size:
        raise LinuxError(
            f"truncated: {len(data)} bytes, but with setup_sects {header.setup_sects} the setup part ends at "
            f"{header.setup_size:#x}"
        )
    protected = bytes(data[header.setup_size :])
    if header.payload_length and header.payload_offset + header.payload_length > len(protected):
        raise LinuxError(
            f"payload_offset {header.payload_offset:#x} + payload_length {header.payload_length:#x} "
            f"lies outside the {len(protected):#x}-byte protected-mode part"
        )
    return Kernel(header, protected)


def low_ram_end(ram_ranges: list[tuple[int, int]]) -> int:
    """The end of the RAM that contains 1 MiB (all of it below 4 GiB): where kernel and initrd go."""
    for base, size in ram_ranges:
        if base <= layout.HIGH_RAM_START < base + size:
            return min(base + size, layout.FOUR_GIB)
    return 0


def _align_up(x: int, align: int) -> int:
    return -(-x // align) * align


def load_address(kernel: Kernel, ram_end: int) -> int:
    """Where the protected-mode part goes: pref_address when relocatable and it fits in RAM,
    else 1 MiB (aligned up to kernel_alignment when relocatable). ``ram_end`` is low_ram_end()."""
    h, need = kernel.header, kernel.memory_needed
    if h.relocatable:
        if h.pref_address >= layout.HIGH_RAM_START and h.pref_address + need <= ram_end:
            return h.pref_address
        addr = _align_up(layout.HIGH_RAM_START, h.kernel_alignment)
    else:
        addr = layout.KERNEL_LOAD_ADDR
    if addr + need > ram_end:
        raise LinuxError(
            f"needs {need:#x} bytes of RAM from {addr:#x} (init_size), but RAM below 4 GiB ends at {ram_end:#x}"
        )
    return addr


def initrd_address(kernel: Kernel, load_addr: int, size: int, ram_end: int) -> int:
    """Page-aligned, as high as RAM below 4 GiB and initrd_addr_max allow, above load_addr + init_size."""
    top = min(kernel.header.initrd_addr_max + 1, ram_end)
    floor = _align_up(load_addr + kernel.memory_needed, layout.PAGE_SIZE)
    addr = (top - size) & ~(layout.PAGE_SIZE - 1)
    if size > top or addr < floor:
        raise LinuxError(
            f"{size} bytes do not fit between the kernel's end at {floor:#x} and {top:#x} "
            f"(initrd_addr_max {kernel.header.initrd_addr_max:#x}, RAM below 4 GiB ends at {ram_end:#x})"
        )
    return addr


def zero_page(
    kernel: Kernel,
    load_addr: int,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    e820: list[tuple[int, int, int]],
) -> bytes:
    """struct boot_params as a loader hands it to the 32- or 64-bit entry.

    The setup header is copied in from the file and the fields a loader owns are then written:
    type_of_loader, code32_start (the load address), cmd_line_ptr, the ramdisk and their high
    halves, the e820 table (``e820`` is (base, size, type) from the machine's memory map) and
    acpi_rsdp_addr (so the kernel need not scan for the RSDP).
    """
    if len(e820) > E820_MAX_ENTRIES:
        raise LinuxError(f"{len(e820)} e820 entries: the zero page holds {E820_MAX_ENTRIES}")
    page = bytearray(ZERO_PAGE_SIZE)
    page[HDR_START : HDR_START + len(kernel.header.raw)] = kernel.header.raw

    def put(name: str, value: int) -> None:
        offset, fmt, _since = FIELDS[name]
        struct.pack_into("<" + fmt, page, offset, value)

    put("type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    put("code32_start", load_addr)
    put("cmd_line_ptr", cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    image, size = initrd or (0, 0)
    put("ramdisk_image", image & 0xFFFFFFFF)
    put("ramdisk_size", size & 0xFFFFFFFF)
    struct.pack_into("<II", page, BP_EXT_RAMDISK_IMAGE, image >> 32, size >> 32)
    struct.pack_into("<Q", page, BP_ACPI_RSDP_ADDR, layout.ACPI_RSDP_ADDR)
    page[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(page, BP_E820_TABLE + i * E820_ENTRY.size, *entry)
    return bytes(page)

"""Boot loaders: turn -kernel/-initrd/-append/-bios into RAM contents and the
CPU state the guest starts in.

``prepare`` reads and checks the files once, at start-up (bad input fails
before any VM exists). ``load`` writes them into guest RAM; it runs again on
every reset, as QEMU reloads its ROMs. Kinds: multiboot v1 (ELF32 or a.out
kludge, 32-bit protected mode), ELF64 (minivmm's direct long-mode boot, for
an ELF64 carrying minivmm's boot note), Linux (a bzImage, entered at its
64-bit or 32-bit entry: linux.py), PVH (an ELF with Xen's PHYS32_ENTRY note:
pvh.py) and flat real-mode firmware for -bios.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minivmm.memory import GuestMemory, GuestMemoryError

from .. import layout, mptable, paging
from ..e820 import memory_map
from . import elf, linux, multiboot, pvh


class BootError(ValueError):
    """Bad boot input; ``option`` names the command-line option at fault."""

    def __init__(self, option: str, value: str, message: str) -> None:
        super().__init__(f"{option} {value}: {message}")
        self.option = option


@dataclass
class BootImage:
    kind: str  # "multiboot", "elf64", "linux", "pvh" or "bios"
    path: str
    segments: list[elf.Segment] = field(default_factory=list)
    entry: int = 0
    cmdline: bytes = b""
    modules: list[multiboot.Module] = field(default_factory=list)
    firmware: bytes = b""
    linux: linux.Kernel | None = None  # the bzImage (kind "linux")
    initrd: bytes | None = None  # the one -initrd file of a Linux or PVH boot
    initrd_path: str = ""


@dataclass(frozen=True)
class Entry:
    """Where and how the boot CPU starts: ``mode`` is reset, protected, pvh (protected as the PVH ABI
    has it) or long."""

    mode: str
    rip: int = 0
    rax: int = 0
    rbx: int = 0
    rsp: int = 0
    rsi: int = 0


# QEMU's wording (test runners look for "could not load kernel"), by option.
_WHAT = {"-kernel": "kernel", "-bios": "PC BIOS", "-initrd": "initial ram disk"}


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootError(option, path, f"could not load {_WHAT[option]} '{path}': {e.strerror}") from None


def split_modules(spec: str) -> list[str]:
    """QEMU's -initrd list: comma separated, ',,' is a literal comma."""
    return [m.replace("\0", ",") for m in spec.replace(",,", "\0").split(",") if m]


def prepare(kernel: str | None, append: str | None, initrd: str | None, bios: str | None) -> BootImage:
    if bios is not None:
        for opt, val in (("-kernel", kernel), ("-initrd", initrd), ("-append", append)):
            if val is not None:
                raise BootError(opt, val, "cannot be combined with -bios (minivmm has no firmware to load a kernel)")
        data = _read("-bios", bios)
        if not data or len(data) > layout.BIOS_MAX_SIZE:
            raise BootError(
                "-bios", bios, f"firmware must be 1 byte to {layout.BIOS_MAX_SIZE >> 20} MiB, not {len(data)}"
            )
        return BootImage("bios", bios, firmware=data)
    if kernel is None:
        raise BootError("-kernel", "", "no kernel given")
    data = _read("-kernel", kernel)
    try:
        if linux.is_bzimage(data):
            return _prepare_linux(kernel, linux.parse(data), append, initrd)
        header = multiboot.find_header(data)
        if header is not None:
            segments, entry = multiboot.load_image(data, header)
            kind = "multiboot"
        elif elf.is_elf(data):
            image = elf.parse(data)
            pvh_entry = pvh.entry_point(image)
            if pvh_entry is not None:
                cmdline = _direct_cmdline(append, layout.CMDLINE_MAX - 1)
                initrd_data = _read("-initrd", initrd) if initrd is not None else None
                return BootImage(
                    "pvh", kernel, image.segments, pvh_entry, cmdline, initrd=initrd_data, initrd_path=initrd or ""
                )
            if image.elf_class != elf.ELFCLASS64 or image.machine != elf.EM_X86_64:
                raise BootError("-kernel", kernel, "32-bit ELF kernel without a multiboot header or a PVH note")
            if image.find_note(elf.MINIVMM_NOTE_NAME, elf.MINIVMM_NOTE_ELF64_BOOT) is None:
                raise BootError(
                    "-kernel",
                    kernel,
                    "ELF64 kernel with neither a PVH entry note (Xen's XEN_ELFNOTE_PHYS32_ENTRY) nor minivmm's "
                    "ELF64 boot note: not knowing how it wants to be entered, minivmm does not run it",
                )
            segments, entry, kind = image.segments, image.entry_paddr(), "elf64"
        else:
            raise BootError("-kernel", kernel, "not a multiboot, ELF64 or Linux kernel image")
    except (elf.ElfError, multiboot.MultibootError, linux.LinuxError, pvh.PvhError) as e:
        raise BootError("-kernel", kernel, str(e)) from None
    cmdline = (kernel + (" " + append if append else "")).encode()
    if len(cmdline) >= layout.CMDLINE_MAX:
        raise BootError("-append", append or "", f"command line longer than {layout.CMDLINE_MAX - 1} bytes")
    modules = []
    for spec in split_modules(initrd or ""):
        modules.append(multiboot.Module(_read("-initrd", spec.split(" ", 1)[0]), spec))
    return BootImage(kind, kernel, segments, entry, cmdline, modules)


def _direct_cmdline(append: str | None, limit: int) -> bytes:
    """A Linux or PVH command line: -append alone (QEMU adds the file name for multiboot only)."""
    cmdline = (append or "").encode()
    if len(cmdline) > limit:
        raise BootError("-append", append or "", f"command line longer than the kernel's {limit} bytes")
    return cmdline


def _prepare_linux(path: str, kernel: linux.Kernel, append: str | None, initrd: str | None) -> BootImage:
    cmdline = _direct_cmdline(append, min(kernel.header.cmdline_size, layout.CMDLINE_MAX - 1))
    initrd_data = _read("-initrd", initrd) if initrd is not None else None
    return BootImage("linux", path, cmdline=cmdline, linux=kernel, initrd=initrd_data, initrd_path=initrd or "")


def _page_up(x: int) -> int:
    return -(-x // layout.PAGE_SIZE) * layout.PAGE_SIZE


def load(
    image: BootImage,
    mem: GuestMemory,
    ram_ranges: list[tuple[int, int]],
    *,
    ncpus: int,
    cpu_signature: int,
    cpu_features: int,
    gib_pages: bool,
    reserved: tuple[tuple[int, int], ...] = (),
) -> Entry:
    """Write the image and its boot structures into RAM; return the entry state. ``reserved``:
    the machine type's windows the memory map reserves (MachineType.reserved)."""
    if image.kind == "bios":
        return Entry("reset")  # the firmware block is mapped, not loaded
    e820 = memory_map(ram_ranges, reserved)
    if image.kind == "linux":
        entry = _load_linux(image, mem, ram_ranges, e820, gib_pages)
    elif image.kind == "pvh":
        entry = _load_pvh(image, mem, ram_ranges, e820)
    else:
        entry = _load_multiboot(image, mem, ram_ranges, e820, gib_pages)
    try:
        for gpa, blob in mptable.build(ncpus, cpu_signature, cpu_features):
            mem.write(gpa, blob)
    except GuestMemoryError as e:
        raise BootError("-kernel", image.path, f"does not fit in guest RAM: {e}") from None
    return entry


def _load_multiboot(
    image: BootImage, mem: GuestMemory, ram_ranges: list[tuple[int, int]], e820: list, gib_pages: bool
) -> Entry:
    """Multiboot and ELF64: the kernel, its modules, then the multiboot information after them."""
    opt = f"-kernel {image.path}"
    try:
        for seg in image.segments:
            mem.pieces(seg.paddr, seg.memsz)  # all of it RAM, before anything is written
            mem.write(seg.paddr, seg.data)
            mem.zero(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
        end = _page_up(max(s.paddr + s.memsz for s in image.segments))
        mods = []
        for mod in image.modules:
            mem.write(end, mod.data)
            mods.append((end, end + len(mod.data), mod.cmdline.encode()))
            end = _page_up(end + len(mod.data))
        info = multiboot.build_info(ram_ranges, mods, image.cmdline, end, e820)
        if end + len(info) > 1 << 32:
            raise GuestMemoryError(f"kernel, modules and boot information end at {end + len(info):#x}, above 4 GiB")
        mem.write(end, info)
        if image.kind == "multiboot":
            return Entry("protected", image.entry, layout.MULTIBOOT_BOOTLOADER_MAGIC, end)
        _identity_map(mem, ram_ranges, gib_pages)
    except (GuestMemoryError, ValueError) as e:
        raise BootError(opt, "", f"does not fit in guest RAM: {e}") from None
    return Entry("long", image.entry, layout.MULTIBOOT_BOOTLOADER_MAGIC, end, layout.BOOT_STACK_TOP)


def _identity_map(mem: GuestMemory, ram_ranges: list[tuple[int, int]], gib_pages: bool) -> None:
    """Page tables mapping 4 GiB and all RAM 1:1 (user-accessible: see paging.py)."""
    top = max(layout.FOUR_GIB, max(base + size for base, size in ram_ranges))
    for gpa, blob in paging.identity_map(top, gib_pages):
        mem.write(gpa, blob)


def _load_linux(
    image: BootImage, mem: GuestMemory, ram_ranges: list[tuple[int, int]], e820: list, gib_pages: bool
) -> Entry:
    """A bzImage's protected-mode part, its initrd, command line and zero page; the entry state."""
    kernel = image.linux
    assert kernel is not None
    ram_end = linux.low_ram_end(ram_ranges)
    try:
        load_addr = linux.load_address(kernel, ram_end)
    except linux.LinuxError as e:
        raise BootError("-kernel", image.path, f"does not fit in guest RAM: {e}") from None
    initrd = None
    if image.initrd is not None:
        try:
            initrd = (linux.initrd_address(kernel, load_addr, len(image.initrd), ram_end), len(image.initrd))
        except linux.LinuxError as e:
            raise BootError("-initrd", image.initrd_path, f"does not fit in guest RAM: {e}") from None
    try:
        mem.write(load_addr, kernel.protected)
        mem.zero(load_addr + len(kernel.protected), kernel.memory_needed - len(kernel.protected))
        if initrd is not None:
            mem.write(initrd[0], image.initrd)
        mem.write(layout.CMDLINE_ADDR, image.cmdline + b"\0")
        mem.write(layout.BOOT_PARAMS_ADDR, linux.zero_page(kernel, load_addr, layout.CMDLINE_ADDR, initrd, e820))
        if not kernel.header.kernel_64:
            return Entry("protected", load_addr, rsi=layout.BOOT_PARAMS_ADDR)
        _identity_map(mem, ram_ranges, gib_pages)
    except (GuestMemoryError, ValueError) as e:
        raise BootError("-kernel", image.path, f"does not fit in guest RAM: {e}") from None
    return Entry("long", load_addr + linux.ENTRY64_OFFSET, rsp=layout.BOOT_STACK_TOP, rsi=layout.BOOT_PARAMS_ADDR)


# What a PVH kernel must leave alone below 1 MiB: the boot structures, and the EBDA to the BIOS area.
_PVH_RESERVED = ((0, layout.GUEST_FREE_LOW), (layout.EBDA_ADDR, layout.HIGH_RAM_START))


def _overlaps(a: int, a_end: int, b: int, b_end: int) -> bool:
    return a < b_end and b < a_end


def _load_pvh(image: BootImage, mem: GuestMemory, ram_ranges: list[tuple[int, int]], e820: list) -> Entry:
    """An ELF's segments, its initrd at the top of RAM below 4 GiB, the command line and hvm_start_info."""
    try:
        for seg in image.segments:
            for lo, hi in _PVH_RESERVED:
                if _overlaps(seg.paddr, seg.paddr + seg.memsz, lo, hi):
                    raise GuestMemoryError(
                        f"segment at {seg.paddr:#x}-{seg.paddr + seg.memsz:#x} overlaps the boot area {lo:#x}-{hi:#x}"
                    )
            mem.pieces(seg.paddr, seg.memsz)  # all of it RAM, before anything is written
            mem.write(seg.paddr, seg.data)
            mem.zero(seg.paddr + len(seg.data), seg.memsz - len(seg.data))
    except (GuestMemoryError, ValueError) as e:
        raise BootError("-kernel", image.path, f"does not fit in guest RAM: {e}") from None
    modules = []
    if image.initrd is not None:
        size, top = len(image.initrd), linux.low_ram_end(ram_ranges)
        addr = (top - size) & ~(layout.PAGE_SIZE - 1)
        clash = next((s for s in image.segments if _overlaps(addr, addr + size, s.paddr, s.paddr + s.memsz)), None)
        if size > top or addr < layout.HIGH_RAM_START or clash is not None:
            where = f"the kernel segment at {clash.paddr:#x}" if clash else "1 MiB"
            raise BootError(
                "-initrd",
                image.initrd_path,
                f"does not fit in guest RAM: {size} bytes below {top:#x} (the end of RAM below 4 GiB) run into {where}",
            )
        mem.write(addr, image.initrd)
        modules.append(pvh.Module(addr, size))
    mem.write(layout.CMDLINE_ADDR, image.cmdline + b"\0")
    info = pvh.start_info(layout.PVH_START_INFO_ADDR, layout.CMDLINE_ADDR, modules, e820)
    mem.write(layout.PVH_START_INFO_ADDR, info)
    return Entry("pvh", image.entry, rbx=layout.PVH_START_INFO_ADDR)

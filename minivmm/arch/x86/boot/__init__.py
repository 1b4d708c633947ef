"""Boot loaders: turn -kernel/-initrd/-append/-bios into RAM contents and the
CPU state the guest starts in.

``prepare`` reads and checks the files once, at start-up (bad input fails
before any VM exists). ``load`` writes them into guest RAM; it runs again on
every reset, as QEMU reloads its ROMs. Kinds: multiboot v1 (ELF32 or a.out
kludge, 32-bit protected mode), ELF64 (minivmm's direct long-mode boot) and
flat real-mode firmware for -bios.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minivmm.memory import GuestMemory, GuestMemoryError

from .. import layout, mptable, paging
from . import elf, multiboot


class BootError(ValueError):
    """Bad boot input; ``option`` names the command-line option at fault."""

    def __init__(self, option: str, value: str, message: str) -> None:
        super().__init__(f"{option} {value}: {message}")
        self.option = option


@dataclass
class BootImage:
    kind: str  # "multiboot", "elf64" or "bios"
    path: str
    segments: list[elf.Segment] = field(default_factory=list)
    entry: int = 0
    cmdline: bytes = b""
    modules: list[multiboot.Module] = field(default_factory=list)
    firmware: bytes = b""


@dataclass(frozen=True)
class Entry:
    """Where and how the boot CPU starts: ``mode`` is reset, protected or long."""

    mode: str
    rip: int = 0
    rax: int = 0
    rbx: int = 0
    rsp: int = 0


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
        header = multiboot.find_header(data)
        if header is not None:
            segments, entry = multiboot.load_image(data, header)
            kind = "multiboot"
        elif elf.is_elf(data):
            image = elf.parse(data)
            if image.elf_class != elf.ELFCLASS64 or image.machine != elf.EM_X86_64:
                raise BootError("-kernel", kernel, "32-bit ELF kernel without a multiboot header")
            segments, entry, kind = image.segments, image.entry_paddr(), "elf64"
        elif data[0x202:0x206] == b"HdrS":
            raise BootError("-kernel", kernel, "Linux bzImage kernels are not supported yet")
        else:
            raise BootError("-kernel", kernel, "not a multiboot, ELF64 or Linux kernel image")
    except (elf.ElfError, multiboot.MultibootError) as e:
        raise BootError("-kernel", kernel, str(e)) from None
    cmdline = (kernel + (" " + append if append else "")).encode()
    if len(cmdline) >= layout.CMDLINE_MAX:
        raise BootError("-append", append or "", f"command line longer than {layout.CMDLINE_MAX - 1} bytes")
    modules = []
    for spec in split_modules(initrd or ""):
        modules.append(multiboot.Module(_read("-initrd", spec.split(" ", 1)[0]), spec))
    return BootImage(kind, kernel, segments, entry, cmdline, modules)


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
) -> Entry:
    """Write the image and its boot structures into RAM; return the entry state."""
    if image.kind == "bios":
        return Entry("reset")  # the firmware block is mapped, not loaded
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
        info = multiboot.build_info(ram_ranges, mods, image.cmdline, end)
        if end + len(info) > 1 << 32:
            raise GuestMemoryError(f"kernel, modules and boot information end at {end + len(info):#x}, above 4 GiB")
        mem.write(end, info)
        for gpa, blob in mptable.build(ncpus, cpu_signature, cpu_features):
            mem.write(gpa, blob)
        if image.kind == "multiboot":
            return Entry("protected", image.entry, layout.MULTIBOOT_BOOTLOADER_MAGIC, end)
        top = max(layout.FOUR_GIB, max(base + size for base, size in ram_ranges))
        for gpa, blob in paging.identity_map(top, gib_pages):
            mem.write(gpa, blob)
    except (GuestMemoryError, ValueError) as e:
        raise BootError(opt, "", f"does not fit in guest RAM: {e}") from None
    return Entry("long", image.entry, layout.MULTIBOOT_BOOTLOADER_MAGIC, end, layout.BOOT_STACK_TOP)

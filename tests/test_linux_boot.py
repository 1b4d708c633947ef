"""Booting Linux's way: the bzImage boot protocol (64-bit and 32-bit entry) and PVH, checked by
the shipped conformance guest (guests/linuxboot.S, as linuxboot.bin and linuxpvh.elf) on real KVM,
the errors a bad image or initrd gives, and the pure parts (setup header, zero page, hvm_start_info)
against the offsets of Documentation/arch/x86/boot.rst and zero-page.rst."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, guest
from minivmm.arch.x86 import layout
from minivmm.arch.x86.boot import BootError, elf, linux, prepare, pvh
from minivmm.arch.x86.e820 import memory_map

BZIMAGE = guest("linuxboot.bin")
PVH_ELF = guest("linuxpvh.elf")
PREF_ADDRESS = 0x200000  # linuxboot.ld's LINUXBOOT_ADDR
LOW_HOLES = layout.HIGH_RAM_START - layout.EBDA_ADDR  # not type 1: the EBDA, VGA/ROM hole, ACPI and MP area


def _report(stdout: str) -> dict[str, dict[str, str]]:
    """The guest's lines as {"zeropage": {"loader": "ff", ...}, "e820": [...], "cmdline": text}."""
    seen: dict = {"e820": []}
    for line in stdout.splitlines():
        assert line.startswith("linuxboot: "), line
        word, _, rest = line.removeprefix("linuxboot: ").partition(" ")
        if word.startswith("cmdline="):
            seen["cmdline"] = line.split("cmdline=", 1)[1]
        elif word == "e820" and rest.startswith("addr="):
            seen["e820"].append({k: int(v, 16 if k != "type" else 10) for k, v in re.findall(r"(\S+)=(\S+)", rest)})
        elif word.startswith("boot="):
            seen["boot"] = dict(re.findall(r"(\S+)=(\S+)", line))
        else:
            seen[word if word != "e820" else "e820sum"] = dict(re.findall(r"(\S+)=(\S+)", rest))
    return seen


def _initrd(tmp_path: Path, size: int = 5000) -> tuple[str, bytes]:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    path = tmp_path / "initrd.img"
    path.write_bytes(data)
    return str(path), data


def _check_common(seen: dict, ram: int, cmdline: str, initrd: bytes, cpus: int = 1) -> None:
    assert seen["cmdline"] == cmdline
    e820 = seen["e820"]
    assert [(e["addr"], e["size"], e["type"]) for e in e820] == memory_map(_ram_ranges(ram))
    total = sum(e["size"] for e in e820 if e["type"] == 1)
    assert total == ram - LOW_HOLES
    assert int(seen["e820sum"]["ram"], 16) == total
    assert int(seen["e820sum"]["above4g"], 16) == max(0, ram - layout.RAM_BELOW_4G_WHEN_SPLIT) * (
        ram >= layout.RAM_SPLIT_THRESHOLD
    )
    rd = seen["initrd"]
    addr, size = int(rd["addr"], 16), int(rd["size"], 16)
    assert size == len(initrd) and int(rd["crc"], 16) == zlib.crc32(initrd)
    assert addr % layout.PAGE_SIZE == 0 and addr + size <= min(ram, layout.RAM_BELOW_4G_WHEN_SPLIT)
    assert seen["rsdp"] == {"addr": f"{layout.ACPI_RSDP_ADDR:016x}", "sig": b"RSD PTR "[::-1].hex()}
    # the tables behind it, walked by the guest (guests/acpi.S): checksums, MADT, FADT ports, _S5
    assert seen["acpi"] == {"rsdp": f"{layout.ACPI_RSDP_ADDR:08x}", "rev": "2", "tables": "5", "bad-checksums": "0"}
    assert seen["madt"] == {"cpus": str(cpus), "ioapics": "1", "overrides": "5"}
    assert seen["fadt"] == {"pm1a-evt": "0600", "pm1a-cnt": "0604", "pm-tmr": "0608", "dsdt-s5": "yes"}


def _ram_ranges(ram: int) -> list[tuple[int, int]]:
    if ram < layout.RAM_SPLIT_THRESHOLD:
        return [(0, ram)]
    return [(0, layout.RAM_BELOW_4G_WHEN_SPLIT), (layout.FOUR_GIB, ram - layout.RAM_BELOW_4G_WHEN_SPLIT)]


# --- on KVM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ram", ["128M", "4G"])
def test_bzimage_64bit_entry_gets_what_boot_protocol_promises(vmm, tmp_path, ram):
    path, data = _initrd(tmp_path)
    args = ("-m", ram, "-smp", "2", "-append", "console=ttyS0 quiet", "-initrd", path)
    r = vmm.run("-kernel", BZIMAGE, *args, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK and r.stderr == "", r
    seen = _report(r.stdout)
    size = int(ram[:-1]) << (20 if ram.endswith("M") else 30)
    assert seen["boot"] == {"boot": "bzimage", "entry": "64", "load": f"{PREF_ADDRESS:016x}"}
    assert seen["zeropage"] == {"loader": "ff", "version": "020f", "loadflags": "01", "code32": f"{PREF_ADDRESS:08x}"}
    _check_common(seen, size, "console=ttyS0 quiet", data, cpus=2)
    # at the top of RAM below initrd_addr_max (0x7fffffff) and 4 GiB, page aligned
    top = min(size, 0x80000000)
    assert int(seen["initrd"]["addr"], 16) == (top - len(data)) & ~0xFFF


def test_bzimage_without_xlf_kernel_64_is_entered_at_its_32bit_entry(vmm, tmp_path):
    image = bytearray(Path(BZIMAGE).read_bytes())
    struct.pack_into("<H", image, 0x236, 0)  # xloadflags: no XLF_KERNEL_64
    (tmp_path / "bz32").write_bytes(image)
    path, data = _initrd(tmp_path, 300)
    r = vmm.run("-kernel", str(tmp_path / "bz32"), "-append", "x=1", "-initrd", path, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK and r.stderr == "", r
    seen = _report(r.stdout)
    assert seen["boot"] == {"boot": "bzimage", "entry": "32", "load": f"{PREF_ADDRESS:016x}"}
    assert seen["zeropage"]["loader"] == "ff"
    _check_common(seen, 128 << 20, "x=1", data)


def test_pvh_elf_gets_hvm_start_info(vmm, tmp_path):
    path, data = _initrd(tmp_path, 10000)
    args = ("-m", "256M", "-smp", "3", "-append", "root=/dev/vda", "-initrd", path)
    r = vmm.run("-kernel", PVH_ELF, *args, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK and r.stderr == "", r
    seen = _report(r.stdout)
    assert seen["boot"] == {"boot": "pvh", "entry": "32", "load": f"{PREF_ADDRESS:016x}"}
    assert seen["pvh"] == {"magic": "336ec578", "version": "1", "modules": "1"}
    _check_common(seen, 256 << 20, "root=/dev/vda", data, cpus=3)


def test_pvh_without_initrd_has_no_module(vmm):
    r = vmm.run("-kernel", PVH_ELF, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    seen = _report(r.stdout)
    assert seen["pvh"]["modules"] == "0" and seen["cmdline"] == ""
    assert seen["initrd"] == {"addr": "0" * 16, "size": "0" * 16, "crc": "00000000"}


@pytest.mark.parametrize("kernel", [BZIMAGE, PVH_ELF])
def test_power_off_through_pm1a_cnt_exits_with_status_0(vmm, kernel):
    r = vmm.run("-kernel", kernel, "-append", "poweroff", *DEBUG_EXIT)
    assert r.status == 0, r
    assert r.stdout.endswith("linuxboot: poweroff\n") and r.stderr == ""


def _patched(tmp_path: Path, name: str, **fields: int) -> str:
    image = bytearray(Path(BZIMAGE).read_bytes())
    for field, value in fields.items():
        offset, fmt, _since = linux.FIELDS[field]
        struct.pack_into("<" + fmt, image, offset, value)
    (tmp_path / name).write_bytes(image)
    return str(tmp_path / name)


def _one_line_error(result, *fragments: str) -> None:
    assert result.status == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minivmm: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_images_and_initrds_are_one_line_each(vmm, tmp_path):
    truncated = tmp_path / "truncated"
    truncated.write_bytes(Path(BZIMAGE).read_bytes()[:0x300])
    _one_line_error(vmm.run("-kernel", str(truncated)), f"-kernel {truncated}: truncated")
    old = _patched(tmp_path, "old", version=0x0205)
    _one_line_error(vmm.run("-kernel", old), f"-kernel {old}: Linux boot protocol 2.05 is too old")
    low = _patched(tmp_path, "low", loadflags=0)
    _one_line_error(vmm.run("-kernel", low), f"-kernel {low}: loadflags lacks LOADED_HIGH")
    path, _data = _initrd(tmp_path)
    capped = _patched(tmp_path, "capped", initrd_addr_max=PREF_ADDRESS - 1)  # below the kernel itself
    _one_line_error(vmm.run("-kernel", capped, "-initrd", path), f"-initrd {path}: does not fit in guest RAM")
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(40 << 20)
    _one_line_error(vmm.run("-kernel", BZIMAGE, "-m", "32M", "-initrd", str(big)), f"-initrd {big}: does not fit")
    _one_line_error(vmm.run("-kernel", PVH_ELF, "-m", "32M", "-initrd", str(big)), f"-initrd {big}: does not fit")
    _one_line_error(vmm.run("-kernel", BZIMAGE, "-append", "x" * 2048), "-append", "longer than the kernel's 2047")
    bare = tmp_path / "bare.elf"
    bare.write_bytes(_without_notes(Path(guest("long64.elf")).read_bytes()))
    _one_line_error(vmm.run("-kernel", str(bare)), f"-kernel {bare}: ELF64 kernel with neither a PVH entry note")


def _without_notes(image: bytes) -> bytes:
    """An ELF64 whose PT_NOTE program headers are made PT_NULL: no marker, no PVH note."""
    data = bytearray(image)
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == elf.PT_NOTE:
            struct.pack_into("<I", data, phoff + i * phentsize, 0)
    return bytes(data)


# --- without a VM ------------------------------------------------------------------------------

# boot.rst's table of the setup header: offset, size
BOOT_RST = {
    "setup_sects": (0x1F1, 1),
    "boot_flag": (0x1FE, 2),
    "version": (0x206, 2),
    "type_of_loader": (0x210, 1),
    "loadflags": (0x211, 1),
    "code32_start": (0x214, 4),
    "ramdisk_image": (0x218, 4),
    "ramdisk_size": (0x21C, 4),
    "cmd_line_ptr": (0x228, 4),
    "initrd_addr_max": (0x22C, 4),
    "kernel_alignment": (0x230, 4),
    "relocatable_kernel": (0x234, 1),
    "xloadflags": (0x236, 2),
    "cmdline_size": (0x238, 4),
    "payload_offset": (0x248, 4),
    "payload_length": (0x24C, 4),
    "pref_address": (0x258, 8),
    "init_size": (0x260, 4),
}


def test_setup_header_fields_are_at_boot_rst_offsets():
    assert {k: (o, struct.calcsize("<" + f)) for k, (o, f, _v) in linux.FIELDS.items()} == BOOT_RST
    # zero-page.rst
    assert (linux.BP_ACPI_RSDP_ADDR, linux.BP_EXT_RAMDISK_IMAGE, linux.BP_EXT_RAMDISK_SIZE) == (0x070, 0x0C0, 0x0C4)
    assert (linux.BP_EXT_CMD_LINE_PTR, linux.BP_E820_ENTRIES, linux.BP_E820_TABLE) == (0x0C8, 0x1E8, 0x2D0)
    assert linux.E820_ENTRY.size == 20 and linux.BP_E820_TABLE + 128 * 20 <= 0x1000


def test_shipped_bzimage_header_parses():
    k = linux.parse(Path(BZIMAGE).read_bytes())
    h = k.header
    assert (h.version, h.setup_sects, h.loadflags, h.xloadflags) == (0x020F, 1, linux.LOADED_HIGH, 1)
    assert h.relocatable and h.kernel_alignment == 0x200000 and h.pref_address == PREF_ADDRESS
    assert (h.cmdline_size, h.initrd_addr_max, h.code32_start) == (2047, 0x7FFFFFFF, PREF_ADDRESS)
    assert h.init_size >= len(k.protected) and h.init_size % 4096 == 0
    assert h.raw[:1] == b"\x01" and h.raw[0x202 - 0x1F1 :][:4] == b"HdrS"


def test_setup_sects_0_means_4():
    image = bytearray(Path(BZIMAGE).read_bytes())
    image[0x1F1] = 0
    image[0x400:0x400] = bytes(3 * 512)  # the protected-mode part now starts at 5 * 512
    k = linux.parse(bytes(image))
    assert k.header.setup_sects == 4 and k.protected == Path(BZIMAGE).read_bytes()[0x400:]


def test_zero_page_fields():
    k = linux.parse(Path(BZIMAGE).read_bytes())
    e820 = memory_map(_ram_ranges(5 << 30))
    page = linux.zero_page(k, 0x1000000, layout.CMDLINE_ADDR, (0x1_2345_6000, 0x1_0000_0010), e820)
    assert len(page) == 4096
    u8, u16, u32, u64 = (lambda o, f=f: struct.unpack_from(f, page, o)[0] for f in ("<B", "<H", "<I", "<Q"))
    assert page[0x202:0x206] == b"HdrS" and u16(0x206) == 0x020F and u8(0x1F1) == 1  # the header, copied in
    assert u64(0x258) == PREF_ADDRESS and u32(0x260) == k.header.init_size and u32(0x238) == 2047
    assert u8(0x210) == 0xFF and u32(0x214) == 0x1000000
    assert u32(0x228) == layout.CMDLINE_ADDR and u32(0x0C8) == 0
    assert (u32(0x218), u32(0x0C0), u32(0x21C), u32(0x0C4)) == (0x2345_6000, 1, 0x10, 1)
    assert u64(0x070) == layout.ACPI_RSDP_ADDR
    assert u8(0x1E8) == len(e820) == 5
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(5)]
    assert table == e820 and table[-1] == (layout.FOUR_GIB, 2 << 30, 1)


def _kernel(**kw) -> linux.Kernel:
    h = linux.parse(Path(BZIMAGE).read_bytes()).header
    fields = {**h.__dict__, **kw}
    return linux.Kernel(linux.SetupHeader(**fields), bytes(0x1000))


def test_load_address_policy():
    assert linux.load_address(_kernel(), 128 << 20) == PREF_ADDRESS  # relocatable, fits
    big = _kernel(pref_address=0x1000000, init_size=0x3000000)
    assert linux.load_address(big, 0x3800000) == 0x200000  # pref does not fit: 1 MiB up to the alignment
    assert linux.load_address(_kernel(pref_address=0x9000), 128 << 20) == 0x200000  # below 1 MiB: ignored
    assert linux.load_address(_kernel(relocatable=False, pref_address=0x1000000), 128 << 20) == 0x100000
    with pytest.raises(linux.LinuxError, match="needs 0x3000000 bytes of RAM from 0x200000"):
        linux.load_address(big, 0x2000000)


def test_initrd_placement():
    k = _kernel()
    assert linux.initrd_address(k, PREF_ADDRESS, 5000, 128 << 20) == (128 << 20) - 0x2000
    assert linux.initrd_address(k, PREF_ADDRESS, 4096, 3 << 30) == 0x80000000 - 0x1000  # initrd_addr_max
    with pytest.raises(linux.LinuxError, match="do not fit between the kernel's end"):
        linux.initrd_address(k, PREF_ADDRESS, 128 << 20, 128 << 20)


def test_pvh_note_and_start_info():
    image = elf.parse(Path(PVH_ELF).read_bytes())
    assert pvh.entry_point(image) is not None
    e820 = memory_map(_ram_ranges(128 << 20))
    blob = pvh.start_info(0x8000, layout.CMDLINE_ADDR, [pvh.Module(0x7000000, 123)], e820)
    magic, version, flags, nr, modlist, cmdline, rsdp, memmap, entries, res = pvh.START_INFO.unpack_from(blob)
    assert (magic, version, flags, nr, cmdline, rsdp) == (0x336EC578, 1, 0, 1, layout.CMDLINE_ADDR, 0xE0000)
    assert (memmap, entries, res) == (0x8000 + 56, 4, 0) and pvh.START_INFO.size == 56
    assert [struct.unpack_from("<QQII", blob, memmap - 0x8000 + 24 * i)[:3] for i in range(4)] == e820
    assert modlist == memmap + 4 * 24 and struct.unpack_from("<QQQQ", blob, modlist - 0x8000) == (0x7000000, 123, 0, 0)


def test_pvh_entry_note_sizes():
    def image(desc: bytes) -> elf.ElfImage:
        return elf.ElfImage(2, 62, 0, [], [elf.Note(b"Xen", 18, desc)])

    assert pvh.entry_point(image(struct.pack("<Q", 0x1000000))) == 0x1000000
    with pytest.raises(pvh.PvhError, match="above 4 GiB"):
        pvh.entry_point(image(struct.pack("<Q", 1 << 32)))
    with pytest.raises(pvh.PvhError, match="2 bytes"):
        pvh.entry_point(image(b"\0\0"))


def test_notes_that_run_past_their_segment_are_refused():
    with pytest.raises(elf.ElfError, match="past the end"):
        elf.parse_notes(struct.pack("<III", 4, 100, 18) + b"Xen\0")


def test_prepare_refuses_an_elf64_without_notes(tmp_path):
    bare = tmp_path / "bare.elf"
    bare.write_bytes(_without_notes(Path(guest("long64.elf")).read_bytes()))
    with pytest.raises(BootError, match="neither a PVH entry note"):
        prepare(str(bare), None, None, None)
    assert prepare(guest("long64.elf"), None, None, None).kind == "elf64"
    assert prepare(PVH_ELF, None, None, None).kind == "pvh"
    assert prepare(BZIMAGE, None, None, None).kind == "linux"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0x1F1, 0x40F), st.integers(0, 255)), max_size=12), st.integers(0x200, 0x9000))
def test_crafted_headers_give_linux_errors_only(edits, cut):
    """Any bytes in the setup area, any length: parse and plan either work or raise LinuxError."""
    image = bytearray(Path(BZIMAGE).read_bytes()[:cut])
    for offset, value in edits:
        if offset < len(image):
            image[offset] = value
    try:
        k = linux.parse(bytes(image))
        ram_end = 64 << 20
        addr = linux.load_address(k, ram_end)
        assert addr >= layout.HIGH_RAM_START and addr + k.memory_needed <= ram_end
        rd = linux.initrd_address(k, addr, 4096, ram_end)
        assert rd >= addr + k.memory_needed and rd + 4096 <= ram_end
        assert len(linux.zero_page(k, addr, layout.CMDLINE_ADDR, (rd, 4096), [])) == 4096
    except linux.LinuxError:
        pass


def _note_offset(image: bytes) -> int:
    phoff, phentsize, phnum = struct.unpack_from("<Q", image, 32)[0], *struct.unpack_from("<HH", image, 54)
    headers = (struct.unpack_from("<IIQ", image, phoff + i * phentsize) for i in range(phnum))
    return next(offset for p_type, _flags, offset in headers if p_type == elf.PT_NOTE)


_PVH_NOTE_AT = _note_offset(Path(PVH_ELF).read_bytes())  # the Xen note: mangled along with the headers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from([*range(0, 0xB0), *range(_PVH_NOTE_AT - 8, _PVH_NOTE_AT + 24)]), st.integers(0, 255)),
        max_size=12,
    ),
    st.integers(0, 0x9000),
)
def test_crafted_pvh_elfs_give_elf_or_pvh_errors_only(edits, cut):
    """Program headers, notes and their sizes from a mangled linuxpvh.elf: ElfError or PvhError, nothing else."""
    image = bytearray(Path(PVH_ELF).read_bytes()[:cut])
    for offset, value in edits:
        if offset < len(image):
            image[offset] = value
    try:
        entry = pvh.entry_point(elf.parse(bytes(image)))
        assert entry is None or 0 <= entry < layout.FOUR_GIB
    except (elf.ElfError, pvh.PvhError):
        pass

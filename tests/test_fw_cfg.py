"""fw_cfg as a guest drives it: the selector and data ports (kvm-unit-tests'
fwcfg_get_u16(FW_CFG_NB_CPUS)), the file directory, DMA through a fake guest
memory that raises GuestMemoryError outside its range, and the state through
its VMSTATE. Hypothesis with a fixed seed tries any sequence of port accesses
and DMA descriptors: nothing raises, reads fit their size. No VM is started."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm.arch.x86 import layout
from minivmm.devices import fw_cfg
from minivmm.devices.bus import Bus
from minivmm.memory import GuestMemoryError
from minivmm.vmstate import StateWriter, VMStateError, decode, encode, read_blob

MIB = 1 << 20
DESC = 0x1000  # where the tests put FWCfgDmaAccess records
BUF = 0x2000  # where DMA reads go


class FakeMemory:
    """Guest RAM at [base, base+size): out-of-range reads and writes raise GuestMemoryError, as GuestMemory's do."""

    def __init__(self, size: int = 64 * 1024, base: int = 0) -> None:
        self.base, self.buf = base, bytearray(size)
        self.writes: list[tuple[int, int]] = []

    def _check(self, gpa: int, n: int) -> int:
        if gpa < self.base or n < 0 or gpa + n > self.base + len(self.buf):
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{n:#x} is not RAM")
        return gpa - self.base

    def read(self, gpa: int, length: int) -> bytes:
        at = self._check(gpa, length)
        return bytes(self.buf[at : at + length])

    def write(self, gpa: int, data: bytes) -> None:
        at = self._check(gpa, len(data))
        self.buf[at : at + len(data)] = data
        self.writes.append((gpa, len(data)))


def bus_with(dev: fw_cfg.FwCfg) -> Bus:
    bus = Bus("port I/O")
    bus.register(layout.PORT_FW_CFG, layout.FW_CFG_PORTS_SIZE, dev)
    return bus


def select(bus: Bus, key: int) -> None:
    bus.write(layout.PORT_FW_CFG, 2, key)  # outw(key, 0x510)


def read_item(bus: Bus, key: int, n: int) -> bytes:
    """kvm-unit-tests' fwcfg_get_u: select, then n byte reads of 0x511."""
    select(bus, key)
    return bytes(bus.read(layout.PORT_FW_CFG + 1, 1) for _ in range(n))


def be32_port(value: int) -> int:
    """What outl(cpu_to_be32(value)) puts on the port: the bytes of the big-endian value, read little-endian."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def dma(bus: Bus, mem: FakeMemory, control: int, length: int, address: int, at: int = DESC) -> int:
    """Write a FWCfgDmaAccess at ``at``, start it through the ports, return the control word written back."""
    mem.write(at, struct.pack(">IIQ", control, length, address))
    bus.write(layout.PORT_FW_CFG_DMA, 4, be32_port(at >> 32))
    bus.write(layout.PORT_FW_CFG_DMA + 4, 4, be32_port(at & 0xFFFFFFFF))
    return struct.unpack(">I", mem.read(at, 4))[0]


@pytest.fixture
def mem() -> FakeMemory:
    return FakeMemory()


@pytest.fixture
def dev(mem) -> fw_cfg.FwCfg:
    d = fw_cfg.pc(mem, ncpus=3, ram_size=256 * MIB, e820=[(0, 0x9FC00, 1), (0xFEFFC000, 0x4000, 2)])
    d.add_file("etc/boot-fail-wait", struct.pack("<I", 5))
    return d


@pytest.fixture
def bus(dev) -> Bus:
    return bus_with(dev)


# --- the traditional interface ------------------------------------------------------------------------


def test_signature_and_id_through_the_ports(bus):
    assert read_item(bus, fw_cfg.SIGNATURE, 4) == b"QEMU"
    assert read_item(bus, fw_cfg.ID, 4) == struct.pack("<I", 3)  # traditional and DMA


def test_power_on_selects_the_signature(bus, dev):
    assert bytes(bus.read(layout.PORT_FW_CFG + 1, 1) for _ in range(4)) == b"QEMU"
    select(bus, fw_cfg.NB_CPUS)
    bus.read(layout.PORT_FW_CFG + 1, 1)
    dev.reset()
    assert (dev.s.selector, dev.s.offset, dev.s.dma_addr) == (fw_cfg.SIGNATURE, 0, 0)


def test_without_dma(mem):
    bus = bus_with(fw_cfg.FwCfg(None))
    assert read_item(bus, fw_cfg.ID, 4) == struct.pack("<I", 1)
    assert bus.read(layout.PORT_FW_CFG_DMA, 4) == 0xFFFFFFFF
    bus.write(layout.PORT_FW_CFG_DMA + 4, 4, 0x10)  # nothing happens


def test_nb_cpus_max_cpus_ram_size(bus):
    assert struct.unpack("<H", read_item(bus, fw_cfg.NB_CPUS, 2)) == (3,)
    assert struct.unpack("<H", read_item(bus, fw_cfg.MAX_CPUS, 2)) == (3,)
    assert struct.unpack("<Q", read_item(bus, fw_cfg.RAM_SIZE, 8)) == (256 * MIB,)
    assert struct.unpack("<I", read_item(bus, fw_cfg.IRQ0_OVERRIDE, 4)) == (1,)
    assert struct.unpack("<H", read_item(bus, fw_cfg.NOGRAPHIC, 2)) == (1,)
    assert struct.unpack("<H", read_item(bus, fw_cfg.BOOT_MENU, 2)) == (0,)
    assert read_item(bus, fw_cfg.UUID, 16) == bytes(16)


def test_reading_past_the_end_gives_zeros(bus, dev):
    assert read_item(bus, fw_cfg.NB_CPUS, 6) == b"\x03\x00\x00\x00\x00\x00"
    assert dev.s.offset == 2, "the offset stops at the item's end"
    assert read_item(bus, 0x1F, 4) == bytes(4), "no such item"
    assert read_item(bus, 0x3FFF, 4) == bytes(4)
    assert read_item(bus, fw_cfg.ACPI_TABLES, 2) == bytes(2), "no user ACPI tables: an empty item"


def test_selecting_rewinds_and_the_write_channel_bit_is_ignored(bus):
    assert read_item(bus, fw_cfg.SIGNATURE, 2) == b"QE"
    assert read_item(bus, fw_cfg.SIGNATURE, 2) == b"QE"
    assert read_item(bus, fw_cfg.WRITE_CHANNEL | fw_cfg.NB_CPUS, 2) == b"\x03\x00"


def test_other_accesses_are_harmless(bus, dev):
    select(bus, fw_cfg.SIGNATURE)
    bus.write(layout.PORT_FW_CFG + 1, 1, 0x55)  # data writes are ignored
    bus.write(layout.PORT_FW_CFG, 4, fw_cfg.NB_CPUS)  # only 16-bit writes select
    assert bus.read(layout.PORT_FW_CFG + 1, 2) == 0xFFFF, "only byte reads"
    assert bus.read(layout.PORT_FW_CFG + 2, 1) == 0xFF
    assert bytes(bus.read(layout.PORT_FW_CFG, 1) for _ in range(4)) == b"QEMU", "0x510 reads data too"


def test_legacy_e820_and_the_e820_file(bus, dev):
    legacy = read_item(bus, fw_cfg.E820_TABLE, 4 + 16 * 20)
    assert struct.unpack_from("<I", legacy) == (1,)
    assert struct.unpack_from("<QQI", legacy, 4) == (0xFEFFC000, 0x4000, 2)
    sel = dev.file_selector("etc/e820")
    data = read_item(bus, sel, 40)
    assert [struct.unpack_from("<QQI", data, i) for i in (0, 20)] == [(0, 0x9FC00, 1), (0xFEFFC000, 0x4000, 2)]


# --- the file directory ----------------------------------------------------------------------------------


def parse_dir(raw: bytes) -> list[tuple[int, int, str]]:
    (count,) = struct.unpack_from(">I", raw)
    out = []
    for i in range(count):
        size, sel, reserved, name = struct.unpack_from(">IHH56s", raw, 4 + 64 * i)
        assert reserved == 0 and name.count(b"\0") >= 1
        out.append((size, sel, name.rstrip(b"\0").decode()))
    return out


def test_file_directory_bytes(bus, dev):
    dev.add_file("a/first", b"hello")
    raw = read_item(bus, fw_cfg.FILE_DIR, 4 + 3 * 64)
    assert raw[:4] == b"\x00\x00\x00\x03"
    assert parse_dir(raw) == [(5, 0x20, "a/first"), (4, 0x21, "etc/boot-fail-wait"), (40, 0x22, "etc/e820")]
    assert raw[4:12] == b"\x00\x00\x00\x05\x00\x20\x00\x00"
    assert raw[12:20] == b"a/first\0"
    assert read_item(bus, 0x20, 5) == b"hello"
    assert read_item(bus, dev.file_selector("etc/boot-fail-wait"), 4) == b"\x05\x00\x00\x00"
    assert read_item(bus, fw_cfg.FILE_DIR, 4 + 3 * 64 + 4)[-4:] == bytes(4)


def test_add_file_refuses_duplicates_and_long_names(dev):
    with pytest.raises(ValueError, match="already exists"):
        dev.add_file("etc/e820", b"")
    with pytest.raises(ValueError, match="1 to 55 bytes"):
        dev.add_file("x" * 56, b"")
    with pytest.raises(ValueError, match="1 to 55 bytes"):
        dev.add_file("", b"")
    with pytest.raises(ValueError, match="1 to 55 bytes"):
        dev.add_file("a\0b", b"")
    dev.add_file("y" * 55, b"ok")
    assert dev.files["y" * 55] == b"ok"


def test_file_slots_are_bounded():
    d = fw_cfg.FwCfg(None, file_slots=2)
    d.add_file("a", b"")
    d.add_file("b", b"")
    with pytest.raises(ValueError, match="file slots"):
        d.add_file("c", b"")


def test_add_bytes_refuses_bad_keys(dev):
    with pytest.raises(ValueError, match="already set"):
        dev.add_i16(fw_cfg.NB_CPUS, 4)
    for key in (fw_cfg.FILE_DIR, fw_cfg.FILE_FIRST, 0x4005, 0x10000, -1):
        with pytest.raises(ValueError, match="not a fixed item key"):
            dev.add_bytes(key, b"")


def test_kernel_initrd_cmdline_items(mem):
    d = fw_cfg.FwCfg(mem)
    d.add_kernel(0x100000, b"K" * 10, entry=0x100200)
    d.add_setup(0x10000, b"S" * 3)
    d.add_initrd(0x7000000, b"I" * 7)
    d.add_cmdline(0x20000, "console=ttyS0")
    bus = bus_with(d)
    u32 = lambda key: struct.unpack("<I", read_item(bus, key, 4))[0]  # noqa: E731
    assert (u32(fw_cfg.KERNEL_ADDR), u32(fw_cfg.KERNEL_SIZE), u32(fw_cfg.KERNEL_ENTRY)) == (0x100000, 10, 0x100200)
    assert (u32(fw_cfg.SETUP_ADDR), u32(fw_cfg.SETUP_SIZE)) == (0x10000, 3)
    assert (u32(fw_cfg.INITRD_ADDR), u32(fw_cfg.INITRD_SIZE)) == (0x7000000, 7)
    assert (u32(fw_cfg.CMDLINE_ADDR), u32(fw_cfg.CMDLINE_SIZE)) == (0x20000, 14)
    assert read_item(bus, fw_cfg.KERNEL_DATA, 10) == b"K" * 10
    assert read_item(bus, fw_cfg.CMDLINE_DATA, 14) == b"console=ttyS0\0"


def test_pc_argument_checks():
    with pytest.raises(ValueError, match="uuid"):
        fw_cfg.pc(None, ncpus=1, ram_size=MIB, uuid=b"x")
    with pytest.raises(ValueError, match="max_cpus=1"):
        fw_cfg.pc(None, ncpus=2, max_cpus=1, ram_size=MIB)
    with pytest.raises(ValueError, match="ncpus=0"):
        fw_cfg.pc(None, ncpus=0, ram_size=MIB)


# --- DMA ------------------------------------------------------------------------------------------------------


def test_dma_signature_reads(bus):
    sig = b"".join(bus.read(layout.PORT_FW_CFG_DMA + i, 1).to_bytes(1, "little") for i in range(8))
    assert sig == b"QEMU CFG"
    assert bus.read(layout.PORT_FW_CFG_DMA, 4).to_bytes(4, "little") == b"QEMU"
    assert bus.read(layout.PORT_FW_CFG_DMA + 4, 4).to_bytes(4, "little") == b" CFG"
    assert bus.read(layout.PORT_FW_CFG_DMA + 6, 4).to_bytes(4, "little") == b"FG\xff\xff"


def test_dma_read_of_an_item(bus, mem, dev):
    ctl = fw_cfg.DMA_SELECT | fw_cfg.DMA_READ | fw_cfg.NB_CPUS << 16
    assert dma(bus, mem, ctl, 2, BUF) == 0
    assert mem.read(BUF, 2) == b"\x03\x00"
    assert dev.s.selector == fw_cfg.NB_CPUS and dev.s.offset == 2 and dev.s.dma_addr == 0


def test_dma_reads_continue_where_the_last_stopped(bus, mem):
    assert dma(bus, mem, fw_cfg.DMA_SELECT | fw_cfg.DMA_READ | fw_cfg.FILE_DIR << 16, 4, BUF) == 0
    (count,) = struct.unpack(">I", mem.read(BUF, 4))
    assert dma(bus, mem, fw_cfg.DMA_READ, 64 * count, BUF + 4) == 0
    names = [n for _, _, n in parse_dir(mem.read(BUF, 4 + 64 * count))]
    assert names == ["etc/boot-fail-wait", "etc/e820"]
    # The traditional interface shares the offset: the directory is used up.
    assert bus.read(layout.PORT_FW_CFG + 1, 1) == 0


def test_dma_skip_and_select(bus, mem):
    assert dma(bus, mem, fw_cfg.DMA_SELECT | fw_cfg.DMA_SKIP | fw_cfg.SIGNATURE << 16, 2, 0) == 0
    assert dma(bus, mem, fw_cfg.DMA_READ, 2, BUF) == 0
    assert mem.read(BUF, 2) == b"MU"
    assert dma(bus, mem, fw_cfg.DMA_SELECT | fw_cfg.NB_CPUS << 16, 100, BUF) == 0  # select only
    assert bus.read(layout.PORT_FW_CFG + 1, 1) == 3


def test_dma_absurd_length_reads_only_what_exists(bus, mem, dev):
    mem.buf[BUF : BUF + 16] = b"\xaa" * 16
    assert dma(bus, mem, fw_cfg.DMA_SELECT | fw_cfg.DMA_READ | fw_cfg.SIGNATURE << 16, 0xFFFFFFFF, BUF) == 0
    assert mem.read(BUF, 8) == b"QEMU" + b"\xaa" * 4
    assert dev.s.offset == 4
    assert dma(bus, mem, fw_cfg.DMA_READ, 0xFFFFFFFF, BUF) == 0, "at the end: nothing more to copy"
    assert dma(bus, mem, fw_cfg.DMA_SELECT | fw_cfg.DMA_READ | 0x3FFF << 16, 0xFFFFFFFF, BUF) == 0, "no such item"
    assert mem.read(BUF, 8) == b"QEMU" + b"\xaa" * 4


@pytest.mark.parametrize("address", [len(FakeMemory().buf) - 1, 1 << 40, (1 << 64) - 1, 0xFFFFFFFFFFFFFFF0])
def test_dma_to_an_address_outside_ram_sets_error(bus, mem, dev, address):
    ctl = fw_cfg.DMA_SELECT | fw_cfg.DMA_READ | fw_cfg.RAM_SIZE << 16
    assert dma(bus, mem, ctl, 8, address) == fw_cfg.DMA_ERROR
    assert dev.s.offset == 0, "a failed read consumes nothing"


def test_dma_descriptor_outside_ram_is_dropped(bus, mem, dev):
    before = bytes(mem.buf)
    for at in (len(mem.buf) - 8, len(mem.buf), 1 << 63):
        bus.write(layout.PORT_FW_CFG_DMA, 4, be32_port(at >> 32))
        bus.write(layout.PORT_FW_CFG_DMA + 4, 4, be32_port(at & 0xFFFFFFFF))
        assert dev.s.dma_addr == 0
    end = len(mem.buf) - 8
    assert mem.buf[:end] == before[:end]
    assert struct.unpack(">I", mem.read(end, 4)) == (fw_cfg.DMA_ERROR,), "ERROR where the control word is in RAM"


def test_dma_write_requests_are_refused(bus, mem, dev):
    ctl = fw_cfg.DMA_SELECT | fw_cfg.DMA_WRITE | dev.file_selector("etc/boot-fail-wait") << 16
    assert dma(bus, mem, ctl, 4, BUF) == fw_cfg.DMA_ERROR
    assert read_item(bus, dev.file_selector("etc/boot-fail-wait"), 4) == b"\x05\x00\x00\x00"
    assert dma(bus, mem, fw_cfg.DMA_WRITE, 0, BUF) == 0, "an empty write moves nothing"
    assert dma(bus, mem, fw_cfg.DMA_WRITE | fw_cfg.DMA_SKIP, 4, BUF) == fw_cfg.DMA_ERROR
    ctl = fw_cfg.DMA_SELECT | fw_cfg.DMA_READ | fw_cfg.DMA_WRITE | fw_cfg.SIGNATURE << 16
    assert dma(bus, mem, ctl, 4, BUF) == 0, "READ wins over WRITE, as in QEMU"


def test_dma_above_4g_uses_both_halves():
    mem = FakeMemory(base=(1 << 32) + 0x10000)
    bus = bus_with(fw_cfg.FwCfg(mem))
    at = mem.base + 0x100
    assert dma(bus, mem, fw_cfg.DMA_SELECT | fw_cfg.DMA_READ, 4, mem.base + 0x200, at=at) == 0
    assert mem.read(mem.base + 0x200, 4) == b"QEMU"


def test_dma_address_register_takes_only_32_bit_writes(bus, dev):
    bus.write(layout.PORT_FW_CFG_DMA, 2, 0x1234)
    bus.write(layout.PORT_FW_CFG_DMA, 1, 0x12)
    assert dev.s.dma_addr == 0
    bus.write(layout.PORT_FW_CFG_DMA, 4, be32_port(0x12345678))
    assert dev.s.dma_addr == 0x12345678 << 32


# --- state ------------------------------------------------------------------------------------------------------


def round_trip(dev: fw_cfg.FwCfg) -> fw_cfg.FwCfgState:
    w = StateWriter()
    w.add(dev.vmstate, dev.save_state())
    (section,) = read_blob(w.blob())
    loaded = decode(dev.vmstate, section.payload, section.version)
    assert loaded == dev.s
    return loaded


def test_state_saves_and_loads(bus, dev, mem):
    select(bus, fw_cfg.RAM_SIZE)
    bus.read(layout.PORT_FW_CFG + 1, 1)
    bus.write(layout.PORT_FW_CFG_DMA, 4, be32_port(7))
    state = round_trip(dev)
    other = fw_cfg.pc(mem, ncpus=3, ram_size=256 * MIB)
    other.load_state(state)
    assert (other.s.selector, other.s.offset, other.s.dma_addr) == (fw_cfg.RAM_SIZE, 1, 7 << 32)
    assert bytes(other.read(1, 1) for _ in range(3)) == struct.pack("<Q", 256 * MIB)[1:4]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(selector=0, offset=0xFFFFFFFF, dma_addr=0), "offset"),
        (dict(selector=0, offset=0, dma_addr=1), "dma_addr"),
    ],
)
def test_bad_state_is_refused(fields, message):
    blob = encode(fw_cfg.VMSTATE, fields)
    with pytest.raises(VMStateError, match=message):
        decode(fw_cfg.VMSTATE, blob, fw_cfg.VMSTATE.version_id)


# --- anything a guest can do ---------------------------------------------------------------------------------------

FUZZ = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SIZES = st.sampled_from([1, 2, 4])
KEYS = st.one_of(
    st.sampled_from([0, 1, 3, 5, 0x19, 0x20, 0x21, 0x22, 0x8000, 0x8002, 0x8003, 0x4005, 0xFFFF]),
    st.integers(0, 0xFFFF),
)
CONTROL = st.builds(
    lambda bits, key: bits | key << 16,
    st.integers(0, 0xFFFF),
    KEYS,
)
ADDRESS = st.one_of(st.integers(0, 0x11000), st.integers(0, (1 << 64) - 1))
PORT_OP = st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 11), SIZES, st.integers(0, 0xFFFFFFFF))
DMA_OP = st.tuples(st.just("dma"), CONTROL, st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)), ADDRESS, ADDRESS)


@FUZZ
@given(ops=st.lists(st.one_of(PORT_OP, DMA_OP), max_size=40))
def test_any_port_access_and_dma_descriptor(ops):
    mem = FakeMemory(size=0x10000)
    dev = fw_cfg.pc(mem, ncpus=2, ram_size=MIB, e820=[(0, MIB, 1)])
    dev.add_file("etc/big", bytes(range(256)) * 64)
    for op in ops:
        if op[0] == "r":
            _, offset, size, _ = op
            value = dev.read(offset, size)
            assert 0 <= value < 1 << (8 * size)
        elif op[0] == "w":
            _, offset, size, value = op
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            _, control, length, address, at = op
            try:
                mem.write(at, struct.pack(">IIQ", control, length, address))
            except GuestMemoryError:
                pass  # the descriptor is outside RAM: the device must cope
            dev.write(fw_cfg.OFF_DMA_HIGH, 4, be32_port(at >> 32 & 0xFFFFFFFF))
            dev.write(fw_cfg.OFF_DMA_LOW, 4, be32_port(at & 0xFFFFFFFF))
            assert dev.s.dma_addr == 0
        item = dev.items.get(dev.s.selector & ~fw_cfg.WRITE_CHANNEL, b"")
        assert 0 <= dev.s.offset <= len(item)
        assert len(mem.buf) == 0x10000
    round_trip(dev)

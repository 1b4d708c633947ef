"""A PCI bus the way a PC presents it: configuration mechanism #1 at ports
0xcf8 (address) and 0xcfc-0xcff (data), one bus, a host bridge at 00:00.0
(the i440FX here; q35's MCH in q35.py, which adds PCI Express enhanced
configuration: pcie.py), and the devices ``-device`` adds in the next slots.

minivmm has no firmware for a direct kernel boot, so it does what firmware
would: each device's BARs get addresses (memory from PCI_MMIO_BASE, I/O
from PCI_IO_BASE) and decoding is enabled before the guest runs. A guest
may size and move BARs as it likes: a BAR write moves the device's range on
the machine's buses (``remap``), and clearing the memory or I/O enable bit
in the command register takes the ranges off.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.arch.x86.layout import PAGE_SIZE
from minivmm.devices.device import Device
from minivmm.vmstate import VMSD, Field

CONFIG_SIZE = 256  # a conventional function's configuration space
EXT_CONFIG_SIZE = 4096  # a PCI Express function's, as ECAM addresses it
VENDOR, DEVICE, COMMAND, STATUS, REVISION, CLASS_PROG = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
HEADER_TYPE, BAR0, SUBSYS_VENDOR, SUBSYS_ID, INTERRUPT_LINE, INTERRUPT_PIN = 0x0E, 0x10, 0x2C, 0x2E, 0x3C, 0x3D
CAPABILITIES = 0x34
ROM_ADDRESS, ROM_ENABLE = 0x30, 0x1  # the expansion ROM BAR: address bits 31-11, enable bit 0
CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
STATUS_CAP_LIST = 0x10
# The MSI capability as QEMU's msi_init makes it for one vector, 64-bit, no per-vector masking:
# id, next, message control (bit 0 enable, bit 7 64-bit), address (low, high), data.
CAP_ID_MSI = 0x05
MSI_CONTROL, MSI_ADDRESS_LO, MSI_ADDRESS_HI, MSI_DATA = 2, 4, 8, 12
MSI_ENABLE, MSI_64BIT = 0x01, 0x80
MSI_SIZE = 14
BAR_IO, BAR_MEM_64, BAR_PREFETCH = 0x1, 0x4, 0x8  # a BAR's low bits: I/O; memory, 64-bit; prefetchable
NUM_BARS = 6
SUBSYSTEM = (0x1AF4, 0x1100)  # what QEMU puts in every device's subsystem ids
ENABLE_BIT = 1 << 31


@dataclass
class Bar:
    """One base address register: a window of ``size`` bytes (a power of two) onto ``device``."""

    kind: str  # "mmio" or "pio"
    size: int
    device: Device
    address: int = 0
    wide: bool = False  # a 64-bit memory BAR: the next register holds its upper half
    prefetch: bool = False
    # Told where the BAR is mapped (None: nowhere): an assigned device's mmap'd BAR follows as a memory slot.
    place: Callable[[int | None], None] | None = None


class PciFunction:
    """A PCI function's configuration space: the writable bits are the command register,
    the BARs (their address bits), the interrupt line and the cache-line/latency bytes;
    everything else reads as the device made it."""

    name = "pci-function"

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0, interrupt_pin: int = 0):
        self.config = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", self.config, VENDOR, vendor, device)
        self.config[REVISION] = revision
        self.config[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")  # prog-if, subclass, class
        struct.pack_into("<HH", self.config, SUBSYS_VENDOR, *SUBSYSTEM)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self.bars: list[Bar | None] = [None] * NUM_BARS
        self.rom: Bar | None = None  # the expansion ROM, read-only, mapped while enabled and decoding memory
        self.wmask = bytearray(CONFIG_SIZE)  # writable bits of capability registers, by byte
        self.msi_cap = 0  # offset of the MSI capability, 0 without one
        self.initial = bytes(self.config)
        self.remap: Callable[[PciFunction], None] = lambda fn: None  # set by the bus: ranges follow the BARs
        self.set_irq: Callable[[int], None] = lambda level: None  # set by the bus: its INTx line's level
        self.slot = 0

    @property
    def ids(self) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.config, VENDOR)

    @property
    def class_code(self) -> int:
        return int.from_bytes(self.config[CLASS_PROG : CLASS_PROG + 3], "little")

    def add_bar(self, index: int, bar: Bar) -> None:
        if bar.wide and (bar.kind != "mmio" or index + 1 >= NUM_BARS):
            raise ValueError(f"BAR{index}: a 64-bit BAR is memory, with a register after it")
        self.bars[index] = bar

    def add_rom(self, bar: Bar) -> None:
        """An expansion ROM of ``bar.size`` bytes (a power of two, at least 2 KiB) behind ROM_ADDRESS."""
        if bar.kind != "mmio" or bar.size < 0x800 or bar.size & (bar.size - 1):
            raise ValueError(f"an expansion ROM of {bar.size:#x} bytes")
        self.rom = bar

    def rom_enabled(self) -> bool:
        return bool(self.rom is not None and self.config[ROM_ADDRESS] & ROM_ENABLE and self.decoding("mmio"))

    def _bar_at(self, register: int) -> tuple[Bar | None, bool]:
        """The BAR a BAR register belongs to, and whether the register is a 64-bit BAR's upper half."""
        bar = self.bars[register]
        if bar is None and register and (low := self.bars[register - 1]) is not None and low.wide:
            return low, True
        return bar, False

    @staticmethod
    def _bar_flags(bar: Bar) -> int:
        if bar.kind == "pio":
            return BAR_IO
        return (BAR_MEM_64 if bar.wide else 0) | (BAR_PREFETCH if bar.prefetch else 0)

    def add_msi(self, offset: int = 0x40) -> None:
        """The MSI capability, first in the list (QEMU puts a device's first capability at 0x40)."""
        self.config[STATUS] |= STATUS_CAP_LIST
        self.config[CAPABILITIES] = offset
        self.config[offset : offset + 2] = bytes((CAP_ID_MSI, 0))
        struct.pack_into("<H", self.config, offset + MSI_CONTROL, MSI_64BIT)
        self.use_msi(offset)
        self.initial = bytes(self.config)

    def use_msi(self, offset: int) -> None:
        """The MSI capability at ``offset`` (32- or 64-bit): the guest may write its enable bit,
        its address and its data."""
        self.msi_cap = offset
        wide = self.config[offset + MSI_CONTROL] & MSI_64BIT
        self.wmask[offset + MSI_CONTROL] = MSI_ENABLE
        self.wmask[offset + MSI_ADDRESS_LO : offset + MSI_ADDRESS_LO + 4] = b"\xfc\xff\xff\xff"
        data = offset + (MSI_DATA if wide else MSI_ADDRESS_HI)  # a 32-bit capability has its data at 8
        self.wmask[offset + MSI_ADDRESS_HI : data] = b"\xff" * (data - offset - MSI_ADDRESS_HI)
        self.wmask[data : data + 2] = b"\xff\xff"

    def find_capability(self, cap_id: int, size: int) -> int:
        """The offset of capability ``cap_id`` of ``size`` bytes in the list (0: none, or one that
        would run past the space). The list may come from elsewhere (a vfio-user server), so the
        walk is bounded and checked."""
        if not self.config[STATUS] & STATUS_CAP_LIST:
            return 0
        at, seen = self.config[CAPABILITIES] & 0xFC, set()
        while 0x40 <= at <= CONFIG_SIZE - 2 and at not in seen:
            seen.add(at)
            if self.config[at] == cap_id:
                return at if at + size <= CONFIG_SIZE else 0
            at = self.config[at + 1] & 0xFC
        return 0

    def find_msi(self) -> int:
        return self.find_capability(CAP_ID_MSI, MSI_SIZE)

    def msi_message(self) -> tuple[int, int] | None:
        """(address, data) of the MSI the function sends when the guest enabled MSI, else None."""
        at = self.msi_cap
        if not at or not self.config[at + MSI_CONTROL] & MSI_ENABLE:
            return None
        if self.config[at + MSI_CONTROL] & MSI_64BIT:
            lo, hi, data = struct.unpack_from("<IIH", self.config, at + MSI_ADDRESS_LO)
            return lo | hi << 32, data
        lo, data = struct.unpack_from("<IH", self.config, at + MSI_ADDRESS_LO)
        return lo, data

    def set_rom_address(self, address: int) -> None:
        """Where firmware puts the ROM; it leaves it disabled, as SeaBIOS does once it has run it."""
        self.rom.address = address & ~(self.rom.size - 1)
        struct.pack_into("<I", self.config, ROM_ADDRESS, self.rom.address)

    def set_bar_address(self, index: int, address: int) -> None:
        bar = self.bars[index]
        bar.address = address & ~(bar.size - 1)
        struct.pack_into("<I", self.config, BAR0 + 4 * index, (bar.address & 0xFFFFFFFF) | self._bar_flags(bar))
        if bar.wide:
            struct.pack_into("<I", self.config, BAR0 + 4 * index + 4, bar.address >> 32)

    def decoding(self, kind: str) -> bool:
        command = struct.unpack_from("<H", self.config, COMMAND)[0]
        return bool(command & (CMD_IO if kind == "pio" else CMD_MEMORY))

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        moved = size == 0  # a zero-size write only re-reads the BARs (after a load)
        for i in range(size):
            at, byte = offset + i, (value >> (8 * i)) & 0xFF
            if COMMAND <= at < COMMAND + 2:
                mask = (CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE) >> (8 * (at - COMMAND)) & 0xFF
                self.config[at] = (self.config[at] & ~mask) | (byte & mask)
                moved = True
            elif BAR0 <= at < BAR0 + 4 * NUM_BARS:
                bar, upper = self._bar_at((at - BAR0) // 4)
                if bar is None:
                    continue
                lane = (at - BAR0) % 4
                if upper:  # the address bits above 4 GiB (all of them below a 4 GiB size)
                    writable = ~(bar.size - 1) >> 32 & 0xFFFFFFFF
                else:
                    writable = (~(bar.size - 1) & 0xFFFFFFFF) & ~(0x3 if bar.kind == "pio" else 0xF)
                mask = (writable >> (8 * lane)) & 0xFF
                self.config[at] = (self.config[at] & ~mask) | (byte & mask)
                moved = True
            elif ROM_ADDRESS <= at < ROM_ADDRESS + 4:
                if self.rom is None:
                    continue
                writable = (~(self.rom.size - 1) & 0xFFFFF800) | ROM_ENABLE
                mask = (writable >> (8 * (at - ROM_ADDRESS))) & 0xFF
                self.config[at] = (self.config[at] & ~mask) | (byte & mask)
                moved = True
            elif at in (INTERRUPT_LINE, 0x0C, 0x0D):  # interrupt line, cache line size, latency timer
                self.config[at] = byte
            elif self.wmask[at]:
                self.config[at] = (self.config[at] & ~self.wmask[at]) | (byte & self.wmask[at])
        if moved:
            for index, bar in enumerate(self.bars):
                if bar is not None:
                    raw = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0]
                    if bar.wide:
                        raw |= struct.unpack_from("<I", self.config, BAR0 + 4 * index + 4)[0] << 32
                    bar.address = raw & ~(0x3 if bar.kind == "pio" else 0xF)
            if self.rom is not None:
                self.rom.address = struct.unpack_from("<I", self.config, ROM_ADDRESS)[0] & ~0x7FF
            self.remap(self)

    def reset(self) -> None:
        """Back to what firmware left; the BARs' ranges follow."""
        self.config[:] = self.initial
        self.write_config(COMMAND, 0, 0)


class HostBridge(PciFunction):
    """The i440FX host bridge at 00:00.0, as QEMU's pc machine has it."""

    name = "i440FX"

    def __init__(self) -> None:
        super().__init__(0x8086, 0x1237, 0x060000, revision=2)


CONFIG_VMSD = VMSD("pci-config", 1, 1, (Field("space", "bytes", size=CONFIG_SIZE),))
VMSTATE = VMSD(
    "pci-host",
    1,
    1,
    (Field("address", "u32", mask=0x80FFFFFC), Field("configs", CONFIG_VMSD, is_list=True, max=32)),  # by slot
    optional=True,
)


@dataclass
class PciHost(Device):
    """Configuration mechanism #1: the address latch (a 32-bit access at 0xcf8), data at
    0xcfc-0xcff. Offsets here are from 0xcf8; the machine maps only the latch's own port
    and the data ports, so 0xcf9 stays the reset control register's, as on a PIIX."""

    name: str = "pci-host"
    vmstate = VMSTATE
    address: int = 0
    functions: dict[int, PciFunction] = field(default_factory=dict)  # slot -> function 0

    def save_state(self) -> dict:
        configs = [{"space": bytes(f.config)} for _, f in sorted(self.functions.items())]
        return {"address": self.address, "configs": configs}

    def load_state(self, state: dict) -> None:
        """Config spaces as the guest left them; their BARs are mapped where they point."""
        self.address = state["address"]
        for (_, function), config in zip(sorted(self.functions.items()), state["configs"]):
            ids = bytes(function.config[:4])
            function.config[:] = config["space"]
            function.config[:4] = ids  # the device is what this machine built, whatever the stream says
            function.write_config(COMMAND, 0, 0)  # re-read the BARs and remap

    def function(self, bus: int, slot: int, fn: int) -> PciFunction | None:
        """What answers at bus:slot.fn: the machine has bus 0 and single-function devices."""
        return self.functions.get(slot) if bus == 0 and fn == 0 else None

    def config_read(self, bus: int, slot: int, fn: int, reg: int, size: int) -> int:
        """A read of ``size`` bytes at register ``reg`` (0-4095) of a function, by either mechanism:
        all ones where no function answers, and past a conventional function's 256 bytes (QEMU's
        answer there, which Linux takes as "no extended configuration space")."""
        function = self.function(bus, slot, fn)
        if function is None or reg >= CONFIG_SIZE:
            return (1 << (8 * size)) - 1  # no device: all ones, as the vendor id 0xffff says
        return function.read_config(reg, min(size, CONFIG_SIZE - reg))

    def config_write(self, bus: int, slot: int, fn: int, reg: int, size: int, value: int) -> None:
        """A write; past a conventional function's 256 bytes it has no effect."""
        function = self.function(bus, slot, fn)
        if function is not None and reg < CONFIG_SIZE:
            function.write_config(reg, min(size, CONFIG_SIZE - reg), value)

    def _latched(self) -> tuple[int, int, int, int] | None:
        """(bus, slot, function, register) the address latch selects, if enabled."""
        if not self.address & ENABLE_BIT:
            return None
        a = self.address
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, a & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return (self.address >> (8 * offset)) & ((1 << (8 * size)) - 1) if offset + size <= 4 else 0
        target = self._latched()
        if target is None:
            return (1 << (8 * size)) - 1
        bus, slot, fn, reg = target
        return self.config_read(bus, slot, fn, reg + offset - 4, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FFFFFC
            return
        target = self._latched()
        if target is not None:
            bus, slot, fn, reg = target
            self.config_write(bus, slot, fn, reg + offset - 4, size, value)

    def reset(self) -> None:
        self.address = 0
        for function in self.functions.values():
            function.reset()


@dataclass
class PciHostPort(Device):
    """One of the host's port windows on the I/O bus: ``at`` is its offset from 0xcf8. The
    latch's window stands for the host in the machine's lifecycle (reset, state)."""

    host: PciHost
    at: int
    name: str = "pci-host"

    def __post_init__(self) -> None:
        self.vmstate = VMSTATE if self.at == 0 else None

    def reset(self) -> None:
        if self.at == 0:
            self.host.reset()

    def save_state(self) -> dict:
        return self.host.save_state()

    def load_state(self, state: dict) -> None:
        self.host.load_state(state)

    def read(self, offset: int, size: int) -> int:
        return self.host.read(self.at + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.host.write(self.at + offset, size, value)


@dataclass
class DmaSpace:
    """A PCI function's view of memory for DMA: guest RAM, through the IOMMU when one translates.

    ``requester_id`` and ``iommu`` are asked at each transfer: the slot is given when the function
    goes on the bus, and ``-device intel-iommu`` may come after the device on the command line.
    """

    memory: object  # GuestMemory
    requester_id: Callable[[], int]
    iommu: Callable[[], object | None]  # the intel_iommu.IntelIommu, if any: translate(requester, address, write)

    def _chunks(self, address: int, length: int, write: bool):
        iommu = self.iommu()
        while length > 0:
            step = min(length, PAGE_SIZE - (address & (PAGE_SIZE - 1)))
            yield (address if iommu is None else iommu.translate(self.requester_id(), address, write)), step
            address, length = address + step, length - step

    def read(self, address: int, length: int) -> bytes:
        return b"".join(self.memory.read(gpa, n) for gpa, n in self._chunks(address, length, False))

    def write(self, address: int, data: bytes) -> None:
        done = 0
        for gpa, n in list(self._chunks(address, len(data), True)):
            self.memory.write(gpa, data[done : done + n])
            done += n

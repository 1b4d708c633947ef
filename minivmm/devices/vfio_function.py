"""The PCI function of a device whose model is not in minivmm, whatever carries its accesses:
a host device through a kernel VFIO device fd (vfio_pci.py) or a device in another process
over vfio-user (vfio_user_pci.py). QEMU's VFIODevice has io ops per transport in the same way.

What both share, here:
- the configuration space the guest sees is a shadow kept by minivmm (the BAR addresses
  firmware would give, 32- or 64-bit, the command register, the MSI and MSI-X capabilities),
  read from the device at start-up; every configuration write also goes to the device;
- each BAR is a window onto the device's region of the same index (``BarWindow``: every access
  a transport read or write), or, where the transport can map the region (a kernel VFIO region
  with VFIO_REGION_INFO_FLAG_MMAP), the region's pages given to the guest as a KVM memory slot
  that follows the BAR, so guest accesses never leave the CPU;
- the expansion ROM, if the device has one, read through the transport where the ROM BAR points;
- the MSI-X table and pending bits are emulated here, in the BAR the capability names (that BAR
  stays trapped), as QEMU emulates them: the device never sees the guest's messages;
- INTx, MSI and MSI-X as eventfds the device signals and KVM injects (vfio_irqs.py);
- the vmstate section "vfio-pci": the shadow, the MSI message and the MSI-X table.

A transport error that the device answers (an access it refuses) fails that access only; one
that breaks the transport (a server gone) detaches the function: it reads all ones from then on.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from minivmm.devices.device import Device
from minivmm.log import message
from minivmm.vfio import constants as vc
from minivmm.vfio.kernel import FdTable  # the CPR table as both transports' devices use it
from minivmm.vmstate import VMSD, Field, VMStateError

from .pci import (
    BAR0,
    BAR_MEM_64,
    BAR_PREFETCH,
    COMMAND,
    CONFIG_SIZE,
    INTERRUPT_PIN,
    NUM_BARS,
    ROM_ADDRESS,
    Bar,
    PciFunction,
)
from .vfio_irqs import INTX, MSI, MSIX, Interrupts

CAP_ID_MSIX = 0x11
MSIX_CONTROL, MSIX_TABLE, MSIX_PBA = 2, 4, 8  # in the capability: message control, table and PBA offset/BIR
MSIX_ENABLE, MSIX_MASKALL = 0x8000, 0x4000
MSIX_ENTRY, MSIX_VECTOR_CONTROL, MSIX_ENTRY_MASKED = 16, 12, 1  # an entry: address, data, control (bit 0: masked)
MSIX_MAX_VECTORS = 2048
PAGE = mmap.PAGESIZE


class TransportError(Exception):
    """The device refused an access (an error reply, an I/O error): that access fails alone."""


class TransportGone(Exception):
    """The way to the device is broken for good (the server went away): the function detaches."""


@dataclass(frozen=True)
class Region:
    """What a transport says of one region: VFIO's region info."""

    size: int
    flags: int = 0  # VFIO_REGION_INFO_FLAG_*
    offset: int = 0  # where the region lies in a kernel VFIO device fd


class Transport(Protocol):
    """The operations a function needs of its device (QEMU's VFIODeviceIOOps and the device fd's ioctls)."""

    keeps_irqs: bool  # a kept device (CPR) still signals the eventfd it was given: no new SET_IRQS

    def num_regions(self) -> int: ...
    def region(self, index: int) -> Region: ...
    def region_read(self, region: int, offset: int, count: int) -> bytes: ...
    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None: ...
    def map_region(self, index: int, region: Region) -> mmap.mmap | None: ...
    def irq_count(self, index: int) -> int: ...
    def set_irqs(self, index: int, action: int, fds: list[int] | None = None, count: int = 1) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class Wiring:
    """What the machine gives a function: the CPR table, guest RAM, its interrupts' plumbing, and a
    KVM memory slot for each BAR it maps (``map_memory(key, gpa or None, size, host address)``)."""

    fds: FdTable
    mappings: list  # memory.Mapping: the RAM a device may DMA into, at its guest-physical address
    gsis: Callable[[int], list[int]]  # n GSIs of its own, for its MSI or MSI-X vectors
    set_route: Callable[[int, tuple[int, int] | None], None]  # (gsi, (address, data) or None)
    add_irqfd: Callable[..., None]  # (gsi, eventfd[, INTx resample eventfd]): bound now if the VM's irqfds are
    remove_irqfd: Callable[[int], None]  # (eventfd)
    map_memory: Callable[[str, int | None, int, int], None] = lambda key, gpa, size, host: None
    intx: bool = True  # INTx can be wired (KVM's own IOAPIC, resampling irqfds)


class Link:
    """The transport, serialised (vCPU threads share it). A broken transport detaches the device for
    good; an access the device refuses fails alone."""

    def __init__(self, name: str, transport: Transport) -> None:
        self.name, self.transport = name, transport
        self.lock = threading.Lock()
        self.dead = False

    def lend(self) -> None:
        """cpr-transfer: the target asks the device about itself while it builds its VM, on this same
        connection; nothing here may use it meanwhile (a vCPU touching the device waits)."""
        self.lock.acquire()

    def give_back(self) -> None:
        self.lock.release()

    def call(self, fn: Callable[[Transport], object], default: object = None) -> object:
        with self.lock:
            if self.dead:
                return default
            try:
                return fn(self.transport)
            except TransportError:
                return default
            except TransportGone as e:
                self.dead = True
                message(f"{self.name}: {e}: detached")
                return default


class BarWindow(Device):
    """One BAR of the function, trapped: accesses go to the device's region of the same index, but
    for the ranges emulated here (``local``: start, end, the Device answering there)."""

    name = "vfio-bar"

    def __init__(self, link: Link, region: int, size: int) -> None:
        self.link, self.region, self.size = link, region, size
        self.local: list[tuple[int, int, Device]] = []

    def _local(self, offset: int, size: int) -> tuple[int, Device] | None:
        for start, end, device in self.local:
            if start <= offset and offset + size <= end:
                return offset - start, device
        return None

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if offset + size > self.size:  # past the BAR's end: nothing answers there
            return ones
        if (here := self._local(offset, size)) is not None:
            return here[1].read(here[0], size)
        data = self.link.call(lambda t: t.region_read(self.region, offset, size), b"")
        return int.from_bytes(data, "little") if len(data) == size else ones

    def write(self, offset: int, size: int, value: int) -> None:
        if offset + size > self.size:
            return
        if (here := self._local(offset, size)) is not None:
            here[1].write(here[0], size, value)
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.link.call(lambda t: t.region_write(self.region, offset, data, posted=True))


class RomWindow(BarWindow):
    """The device's expansion ROM, read where the ROM BAR points: writes go nowhere."""

    name = "vfio-rom"

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@dataclass(frozen=True)
class MsixLayout:
    """Where a function's MSI-X capability puts its vectors: the table and the pending bits (PBA)."""

    cap: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY

    @property
    def pba_size(self) -> int:
        return -(-self.vectors // 64) * 8


class MsixTable(Device):
    """The table's entries as the guest wrote them; a write may change a vector's route."""

    name = "msix-table"

    def __init__(self, function: VfioFunction) -> None:
        self.function = function

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.function.msix_table[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        table = self.function.msix_table
        table[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.function.msix_written(range(offset // MSIX_ENTRY, (offset + size - 1) // MSIX_ENTRY + 1))


class MsixPba(Device):
    """The pending bits, read-only: a masked vector its device has signalled."""

    name = "msix-pba"

    def __init__(self, function: VfioFunction) -> None:
        self.function = function

    def read(self, offset: int, size: int) -> int:
        irqs, value = self.function.irqs, 0
        if irqs.mode != MSIX:
            return 0
        for bit in range(8 * size):
            n = 8 * offset + bit
            if n < len(irqs.vectors) and irqs.pending(n):
                value |= 1 << bit
        return value


class FunctionError(Exception):
    """The device's answers at start-up cannot make a PCI function (the text says which)."""


def _check_msi(fields: dict) -> tuple[str, str] | None:
    if not fields["msi_enabled"] and (fields["msi_address"] or fields["msi_data"]):
        return "msi_address", "set while MSI is off"
    return None


VMSTATE = VMSD(
    "vfio-pci",
    2,
    1,
    (
        Field("config", "bytes", size=CONFIG_SIZE),
        Field("msi_enabled", "bool"),
        Field("msi_address", "u64"),
        Field("msi_data", "u32", max=0xFFFF),
        Field("ioas_id", "u32"),  # iommufd: the IOAS the device is attached to (0 otherwise)
        Field("msix_table", "bytes", since=2, default=b"", max=MSIX_MAX_VECTORS * MSIX_ENTRY),
    ),
    check=_check_msi,
    optional=True,
)


class VfioFunction(PciFunction):
    """The shared model: configuration shadow, BARs, the MSI-X table, interrupts, the vmstate section."""

    name = "vfio-pci"
    vmstate = VMSTATE

    def __init__(self, label: str, transport: Transport, wiring: Wiring, fd_prefix: str, kept: bool):
        """``transport`` is set up (a new one negotiated, reset and given DMA; a kept one as the
        previous image left it); ``fd_prefix`` begins its interrupt eventfds' names in the CPR table."""
        config, regions = self.probe(transport)
        super().__init__(0, 0, 0)
        self.wiring, self.label = wiring, label
        self.config[:] = config
        self.link = Link(label, transport)
        self.maps: list[mmap.mmap] = []
        self.msix = self._find_msix(regions)
        self.msix_table = self._msix_reset_table()
        wide = False
        for index, region in enumerate(regions):
            if wide:  # the upper half of the 64-bit BAR before it
                wide = False
                continue
            if region.size:
                wide = self._add_bar(index, region, transport)
        if self.msix is not None:
            self.wmask[self.msix.cap + MSIX_CONTROL + 1] = (MSIX_ENABLE | MSIX_MASKALL) >> 8
            table, pba = self.bars[self.msix.table_bar].device, self.bars[self.msix.pba_bar].device
            m = self.msix
            table.local.append((m.table_offset, m.table_offset + m.table_size, MsixTable(self)))
            pba.local.append((m.pba_offset, m.pba_offset + m.pba_size, MsixPba(self)))
        self.config[ROM_ADDRESS : ROM_ADDRESS + 4] = bytes(4)  # the bus places the ROM, if there is one
        rom = transport.region(vc.VFIO_PCI_ROM_REGION_INDEX).size
        if rom:
            try:
                self.add_rom(Bar("mmio", rom, RomWindow(self.link, vc.VFIO_PCI_ROM_REGION_INDEX, rom)))
            except ValueError as e:
                raise FunctionError(str(e)) from None
        if msi := self.find_msi():
            self.use_msi(msi)
        if not (wiring.intx and transport.irq_count(INTX)):
            self.config[INTERRUPT_PIN] = 0  # INTx cannot be wired: the guest sees a function without it
        vectors = self.msix.vectors if self.msix is not None else 1 if msi else 0
        quiet = kept and transport.keeps_irqs  # a kept kernel device signals what the last image set up
        self.irqs = Interrupts(label, wiring, self.link.call, fd_prefix, vectors, quiet)
        self.kept = kept
        self.ioas_id = 0  # iommufd: the IOAS the device is attached to, kept in the state for the next image
        self.iommufd_id: str | None = None
        self.initial = bytes(self.config)

    @staticmethod
    def probe(transport: Transport) -> tuple[bytearray, list[Region]]:
        """The configuration space and the BARs' regions, checked (raises FunctionError or the transport's)."""
        count = transport.num_regions()
        if count <= vc.VFIO_PCI_CONFIG_REGION_INDEX:
            raise FunctionError(f"{count} regions, no configuration space")
        config = bytearray(transport.region_read(vc.VFIO_PCI_CONFIG_REGION_INDEX, 0, CONFIG_SIZE))
        config = config[:CONFIG_SIZE].ljust(CONFIG_SIZE, b"\xff")
        regions = [transport.region(i) for i in range(NUM_BARS)]
        for index, region in enumerate(regions):
            raw = struct.unpack_from("<I", config, BAR0 + 4 * index)[0]
            wide = not raw & 1 and raw & 0x6 == BAR_MEM_64
            if region.size and (region.size & (region.size - 1) or region.size > 1 << 31):
                raise FunctionError(f"BAR{index} of {region.size:#x} bytes")
            if region.size and wide and index == NUM_BARS - 1:
                raise FunctionError(f"BAR{index} is 64-bit, with no register after it")
        return config, regions

    def _find_msix(self, regions: list[Region]) -> MsixLayout | None:
        """The MSI-X capability, checked against the BARs it points into."""
        cap = self.find_capability(CAP_ID_MSIX, MSIX_PBA + 4)
        if not cap:
            return None
        control, table, pba = struct.unpack_from("<HII", self.config, cap + MSIX_CONTROL)
        m = MsixLayout(cap, (control & 0x7FF) + 1, table & 7, table & ~7, pba & 7, pba & ~7)
        parts = (("table", m.table_bar, m.table_offset, m.table_size), ("PBA", m.pba_bar, m.pba_offset, m.pba_size))
        for what, bar, start, size in parts:
            if bar >= NUM_BARS or start + size > regions[bar].size:
                raise FunctionError(f"the MSI-X {what} ({size} bytes at {start:#x} in BAR{bar}) is outside the BAR")
        return m

    def _msix_reset_table(self) -> bytearray:
        if self.msix is None:
            return bytearray()
        table = bytearray(self.msix.table_size)
        for n in range(self.msix.vectors):
            table[n * MSIX_ENTRY + MSIX_VECTOR_CONTROL] = MSIX_ENTRY_MASKED  # every vector masked, as at reset
        return table

    def _add_bar(self, index: int, region: Region, transport: Transport) -> bool:
        """BAR ``index`` on the device's region; whether it is 64-bit (the next register its upper half)."""
        raw = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0]
        kind = "pio" if raw & 1 else "mmio"
        wide = kind == "mmio" and raw & 0x6 == BAR_MEM_64
        window = BarWindow(self.link, index, region.size)
        bar = Bar(kind, region.size, window, wide=wide, prefetch=kind == "mmio" and bool(raw & BAR_PREFETCH))
        emulated = self.msix is not None and index in (self.msix.table_bar, self.msix.pba_bar)
        can_map = kind == "mmio" and region.size >= PAGE and not emulated
        mapped = transport.map_region(index, region) if can_map else None
        if mapped is not None:  # the guest reaches the device's pages directly, through a memory slot
            anchor = ctypes.c_char.from_buffer(mapped)
            host = ctypes.addressof(anchor)
            del anchor
            self.maps.append(mapped)
            key = f"{self.label} BAR{index}"
            bar.place = lambda gpa: self.wiring.map_memory(key, gpa, region.size, host)
        self.add_bar(index, bar)
        return wide

    # --- interrupts ------------------------------------------------------------------------------
    def plugged(self, intx_gsi: int | None) -> None:
        """On the bus, INTx on ``intx_gsi`` (None: the function has no pin); a new device starts with
        INTx on, as QEMU's, a kept one waits for its state."""
        if intx_gsi is not None:
            self.irqs.wire_intx(intx_gsi)
        if not self.kept:
            self.sync_irqs()

    def _msix_control(self) -> int:
        return struct.unpack_from("<H", self.config, self.msix.cap + MSIX_CONTROL)[0] if self.msix is not None else 0

    def _msix_message(self, n: int, control: int) -> tuple[int, int] | None:
        """Vector ``n``'s (address, data), None while it or the function is masked."""
        address, data, vector_control = struct.unpack_from("<QII", self.msix_table, n * MSIX_ENTRY)
        return None if control & MSIX_MASKALL or vector_control & MSIX_ENTRY_MASKED else (address, data)

    def msix_written(self, vectors: range) -> None:
        """The guest wrote these table entries: only their routes can change (a table of 2048 vectors
        is written entry by entry, so this is not a whole ``sync_irqs``)."""
        if self.irqs.mode == MSIX:
            control = self._msix_control()
            for n in vectors:
                self.irqs.route(n, self._msix_message(n, control))

    def wanted_irqs(self) -> tuple[int | None, list]:
        """What the guest's configuration turns on: (index, each vector's message or None if masked)."""
        control = self._msix_control()
        if control & MSIX_ENABLE:
            return MSIX, [self._msix_message(n, control) for n in range(self.msix.vectors)]
        if (msi := self.msi_message()) is not None:
            return MSI, [msi]
        intx = self.irqs.intx is not None and self.config[INTERRUPT_PIN]  # a loaded shadow may have none
        return (INTX if intx else None), []

    def sync_irqs(self) -> None:
        self.irqs.sync(*self.wanted_irqs())

    # --- configuration space ---------------------------------------------------------------------
    def write_config(self, offset: int, size: int, value: int) -> None:
        """The shadow (the MSI and MSI-X capabilities' writable bits among it), the interrupts it
        turns on, then the device's copy."""
        value &= (1 << (8 * size)) - 1
        super().write_config(offset, size, value)
        self.sync_irqs()
        if size:
            data = value.to_bytes(size, "little")
            self.link.call(lambda t: t.region_write(vc.VFIO_PCI_CONFIG_REGION_INDEX, offset, data))

    def push_command(self) -> None:
        """The shadow's command register to the device. The bus plays firmware in the shadow alone
        (decoding and bus mastering on); a guest that reads them on does not write them, so without
        this the device would never decode its BARs (the kernel's VFIO refuses BAR accesses then) nor
        master its DMA."""
        data = bytes(self.config[COMMAND : COMMAND + 2])
        self.link.call(lambda t: t.region_write(vc.VFIO_PCI_CONFIG_REGION_INDEX, COMMAND, data))

    def reset(self) -> None:
        """The device resets with its interrupts off (as QEMU's pre-reset); the shadow goes back to
        what firmware left, the MSI-X vectors masked, and the device is told the firmware's command
        register again; INTx comes back on."""
        self.irqs.sync(None, [])
        self.link.call(lambda t: t.reset())
        self.msix_table[:] = self._msix_reset_table()
        super().reset()
        self.push_command()

    # --- state -----------------------------------------------------------------------------------
    def save_state(self) -> dict:
        mode, messages = self.wanted_irqs()
        address, data = messages[0] if mode == MSI else (0, 0)
        return {
            "config": bytes(self.config),
            "msi_enabled": mode == MSI,
            "msi_address": address,
            "msi_data": data,
            "ioas_id": self.ioas_id,
            "msix_table": bytes(self.msix_table),
        }

    def load_state(self, state: dict) -> None:
        """The shadow and the MSI-X table as the guest left them (the BARs mapped where they point),
        then the interrupts they turn on; the MSI message must be the one saved."""
        ids = bytes(self.config[:4])
        table = state["msix_table"] or self._msix_reset_table()  # none from a version 1 stream: MSI-X was hidden
        if len(table) != len(self.msix_table):
            raise VMStateError(f"vfio-pci/msix_table: {len(table)} bytes, the device's table {len(self.msix_table)}")
        self.config[:] = state["config"]
        self.config[:4] = ids  # the device is what this machine built, whatever the stream says
        self.msix_table[:] = table
        self.write_config(COMMAND, 0, 0)
        mode, messages = self.wanted_irqs()
        got = messages[0] if mode == MSI else None
        saved = (state["msi_address"], state["msi_data"]) if state["msi_enabled"] else None
        self.ioas_id = state["ioas_id"]
        if got != saved:
            raise VMStateError(f"vfio-pci/msi_address: the configuration gives MSI {got}, saved {saved}")

    def close(self) -> None:
        self.link.transport.close()
        for m in self.maps:
            m.close()
        self.maps.clear()

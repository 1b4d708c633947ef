"""The PCI function of a device whose model is not in minivmm, whatever carries its accesses:
a host device through a kernel VFIO device fd (vfio_pci.py) or a device in another process
over vfio-user (vfio_user_pci.py). QEMU's VFIODevice has io ops per transport in the same way.

What both share, here:
- the configuration space the guest sees is a shadow kept by minivmm (the BAR addresses
  firmware would give, the command register, the MSI capability; INTx hidden, MSI-X unlinked
  from the capability list), read from the device at start-up; every configuration write
  also goes to the device;
- each BAR is a window onto the device's region of the same index (``BarWindow``: every access
  a transport read or write), or, where the transport can map the region (a kernel VFIO region
  with VFIO_REGION_INFO_FLAG_MMAP), the region's pages given to the guest as a KVM memory slot
  that follows the BAR, so guest accesses never leave the CPU;
- MSI: when the guest enables it, an eventfd goes to the device (SET_IRQS) and is bound as a
  KVM irqfd on a GSI routed to the guest's MSI address and data; the device's interrupts reach
  the guest without passing through minivmm. The eventfd is made once and kept in the CPR table;
- the vmstate section "vfio-pci": the shadow and the MSI message the guest programmed.

A transport error that the device answers (an access it refuses) fails that access only; one
that breaks the transport (a server gone) detaches the function: it reads all ones from then on.
"""

from __future__ import annotations

import ctypes
import mmap
import os
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
    CAPABILITIES,
    COMMAND,
    CONFIG_SIZE,
    INTERRUPT_PIN,
    NUM_BARS,
    STATUS,
    STATUS_CAP_LIST,
    Bar,
    PciFunction,
)

CAP_ID_MSIX = 0x11
ROM_ADDRESS = 0x30  # the expansion ROM BAR: not emulated, so it reads 0 (no ROM) in the shadow
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
    def set_irq_eventfd(self, index: int, fd: int | None) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class Wiring:
    """What the machine gives a function: the CPR table, guest RAM, its MSI GSI's plumbing, and a
    KVM memory slot for each BAR it maps (``map_memory(key, gpa or None, size, host address)``)."""

    fds: FdTable
    mappings: list  # memory.Mapping: the RAM a device may DMA into, at its guest-physical address
    gsi: int  # the GSI the function's MSI is routed through
    set_route: Callable[[int, tuple[int, int] | None], None]  # (gsi, (address, data) or None)
    add_irqfd: Callable[[int, int], None]  # (gsi, eventfd): bound now if the VM's irqfds are
    remove_irqfd: Callable[[int], None]
    map_memory: Callable[[str, int | None, int, int], None] = lambda key, gpa, size, host: None


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
    """One BAR of the function, trapped: accesses go to the device's region of the same index."""

    name = "vfio-bar"

    def __init__(self, link: Link, region: int, size: int) -> None:
        self.link, self.region, self.size = link, region, size

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if offset + size > self.size:  # past the BAR's end: nothing answers there
            return ones
        data = self.link.call(lambda t: t.region_read(self.region, offset, size), b"")
        return int.from_bytes(data, "little") if len(data) == size else ones

    def write(self, offset: int, size: int, value: int) -> None:
        if offset + size <= self.size:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.link.call(lambda t: t.region_write(self.region, offset, data, posted=True))


class FunctionError(Exception):
    """The device's answers at start-up cannot make a PCI function (the text says which)."""


def _check_msi(fields: dict) -> tuple[str, str] | None:
    if not fields["msi_enabled"] and (fields["msi_address"] or fields["msi_data"]):
        return "msi_address", "set while MSI is off"
    return None


VMSTATE = VMSD(
    "vfio-pci",
    1,
    1,
    (
        Field("config", "bytes", size=CONFIG_SIZE),
        Field("msi_enabled", "bool"),
        Field("msi_address", "u64"),
        Field("msi_data", "u32", max=0xFFFF),
        Field("ioas_id", "u32"),  # iommufd: the IOAS the device is attached to (0 otherwise)
    ),
    check=_check_msi,
    optional=True,
)


class VfioFunction(PciFunction):
    """The shared model: configuration shadow, BARs, MSI as an irqfd, the vmstate section."""

    name = "vfio-pci"
    vmstate = VMSTATE

    def __init__(self, label: str, transport: Transport, wiring: Wiring, msi_key: tuple[str, str], kept: bool):
        """``transport`` is set up (a new one negotiated, reset and given DMA; a kept one as the
        previous image left it); ``msi_key`` names the MSI eventfd in the CPR table."""
        config, regions = self.probe(transport)
        super().__init__(0, 0, 0)
        self.wiring, self.label = wiring, label
        self.config[:] = config
        self.link = Link(label, transport)
        self.maps: list[mmap.mmap] = []
        for index, region in enumerate(regions):
            if region.size:
                self._add_bar(index, region, transport)
        self.config[INTERRUPT_PIN] = 0  # INTx is not wired: the guest sees a function without it
        self.config[ROM_ADDRESS : ROM_ADDRESS + 4] = bytes(4)  # else a guest sizes the device's raw value
        self.hide_capability(CAP_ID_MSIX)  # MSI-X is not emulated: the guest uses MSI
        if msi := self.find_msi():
            self.use_msi(msi)
        # The MSI eventfd: made (or found, across CPR) once and kept, so the table never changes later.
        self.msi_fd, _ = wiring.fds.open(*msi_key, _eventfd)
        self.msi_route: tuple[int, int] | None = None
        # A kept kernel device still signals this eventfd: the first route after a load needs no SET_IRQS.
        self.irqs_kept = kept and transport.keeps_irqs
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
            if region.size and (region.size & (region.size - 1) or region.size > 1 << 31):
                raise FunctionError(f"BAR{index} of {region.size:#x} bytes")
            if region.size and raw & 0x7 == 0x4:
                raise FunctionError(f"BAR{index} is 64-bit (minivmm maps 32-bit)")
        return config, regions

    def _add_bar(self, index: int, region: Region, transport: Transport) -> None:
        raw = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0]
        kind = "pio" if raw & 1 else "mmio"
        bar = Bar(kind, region.size, BarWindow(self.link, index, region.size))
        mapped = transport.map_region(index, region) if kind == "mmio" and region.size >= PAGE else None
        if mapped is not None:  # the guest reaches the device's pages directly, through a memory slot
            anchor = ctypes.c_char.from_buffer(mapped)
            host = ctypes.addressof(anchor)
            del anchor
            self.maps.append(mapped)
            key = f"{self.label} BAR{index}"
            bar.place = lambda gpa: self.wiring.map_memory(key, gpa, region.size, host)
        self.add_bar(index, bar)

    def hide_capability(self, cap_id: int) -> None:
        """Unlink every capability ``cap_id`` from the shadow's list (the walk bounded, as find_msi's)."""
        if not self.config[STATUS] & STATUS_CAP_LIST:
            return
        prev, at, seen = CAPABILITIES, self.config[CAPABILITIES] & 0xFC, set()
        while 0x40 <= at <= CONFIG_SIZE - 2 and at not in seen:
            seen.add(at)
            nxt = self.config[at + 1] & 0xFC
            if self.config[at] == cap_id:
                self.config[prev] = nxt
            else:
                prev = at + 1
            at = nxt

    # --- configuration space ---------------------------------------------------------------------
    def write_config(self, offset: int, size: int, value: int) -> None:
        """The shadow (the MSI capability's writable bits among it), then the device's copy."""
        value &= (1 << (8 * size)) - 1
        super().write_config(offset, size, value)
        self._msi_changed()
        if size:
            data = value.to_bytes(size, "little")
            self.link.call(lambda t: t.region_write(vc.VFIO_PCI_CONFIG_REGION_INDEX, offset, data))

    def _msi_changed(self) -> None:
        """Route the MSI GSI to what the guest wrote and give the device the eventfd when MSI comes
        on; take both away when it goes off. A load (and a kept device) runs the same steps."""
        route = self.msi_message()
        if route == self.msi_route:
            return
        w = self.wiring
        w.set_route(w.gsi, route)
        if route is not None and self.msi_route is None:
            w.add_irqfd(w.gsi, self.msi_fd)
            if not self.irqs_kept:
                self.link.call(lambda t: t.set_irq_eventfd(vc.VFIO_PCI_MSI_IRQ_INDEX, self.msi_fd))
        elif route is None:
            w.remove_irqfd(w.gsi)
            self.link.call(lambda t: t.set_irq_eventfd(vc.VFIO_PCI_MSI_IRQ_INDEX, None))
        self.irqs_kept = False
        self.msi_route = route

    def push_command(self) -> None:
        """The shadow's command register to the device. The bus plays firmware in the shadow alone
        (decoding and bus mastering on); a guest that reads them on does not write them, so without
        this the device would never decode its BARs (the kernel's VFIO refuses BAR accesses then) nor
        master its DMA."""
        data = bytes(self.config[COMMAND : COMMAND + 2])
        self.link.call(lambda t: t.region_write(vc.VFIO_PCI_CONFIG_REGION_INDEX, COMMAND, data))

    def reset(self) -> None:
        """The device resets; the shadow goes back to what firmware left, MSI off, and the device is
        told the firmware's command register again."""
        self.link.call(lambda t: t.reset())
        super().reset()  # its re-read of the shadow turns MSI off
        self.push_command()

    # --- state -----------------------------------------------------------------------------------
    def save_state(self) -> dict:
        address, data = self.msi_route or (0, 0)
        return {
            "config": bytes(self.config),
            "msi_enabled": self.msi_route is not None,
            "msi_address": address,
            "msi_data": data,
            "ioas_id": self.ioas_id,
        }

    def load_state(self, state: dict) -> None:
        """The shadow as the guest left it (the BARs mapped where they point), then the MSI route it
        gives, which must be the one saved."""
        ids = bytes(self.config[:4])
        self.config[:] = state["config"]
        self.config[:4] = ids  # the device is what this machine built, whatever the stream says
        self.write_config(COMMAND, 0, 0)
        saved = (state["msi_address"], state["msi_data"]) if state["msi_enabled"] else None
        self.irqs_kept = False  # from here on every change of MSI goes to the device
        self.ioas_id = state["ioas_id"]
        if self.msi_route != saved:
            raise VMStateError(f"vfio-pci/msi_address: the configuration gives MSI {self.msi_route}, saved {saved}")

    def close(self) -> None:
        self.link.transport.close()
        for m in self.maps:
            m.close()
        self.maps.clear()


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)

"""-device vfio-user-pci: a PCI function whose model runs in another process,
reached over a unix socket with the vfio-user protocol (vfio_user/), as
QEMU's vfio-user-pci reaches it.

minivmm is the client:
- at start-up it negotiates the version, reads the function's configuration
  space and each BAR's size, and maps guest RAM for DMA by passing the RAM
  memfds (DMA_MAP with an fd, DMA address = guest-physical address), so the
  server reads and writes guest memory itself;
- the configuration space the guest sees is the shadow kept here (the BAR
  addresses firmware would give, the command register, the MSI capability);
  every configuration write also goes to the server. BAR accesses become
  REGION_READ and REGION_WRITE (writes posted, as QEMU posts them);
- MSI: when the guest enables it, an eventfd goes to the server (SET_IRQS)
  and is bound as a KVM irqfd on a GSI routed to the guest's MSI address and
  data: the server's interrupts reach the guest without passing through
  minivmm. INTx is not wired (the guest must use MSI).

Across cpr-exec and cpr-transfer the socket and the MSI eventfd are in the
CPR fd table ("vfio-user" and "vfio-user-msi", by device id): the new image
takes the very same connection (no new negotiation, no DMA_MAP: the server
still maps the same memfds) and binds the same eventfd to its VM. The
server never sees the update. A cpr-transfer target builds its VM while the
guest still runs in the source and asks the server about the device then:
the source lends it the connection for that time (``_Link.lend``), and
once the guest is handed over it never uses the connection again. A normal migration is refused (the device's
state is in the server, which does not migrate it).

If the server goes away or stops answering, the function reads all ones and
drops writes, and one line says so: the guest and its RAM carry on.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from minivmm.devices.device import Device
from minivmm.vfio import constants as vc
from minivmm.vfio_user import protocol as p
from minivmm.vfio_user.client import Client, ClientError

from .pci import BAR0, CONFIG_SIZE, INTERRUPT_PIN, NUM_BARS, STATUS, Bar, PciFunction

REPLY_TIMEOUT = 30.0  # seconds a server may take to answer before the device is given up
CAP_LIST_BIT, CAP_POINTER, CAP_ID_MSI = 0x10, 0x34, 0x05
MSI_ENABLE, MSI_64BIT = 0x0001, 0x0080


class VfioUserError(Exception):
    """The device cannot be set up (the socket, the server's answers); the text says which."""


class FdTable(Protocol):
    """The CPR fd table (cpr/fdtable.py), as the device uses it."""

    def open(self, name: str, id_: str, opener: Callable[[], int], matches: Callable[[int], bool] | None = None): ...
    def claim(self, name: str, id_: str) -> int: ...
    def close(self, name: str, id_: str) -> bool: ...


@dataclass
class Wiring:
    """What the machine gives the device: the CPR table, guest RAM, and its MSI GSI's plumbing."""

    fds: FdTable
    mappings: list  # memory.Mapping: (gpa, size, block, offset) for DMA_MAP
    gsi: int  # the GSI the device's MSI is routed through
    set_route: Callable[[int, tuple[int, int] | None], None]  # (gsi, (address, data) or None)
    add_irqfd: Callable[[int, int], None]  # (gsi, eventfd): bound now if the VM's irqfds are
    remove_irqfd: Callable[[int], None]


class _Link:
    """The client, serialised (vCPU threads share it), and given up on the first failure."""

    def __init__(self, name: str, client: Client) -> None:
        self.name, self.client = name, client
        self.lock = threading.Lock()
        self.dead = False

    def lend(self) -> None:
        """cpr-transfer: the target asks the server about the device while it builds its VM, on
        this same connection; nothing here may use it meanwhile (a vCPU touching the device waits)."""
        self.lock.acquire()

    def give_back(self) -> None:
        self.lock.release()

    def call(self, fn: Callable[[Client], object], default: object = None) -> object:
        with self.lock:
            if self.dead:
                return default
            try:
                return fn(self.client)
            except (OSError, p.ProtocolError, p.Disconnected, ClientError, ValueError) as e:
                self.dead = True
                print(f"minivmm: {self.name}: the vfio-user server is gone ({e}): detached", file=sys.stderr)
                return default


class BarWindow(Device):
    """One BAR of the function: accesses go to the server's region of the same index."""

    name = "vfio-user-bar"

    def __init__(self, link: _Link, region: int) -> None:
        self.link, self.region = link, region

    def read(self, offset: int, size: int) -> int:
        data = self.link.call(lambda c: c.region_read(self.region, offset, size), b"")
        if len(data) != size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")
        self.link.call(lambda c: c.region_write(self.region, offset, data, posted=True))


class VfioUserPci(PciFunction):
    name = "vfio-user-pci"

    def __init__(self, dev_id: str, path: str, wiring: Wiring) -> None:
        self.dev_id, self.path, self.wiring = dev_id, path, wiring
        fd, kept = wiring.fds.open("vfio-user", dev_id, lambda: _connect(path), lambda fd: _peer(fd) == path)
        sock = socket.socket(fileno=os.dup(fd))  # the table keeps its own fd for the next update
        sock.settimeout(REPLY_TIMEOUT)
        client = Client(sock)
        try:
            if not kept:  # a connection kept across CPR was negotiated and mapped by the previous image
                client.negotiate()
                client.reset()  # as QEMU's machine reset at start-up: the device begins afresh
                self._map_ram(client)
            info = client.device_info()
            if info.num_regions <= vc.VFIO_PCI_CONFIG_REGION_INDEX:
                raise VfioUserError(f"the server has {info.num_regions} regions, no PCI configuration space")
            config = client.region_read(vc.VFIO_PCI_CONFIG_REGION_INDEX, 0, CONFIG_SIZE)
            sizes = [client.region_info(i).size for i in range(NUM_BARS)]
        except (OSError, p.ProtocolError, p.Disconnected, ClientError) as e:
            sock.close()
            raise VfioUserError(f"vfio-user server at '{path}': {e}") from None
        super().__init__(0, 0, 0)
        self.config[:] = config.ljust(CONFIG_SIZE, b"\xff")
        self.link = _Link(f"vfio-user-pci '{dev_id}'", client)
        for index, size in enumerate(sizes):
            if size:
                if size & (size - 1):
                    raise VfioUserError(f"vfio-user server at '{path}': BAR{index} of {size:#x} bytes")
                raw = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0]
                if raw & 0x7 == 0x4:
                    raise VfioUserError(f"vfio-user server at '{path}': BAR{index} is 64-bit (minivmm maps 32-bit)")
                self.add_bar(index, Bar("pio" if raw & 1 else "mmio", size, BarWindow(self.link, index)))
        self.config[INTERRUPT_PIN] = 0  # INTx is not wired: the guest sees a function without it
        self.msi = _find_msi(self.config)
        self.msi_route: tuple[int, int] | None = None
        # The server holds the MSI eventfd while the guest has MSI enabled: across CPR the table has it
        # (claimed now, so that nothing closes it before the state load re-enables it).
        self.server_has_msi = kept and wiring.fds.claim("vfio-user-msi", dev_id) >= 0
        self.initial = bytes(self.config)

    def _map_ram(self, client: Client) -> None:
        for m in self.wiring.mappings:
            block = m.block
            if block.fd < 0 or not block.shared:
                raise VfioUserError(
                    f"RAM block '{block.name}' has no shared memfd for the server to map: "
                    "use -object memory-backend-memfd,share=on (or aux-ram-share=on)"
                )
            flags = p.DMA_MAP_READ | (0 if block.readonly else p.DMA_MAP_WRITE)
            client.dma_map(m.gpa, m.size, block.fd, m.offset, flags)

    # --- configuration space ---------------------------------------------------------------------
    def write_config(self, offset: int, size: int, value: int) -> None:
        super().write_config(offset, size, value)
        if not size:  # a load re-reads the shadow: MSI as the guest left it, the same eventfd
            self._msi_changed()
            return
        if self.msi is not None and self.msi < offset + size and offset < self.msi + _msi_size(self.config, self.msi):
            self._write_msi(offset, size, value)
        data = value.to_bytes(size, "little")
        self.link.call(lambda c: c.region_write(vc.VFIO_PCI_CONFIG_REGION_INDEX, offset, data))

    def _write_msi(self, offset: int, size: int, value: int) -> None:
        """The MSI capability's writable part: the enable bit, the address and the data."""
        cap = self.msi
        for i in range(size):
            at, byte = offset + i, (value >> (8 * i)) & 0xFF
            if at == cap + 2:
                self.config[at] = (self.config[at] & ~MSI_ENABLE) | (byte & MSI_ENABLE)
            elif cap + 4 <= at < cap + _msi_size(self.config, cap):
                self.config[at] = byte
        self._msi_changed()

    def _msi_changed(self) -> None:
        """Route the MSI GSI to what the guest wrote; the eventfd goes to the server when MSI is enabled
        and is taken back when it is disabled."""
        cap = self.msi
        if cap is None:
            return
        control = struct.unpack_from("<H", self.config, cap + 2)[0]
        route = _msi_message(self.config, cap) if control & MSI_ENABLE else None
        if route == self.msi_route:
            return
        w = self.wiring
        if route is not None:
            fd, _ = w.fds.open("vfio-user-msi", self.dev_id, lambda: os.eventfd(0, os.EFD_CLOEXEC))
            w.set_route(w.gsi, route)
            if self.msi_route is None:
                w.add_irqfd(w.gsi, fd)
            if not self.server_has_msi:
                self.link.call(lambda c: c.set_eventfd(vc.VFIO_PCI_MSI_IRQ_INDEX, fd))
                self.server_has_msi = True
        else:
            w.remove_irqfd(w.gsi)
            w.set_route(w.gsi, None)
            if self.server_has_msi:
                self.link.call(lambda c: c.set_irqs(vc.VFIO_PCI_MSI_IRQ_INDEX, _DISABLE, count=0))
                self.server_has_msi = False
            w.fds.close("vfio-user-msi", self.dev_id)
        self.msi_route = route

    def reset(self) -> None:
        """The server resets the device; the shadow goes back to what firmware left, MSI off."""
        self.link.call(lambda c: c.reset())
        super().reset()  # its re-read of the shadow turns MSI off

    def close(self) -> None:
        self.link.client.close()


_DISABLE = vc.VFIO_IRQ_SET_DATA_NONE | vc.VFIO_IRQ_SET_ACTION_TRIGGER


def _connect(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise VfioUserError(f"Failed to connect to '{path}': {e.strerror}") from None
    return sock.detach()


def _peer(fd: int) -> str | None:
    """The path a kept connection leads to (a changed socket= on the new command line reconnects)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return s.getpeername()
    except OSError:
        return None


def _find_msi(config: bytearray) -> int | None:
    """The offset of the MSI capability, walking the list the server made (bounded, as it is input)."""
    if not struct.unpack_from("<H", config, STATUS)[0] & CAP_LIST_BIT:
        return None
    at, seen = config[CAP_POINTER] & 0xFC, set()
    while 0x40 <= at <= CONFIG_SIZE - 4 and at not in seen:
        seen.add(at)
        if config[at] == CAP_ID_MSI and at + _msi_size(config, at) <= CONFIG_SIZE:
            return at
        at = config[at + 1] & 0xFC
    return None


def _msi_size(config: bytearray, cap: int) -> int:
    return 14 if struct.unpack_from("<H", config, cap + 2)[0] & MSI_64BIT else 10


def _msi_message(config: bytearray, cap: int) -> tuple[int, int]:
    """(address, data) as the guest programmed them."""
    if struct.unpack_from("<H", config, cap + 2)[0] & MSI_64BIT:
        lo, hi, data = struct.unpack_from("<IIH", config, cap + 4)
        return hi << 32 | lo, data
    lo, data = struct.unpack_from("<IH", config, cap + 4)
    return lo, data

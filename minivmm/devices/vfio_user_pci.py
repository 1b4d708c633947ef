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
  minivmm. The eventfd is made once, with the device. INTx is not wired
  (the guest must use MSI).

Across cpr-exec and cpr-transfer the socket and the MSI eventfd are in the
CPR fd table ("vfio-user" and "vfio-user-msi", by device id): the new image
takes the very same connection (no new negotiation, no DMA_MAP: the server
still maps the same memfds) and binds the same eventfd to its VM. The
server never sees the update. A cpr-transfer target builds its VM while the
guest still runs in the source and asks the server about the device then:
the source lends it the connection for that time (``_Link.lend``; a vCPU
touching the device there waits, and nothing that holds it waits for the
main loop), and once the guest is handed over it never uses the connection
again. A normal migration is refused (the device's state is in the server,
which does not migrate it), and so is a CPR once the server has gone.

If the server goes away or stops answering, the function reads all ones and
drops writes, and one line says so: the guest and its RAM carry on. An
access the server refuses (an error reply) fails alone.
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

from .pci import BAR0, CONFIG_SIZE, INTERRUPT_PIN, NUM_BARS, Bar, PciFunction

REPLY_TIMEOUT = 30.0  # seconds a server may take to answer before the device is given up


class VfioUserError(Exception):
    """The device cannot be set up (the socket, the server's answers); the text says which."""


class FdTable(Protocol):
    """The CPR fd table (cpr/fdtable.py), as the device uses it."""

    def open(self, name: str, id_: str, opener: Callable[[], int]) -> tuple[int, bool]: ...


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
    """The client, serialised (vCPU threads share it). A broken connection detaches the device for
    good; an error the server answers with fails that access only."""

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
            except ClientError:
                return default
            except (OSError, p.ProtocolError, p.Disconnected, ValueError) as e:
                self.dead = True
                print(f"minivmm: {self.name}: the vfio-user server is gone ({e}): detached", file=sys.stderr)
                return default


class BarWindow(Device):
    """One BAR of the function: accesses go to the server's region of the same index."""

    name = "vfio-user-bar"

    def __init__(self, link: _Link, region: int, size: int) -> None:
        self.link, self.region, self.size = link, region, size

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if offset + size > self.size:  # past the BAR's end: nothing answers there
            return ones
        data = self.link.call(lambda c: c.region_read(self.region, offset, size), b"")
        return int.from_bytes(data, "little") if len(data) == size else ones

    def write(self, offset: int, size: int, value: int) -> None:
        if offset + size <= self.size:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.link.call(lambda c: c.region_write(self.region, offset, data, posted=True))


class VfioUserPci(PciFunction):
    name = "vfio-user-pci"

    def __init__(self, dev_id: str, path: str, wiring: Wiring) -> None:
        self.dev_id, self.path, self.wiring = dev_id, path, wiring
        # A connection in the CPR table is taken as it is: the previous image negotiated it and mapped RAM.
        fd, kept = wiring.fds.open("vfio-user", dev_id, lambda: _connect(path))
        sock = socket.socket(fileno=os.dup(fd))  # the table keeps its own fd for the next update
        try:
            sock.settimeout(REPLY_TIMEOUT)
            client = Client(sock)
            config, sizes = self._probe(client, kept)
        except BaseException:
            sock.close()
            raise
        super().__init__(0, 0, 0)
        self.config[:] = config[:CONFIG_SIZE].ljust(CONFIG_SIZE, b"\xff")
        self.link = _Link(f"vfio-user-pci '{dev_id}'", client)
        for index, size in enumerate(sizes):
            if size:
                raw = struct.unpack_from("<I", self.config, BAR0 + 4 * index)[0]
                self.add_bar(index, Bar("pio" if raw & 1 else "mmio", size, BarWindow(self.link, index, size)))
        self.config[INTERRUPT_PIN] = 0  # INTx is not wired: the guest sees a function without it
        if msi := self.find_msi():
            self.use_msi(msi)
        # The MSI eventfd: made (or found, across CPR) once and kept, so the table never changes later.
        self.msi_fd, _ = wiring.fds.open("vfio-user-msi", dev_id, lambda: os.eventfd(0, os.EFD_CLOEXEC))
        self.msi_route: tuple[int, int] | None = None
        self.initial = bytes(self.config)

    def _probe(self, client: Client, kept: bool) -> tuple[bytes, list[int]]:
        """The configuration space and the BAR sizes (a new connection is set up first)."""
        path = self.path
        try:
            if not kept:
                client.negotiate()
                client.reset()  # as QEMU's machine reset at start-up: the device begins afresh
                self._map_ram(client)
            info = client.device_info()
            if info.num_regions <= vc.VFIO_PCI_CONFIG_REGION_INDEX:
                raise VfioUserError(f"vfio-user server at '{path}': {info.num_regions} regions, no configuration space")
            config = client.region_read(vc.VFIO_PCI_CONFIG_REGION_INDEX, 0, CONFIG_SIZE)
            sizes = [client.region_info(i).size for i in range(NUM_BARS)]
        except (OSError, p.ProtocolError, p.Disconnected, ClientError) as e:
            raise VfioUserError(f"vfio-user server at '{path}': {e}") from None
        for index, size in enumerate(sizes):
            raw = int.from_bytes(config[BAR0 + 4 * index : BAR0 + 4 * index + 4], "little")
            if size and (size & (size - 1) or size > 1 << 31):
                raise VfioUserError(f"vfio-user server at '{path}': BAR{index} of {size:#x} bytes")
            if size and raw & 0x7 == 0x4:
                raise VfioUserError(f"vfio-user server at '{path}': BAR{index} is 64-bit (minivmm maps 32-bit)")
        return config, sizes

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
        """The shadow (the MSI capability's writable bits among it), then the server's copy."""
        value &= (1 << (8 * size)) - 1
        super().write_config(offset, size, value)
        self._msi_changed()
        if size:
            data = value.to_bytes(size, "little")
            self.link.call(lambda c: c.region_write(vc.VFIO_PCI_CONFIG_REGION_INDEX, offset, data))

    def _msi_changed(self) -> None:
        """Route the MSI GSI to what the guest wrote and give the server the eventfd when MSI comes
        on; take both away when it goes off. A load (and a kept connection) runs the same steps."""
        route = self.msi_message()
        if route == self.msi_route:
            return
        w = self.wiring
        w.set_route(w.gsi, route)
        if route is not None and self.msi_route is None:
            w.add_irqfd(w.gsi, self.msi_fd)
            self.link.call(lambda c: c.set_eventfd(vc.VFIO_PCI_MSI_IRQ_INDEX, self.msi_fd))
        elif route is None:
            w.remove_irqfd(w.gsi)
            self.link.call(lambda c: c.set_irqs(vc.VFIO_PCI_MSI_IRQ_INDEX, _DISABLE, count=0))
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

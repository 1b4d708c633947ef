"""-device vfio-user-pci: a PCI function whose model runs in another process,
reached over a unix socket with the vfio-user protocol (vfio_user/), as
QEMU's vfio-user-pci reaches it.

minivmm is the client:
- at start-up it negotiates the version, reads the function's configuration
  space and each BAR's size, and maps guest RAM for DMA by passing the RAM
  memfds (DMA_MAP with an fd, DMA address = guest-physical address), so the
  server reads and writes guest memory itself;
- the PCI function is vfio_function.py's, shared with kernel VFIO: the
  configuration shadow (every write also goes to the server), BARs as
  REGION_READ and REGION_WRITE (writes posted, as QEMU posts them), INTx,
  MSI and MSI-X as eventfds given with SET_IRQS and bound as KVM irqfds.
  This module is the transport: the vfio-user client.

Across cpr-exec and cpr-transfer the socket and the interrupt eventfds are
in the CPR fd table ("vfio-user" by device id, "ID_interrupt" by vector,
"ID_intx-interrupt", "ID_intx-unmask"): the new image takes the very same
connection (no new negotiation, no DMA_MAP: the server still maps the same
memfds), gives the server the same eventfds again and binds them to its VM.
That SET_IRQS is all the server sees of the update. A cpr-transfer target builds its VM while the
guest still runs in the source and asks the server about the device then:
the source lends it the connection for that time (``Link.lend``; a vCPU
touching the device there waits, and nothing that holds it waits for the
main loop), and once the guest is handed over it never uses the connection
again. A normal migration is refused (the device's state is in the server,
which does not migrate it), and so is a CPR once the server has gone.

If the server goes away or stops answering, the function reads all ones and
drops writes, and one line says so: the guest and its RAM carry on. An
access the server refuses (an error reply) fails alone.
"""

from __future__ import annotations

import mmap
import os
import socket

from minivmm.vfio import constants as vc
from minivmm.vfio_user import protocol as p
from minivmm.vfio_user.client import Client, ClientError

from .vfio_function import FdTable, FunctionError, Region, TransportError, TransportGone, VfioFunction, Wiring

__all__ = ["FdTable", "VfioUserError", "VfioUserPci", "VfioUserTransport", "Wiring"]

REPLY_TIMEOUT = 30.0  # seconds a server may take to answer before the device is given up
_BROKEN = (OSError, p.ProtocolError, p.Disconnected, ValueError)


class VfioUserError(Exception):
    """The device cannot be set up (the socket, the server's answers); the text says which."""


class VfioUserTransport:
    """The vfio-user client as a function's transport: a refused command fails alone, a broken
    connection (the server gone, 30 s without an answer) ends the transport."""

    keeps_irqs = False  # the server is told the eventfd again after an update (it may have restarted it)

    def __init__(self, client: Client) -> None:
        self.client = client

    def _do(self, fn):
        try:
            return fn(self.client)
        except ClientError as e:
            raise TransportError(str(e)) from None
        except _BROKEN as e:
            raise TransportGone(f"the vfio-user server is gone ({e})") from None

    def num_regions(self) -> int:
        return self._do(lambda c: c.device_info().num_regions)

    def region(self, index: int) -> Region:
        info = self._do(lambda c: c.region_info(index))
        return Region(info.size, info.flags, info.offset)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        return self._do(lambda c: c.region_read(region, offset, count))

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        self._do(lambda c: c.region_write(region, offset, data, posted=posted))

    def map_region(self, index: int, region: Region) -> mmap.mmap | None:
        return None  # every access goes over the socket

    def irq_count(self, index: int) -> int:
        try:
            return self._do(lambda c: c.irq_info(index).count)
        except TransportError:
            return 0  # an index the server does not have

    def set_irqs(self, index: int, action: int, fds: list[int] | None = None, count: int = 1) -> None:
        if fds is None:
            self._do(lambda c: c.set_irqs(index, vc.VFIO_IRQ_SET_DATA_NONE | action, count=count))
        else:  # in batches of what the server takes in one message (1 unless it said; a kept connection says nothing)
            flags, batch = vc.VFIO_IRQ_SET_DATA_EVENTFD | action, max(1, self.client.caps.get("max_msg_fds", 1))
            for at in range(0, len(fds), batch):
                part = fds[at : at + batch]
                self._do(lambda c, at=at, part=part: c.set_irqs(index, flags, start=at, count=len(part), fds=part))

    def reset(self) -> None:
        self._do(lambda c: c.reset())

    def close(self) -> None:
        self.client.close()


class VfioUserPci(VfioFunction):
    name = "vfio-user-pci"

    def __init__(self, dev_id: str, path: str, wiring: Wiring) -> None:
        self.dev_id, self.path = dev_id, path
        # A connection in the CPR table is taken as it is: the previous image negotiated it and mapped RAM.
        fd, kept = wiring.fds.open("vfio-user", dev_id, lambda: _connect(path))
        sock = socket.socket(fileno=os.dup(fd))  # the table keeps its own fd for the next update
        try:
            sock.settimeout(REPLY_TIMEOUT)
            client = Client(sock)
            if not kept:
                self._start(client, wiring)
            transport = VfioUserTransport(client)
            super().__init__(f"vfio-user-pci '{dev_id}'", transport, wiring, dev_id, kept)
        except (FunctionError, TransportError, TransportGone) as e:
            sock.close()
            raise VfioUserError(f"vfio-user server at '{path}': {e}") from None
        except BaseException:
            sock.close()
            raise

    def _start(self, client: Client, wiring: Wiring) -> None:
        """A new connection: the version, a reset (as QEMU's machine reset at start-up: the device
        begins afresh) and guest RAM for DMA, by its memfds."""
        try:
            client.negotiate()
            client.reset()
            for m in wiring.mappings:
                block = m.block
                if block.fd < 0 or not block.shared:
                    raise VfioUserError(
                        f"RAM block '{block.name}' has no shared memfd for the server to map: "
                        "use -object memory-backend-memfd,share=on (or aux-ram-share=on)"
                    )
                flags = p.DMA_MAP_READ | (0 if block.readonly else p.DMA_MAP_WRITE)
                client.dma_map(m.gpa, m.size, block.fd, m.offset, flags)
        except (*_BROKEN, ClientError) as e:
            raise VfioUserError(f"vfio-user server at '{self.path}': {e}") from None


def _connect(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise VfioUserError(f"Failed to connect to '{path}': {e.strerror}") from None
    return sock.detach()

"""A vfio-user client: the VMM's side of the socket (the start of minivmm's
vfio-user-pci device, and what the tests drive the sample server with).

Requests wait for their reply; DMA_READ/DMA_WRITE commands the server sends
meanwhile are answered from the memory given to ``dma_map`` without an fd.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

from minivmm.vfio import constants as vc

from . import protocol as p
from .protocol import Command, Message


class ClientError(Exception):
    """The server answered a command with an error."""

    def __init__(self, command: int, err: int) -> None:
        name = Command(command).name if command in Command._value2member_map_ else str(command)
        super().__init__(f"{name}: {os.strerror(err) if err else 'error'} (errno {err})")
        self.command, self.errno = command, err


@dataclass
class Client:
    sock: socket.socket
    caps: dict = field(default_factory=dict)  # the server's, after negotiate()
    memory: dict[int, bytearray] = field(default_factory=dict)  # DMA windows served by message, by address
    _id: int = 0

    @classmethod
    def connect(cls, path: str) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, command: int, payload: bytes = b"", fds=(), flags: int = 0) -> int:
        self._id = (self._id + 1) & 0xFFFF
        p.send(self.sock, Message.command(self._id, command, payload, flags, fds))
        return self._id

    def request(self, command: int, payload: bytes = b"", fds=(), flags: int = 0) -> Message:
        """Send a command and wait for its reply (or, with No_reply, for nothing)."""
        id_ = self.send(command, payload, fds, flags)
        if flags & p.FLAG_NO_REPLY:
            return Message(p.Header(id_, command, p.HEADER_SIZE))
        return self.wait(id_)

    def wait(self, id_: int) -> Message:
        while True:
            msg = p.receive(self.sock)
            for fd in msg.fds:
                os.close(fd)
            if not msg.header.is_reply:
                self._serve(msg)
            elif msg.header.id == id_:
                if msg.header.flags & p.FLAG_ERROR:
                    raise ClientError(msg.header.command, msg.header.error)
                return msg

    def _serve(self, msg: Message) -> None:
        """The server's DMA_READ/DMA_WRITE, against ``memory``, as QEMU's client answers them."""
        try:
            req = p.DmaAccess.decode(msg.payload)
            if msg.header.command not in (Command.DMA_READ, Command.DMA_WRITE):
                raise p.ProtocolError(errno.ENOSYS, "not a server command")
            for base, buf in self.memory.items():
                if base <= req.address and req.address + req.count <= base + len(buf):
                    at = req.address - base
                    if msg.header.command == Command.DMA_READ:
                        data = bytes(buf[at : at + req.count])
                        reply = msg.reply(p.DmaAccess(req.address, req.count, data).encode())
                    else:
                        buf[at : at + req.count] = req.data[: req.count]
                        reply = msg.reply()
                    break
            else:
                raise p.ProtocolError(errno.EFAULT, f"{req.address:#x}+{req.count:#x} is not mapped")
        except p.ProtocolError as e:
            reply = msg.error_reply(e.errno)
        if not msg.header.no_reply:
            p.send(self.sock, reply)

    # --- commands ------------------------------------------------------------------------------
    def negotiate(self, caps: dict | None = None) -> p.Version:
        mine = caps if caps is not None else {"max_msg_fds": p.MAX_MAX_FDS, "max_data_xfer_size": p.DEFAULT_MAX_XFER}
        reply = p.Version.decode(self.request(Command.VERSION, p.Version(capabilities=mine).encode()).payload)
        self.caps = reply.capabilities
        return reply

    def device_info(self) -> p.DeviceInfo:
        return p.DeviceInfo.decode(self.request(Command.DEVICE_GET_INFO, p.DeviceInfo(16, 0, 0, 0).encode()).payload)

    def region_info(self, index: int) -> p.RegionInfo:
        req = p.RegionInfo(32, 0, index, 0, 0, 0).encode()
        return p.RegionInfo.decode(self.request(Command.DEVICE_GET_REGION_INFO, req).payload)

    def irq_info(self, index: int) -> p.IrqInfo:
        req = p.IrqInfo(16, 0, index, 0).encode()
        return p.IrqInfo.decode(self.request(Command.DEVICE_GET_IRQ_INFO, req).payload)

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 1, fds=(), data: bytes = b"") -> None:
        req = p.IrqSet(20 + len(data), flags, index, start, count, data)
        self.request(Command.DEVICE_SET_IRQS, req.encode(), fds)

    def set_eventfd(self, index: int, fd: int, action: int = vc.VFIO_IRQ_SET_ACTION_TRIGGER) -> None:
        self.set_irqs(index, vc.VFIO_IRQ_SET_DATA_EVENTFD | action, fds=[fd])

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, p.RegionAccess(offset, region, count).encode())
        return p.RegionAccess.decode(reply.payload).data

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        """A write; ``posted`` sends it with No_reply, as QEMU's client sends BAR writes."""
        flags = p.FLAG_NO_REPLY if posted else 0
        self.request(Command.REGION_WRITE, p.RegionAccess(offset, region, len(data), data).encode(), flags=flags)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.region_read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(region, offset, value.to_bytes(4, "little"), posted)

    def dma_map(
        self,
        address: int,
        size: int,
        fd: int | None = None,
        offset: int = 0,
        flags: int = p.DMA_MAP_READ | p.DMA_MAP_WRITE,
        memory: bytearray | None = None,
    ) -> None:
        """A window the server reaches through ``fd`` (mmap), or through messages answered from ``memory``."""
        req = p.DmaMap(32, flags, offset, address, size).encode()
        self.request(Command.DMA_MAP, req, [fd] if fd is not None else [])
        if fd is None:
            self.memory[address] = memory if memory is not None else bytearray(size)

    def dma_unmap(self, address: int, size: int) -> None:
        self.request(Command.DMA_UNMAP, p.DmaUnmap(24, 0, address, size).encode())
        self.memory.pop(address, None)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

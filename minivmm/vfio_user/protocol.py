"""The vfio-user message codec: the 16-byte header, each command's payload as a
dataclass, and framed messages with their fds (SCM_RIGHTS) on a unix socket.

Layouts follow QEMU's docs/interop/vfio-user.rst and, where they differ,
QEMU's own client (hw/vfio-user/protocol.h), which is what a server meets:
DMA_READ/DMA_WRITE carry ``offset u64, count u32`` and data at payload byte 12
(the spec says ``address u64, count u64``, data at 16), and a reply's size
counts the 4 bytes C's struct padding adds after the fixed part.

Every ``decode`` takes bytes a peer controls: it checks lengths and raises
ProtocolError (with the errno a reply carries) instead of anything else.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct("<HHIII")  # id, command, size, flags, error
HEADER_SIZE = HEADER.size
TYPE_COMMAND, TYPE_REPLY, TYPE_MASK = 0x0, 0x1, 0xF
FLAG_NO_REPLY, FLAG_ERROR = 0x10, 0x20

MAJOR, MINOR = 0, 0  # what QEMU's client proposes (and accepts back)
DEFAULT_MAX_FDS = 1  # the spec's default when a peer does not say
DEFAULT_MAX_XFER = 1 << 20
MAX_MAX_FDS = 16  # QEMU's ceilings for what a server may announce
MAX_MAX_XFER = 64 << 20
PAGE_SIZE = 4096
# A message larger than this is refused (and its bytes skipped) before it is read into memory.
MAX_MESSAGE = DEFAULT_MAX_XFER + 4096


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class ProtocolError(Exception):
    """A message that cannot be carried out; ``errno`` goes in the error reply."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise ProtocolError(errno.EINVAL, f"{what}: payload of {len(data)} bytes, at least {size} expected")


@dataclass
class Header:
    id: int
    command: int
    size: int
    flags: int = TYPE_COMMAND
    error: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*HEADER.unpack_from(data))

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)


@dataclass
class Message:
    """A framed message: its header, payload and the fds that came (or go) with it."""

    header: Header
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)
    problem: ProtocolError | None = None  # a frame that could not be read whole (its payload is empty)

    @classmethod
    def command(cls, id_: int, command: int, payload: bytes = b"", flags: int = 0, fds=()) -> Message:
        return cls(Header(id_, command, HEADER_SIZE + len(payload), TYPE_COMMAND | flags), payload, list(fds))

    def reply(self, payload: bytes = b"", fds=()) -> Message:
        return Message(
            Header(self.header.id, self.header.command, HEADER_SIZE + len(payload), TYPE_REPLY), payload, list(fds)
        )

    def error_reply(self, err: int) -> Message:
        return Message(Header(self.header.id, self.header.command, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, err))

    def encode(self) -> bytes:
        return self.header.pack() + self.payload


# --- payloads ----------------------------------------------------------------------------------------
@dataclass
class Version:
    major: int = MAJOR
    minor: int = MINOR
    capabilities: dict = field(default_factory=dict)  # the "capabilities" object

    FIXED = struct.Struct("<HH")

    def encode(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        return self.FIXED.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def decode(cls, data: bytes) -> Version:
        _need(data, cls.FIXED.size, "VERSION")
        major, minor = cls.FIXED.unpack_from(data)
        text = data[cls.FIXED.size :]
        caps: dict = {}
        if text:
            if not text.endswith(b"\0"):
                raise ProtocolError(errno.EINVAL, "VERSION: the capabilities JSON is not NUL-terminated")
            try:
                doc = json.loads(text[:-1].decode())
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ProtocolError(errno.EINVAL, f"VERSION: malformed capabilities: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("capabilities", {}), dict):
                raise ProtocolError(errno.EINVAL, "VERSION: capabilities is not an object")
            caps = doc.get("capabilities", {})
        return cls(major, minor, caps)


def _fixed(fmt: str, name: str, fields: str):
    """A payload class of fixed fields, packed little-endian as ``fmt``."""
    layout = struct.Struct("<" + fmt)
    names = fields.split()

    def encode(self) -> bytes:
        return layout.pack(*(getattr(self, n) for n in names))

    @classmethod
    def decode(cls, data: bytes):
        _need(data, layout.size, name)
        return cls(*layout.unpack_from(data))

    return layout, encode, decode


@dataclass
class DmaMap:
    argsz: int
    flags: int  # bit 0 readable, bit 1 writeable
    offset: int  # in the fd
    address: int
    size: int
    LAYOUT, encode, decode = _fixed("IIQQQ", "DMA_MAP", "argsz flags offset address size")


DMA_MAP_READ, DMA_MAP_WRITE = 1 << 0, 1 << 1
DMA_UNMAP_ALL = 1 << 1


@dataclass
class DmaUnmap:
    argsz: int
    flags: int
    address: int
    size: int
    LAYOUT, encode, decode = _fixed("IIQQ", "DMA_UNMAP", "argsz flags address size")


@dataclass
class DeviceInfo:
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    LAYOUT, encode, decode = _fixed("IIII", "DEVICE_GET_INFO", "argsz flags num_regions num_irqs")


@dataclass
class RegionInfo:
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    LAYOUT, encode, decode = _fixed("IIIIQQ", "DEVICE_GET_REGION_INFO", "argsz flags index cap_offset size offset")


@dataclass
class IrqInfo:
    argsz: int
    flags: int
    index: int
    count: int
    LAYOUT, encode, decode = _fixed("IIII", "DEVICE_GET_IRQ_INFO", "argsz flags index count")


@dataclass
class IrqSet:
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL: one byte per interrupt
    LAYOUT = struct.Struct("<IIIII")

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def decode(cls, data: bytes) -> IrqSet:
        _need(data, cls.LAYOUT.size, "DEVICE_SET_IRQS")
        return cls(*cls.LAYOUT.unpack_from(data), data=bytes(data[cls.LAYOUT.size :]))


@dataclass
class RegionAccess:
    """REGION_READ and REGION_WRITE: a request (data only in a write) or a reply (data only in a read)."""

    offset: int
    region: int
    count: int
    data: bytes = b""
    LAYOUT = struct.Struct("<QII")

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, data: bytes) -> RegionAccess:
        _need(data, cls.LAYOUT.size, "REGION_READ/WRITE")
        return cls(*cls.LAYOUT.unpack_from(data), data=bytes(data[cls.LAYOUT.size :]))


@dataclass
class DmaAccess:
    """DMA_READ and DMA_WRITE, server to client, as QEMU's client lays them out (VFIOUserDMARW):
    offset u64, count u32, data from byte 12, and a fixed part C pads to 16."""

    address: int
    count: int
    data: bytes = b""
    LAYOUT = struct.Struct("<QI")
    PADDED = 16  # sizeof(VFIOUserDMARW) - sizeof(VFIOUserHdr): QEMU wants size >= header + 16

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.address, self.count) + self.data + bytes(self.PADDED - self.LAYOUT.size)

    @classmethod
    def decode(cls, data: bytes) -> DmaAccess:
        _need(data, cls.LAYOUT.size, "DMA_READ/WRITE")
        address, count = cls.LAYOUT.unpack_from(data)
        return cls(address, count, bytes(data[cls.LAYOUT.size : cls.LAYOUT.size + count]))  # no padding


@dataclass
class WriteMulti:
    """REGION_WRITE_MULTI: up to 8 bytes per write, ``(offset, region, count, data)`` each."""

    writes: list[tuple[int, int, int, bytes]]
    COUNT = struct.Struct("<Q")
    ONE = struct.Struct("<QII8s")

    def encode(self) -> bytes:
        return self.COUNT.pack(len(self.writes)) + b"".join(self.ONE.pack(*w) for w in self.writes)

    @classmethod
    def decode(cls, data: bytes) -> WriteMulti:
        _need(data, cls.COUNT.size, "REGION_WRITE_MULTI")
        (n,) = cls.COUNT.unpack_from(data)
        if n > (len(data) - cls.COUNT.size) // cls.ONE.size:
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI: {n} writes do not fit in {len(data)} bytes")
        writes = []
        for i in range(n):
            offset, region, count, raw = cls.ONE.unpack_from(data, cls.COUNT.size + i * cls.ONE.size)
            if count > 8:
                raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI: write {i} has count {count} (at most 8)")
            writes.append((offset, region, count, raw[:count]))
        return cls(writes)


# --- framing on a unix socket -------------------------------------------------------------------------
class Disconnected(Exception):
    """The peer closed the connection."""


def send(sock: socket.socket, msg: Message) -> None:
    data = msg.encode()
    if msg.fds:
        sent = socket.send_fds(sock, [data], msg.fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int], max_fds: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data, new_fds, _flags, _addr = socket.recv_fds(sock, n - got, max(max_fds, 1))
        fds.extend(new_fds)
        if not data:
            for fd in fds:  # a frame cut short: what came with it goes
                os.close(fd)
            fds.clear()
            raise Disconnected("the peer closed the connection")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def receive(sock: socket.socket, max_fds: int = MAX_MAX_FDS, max_size: int = MAX_MESSAGE) -> Message:
    """One framed message. A size below the header's is taken as the header alone, and one above
    ``max_size`` has its payload skipped: both come back with ``problem`` set, so the caller
    replies with an error and the stream stays in step."""
    fds: list[int] = []
    header = Header.unpack(_recv_exact(sock, HEADER_SIZE, fds, max_fds))
    if header.size < HEADER_SIZE:
        return Message(header, b"", fds, ProtocolError(errno.EINVAL, f"message size {header.size} < {HEADER_SIZE}"))
    remaining = header.size - HEADER_SIZE
    if header.size > max_size:
        while remaining:
            remaining -= len(_recv_exact(sock, min(remaining, 1 << 16), fds, max_fds))
        return Message(header, b"", fds, ProtocolError(errno.E2BIG, f"message size {header.size} > {max_size}"))
    return Message(header, _recv_exact(sock, remaining, fds, max_fds), fds)

"""The migration stream: a header with the RAM block list, RAM page records,
the machine state blob (vmstate.py, with its own checksum), and an end mark.

RAM goes from the source's mmap straight into the socket or file and, on the
other side, from the socket straight into the target's mmap: no copies in
Python. Every record is bounds-checked against the receiving block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from minivmm.memory import RamBlock

MAGIC = b"MVMM"
VERSION = 1
REC_PAGES, REC_STATE, REC_END, REC_TIMES = 1, 2, 3, 4
PAGE_SIZE = 4096

_HEAD = struct.Struct("<4sI")
_PAGES = struct.Struct("<BHQQ")  # type, block index, offset, length
_STATE = struct.Struct("<BQ")  # type, length


class StreamError(ValueError):
    pass


@dataclass(frozen=True)
class BlockInfo:
    name: str
    size: int
    sent: bool  # False: not in the stream (shared RAM with x-ignore-shared)


@dataclass(frozen=True)
class Placement:
    """A piece of a block in guest-physical memory (the machine's memory map)."""

    gpa: int
    size: int
    block: int  # index into the block list
    offset: int


class Writer:
    def __init__(self, out) -> None:
        self.out = out  # a socket (sendall) or an unbuffered file (write)
        self._send = out.sendall if hasattr(out, "sendall") else self._write_all
        self.bytes = 0

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:
            n = self.out.write(view)
            view = view[n:]

    def _put(self, data) -> None:
        self._send(data)
        self.bytes += len(data)

    def header(self, blocks: list[BlockInfo], layout: list[Placement]) -> None:
        body = bytearray(struct.pack("<I", len(blocks)))
        for b in blocks:
            name = b.name.encode()
            body += struct.pack("<H", len(name)) + name + struct.pack("<QB", b.size, b.sent)
        body += struct.pack("<I", len(layout))
        for p in layout:
            body += struct.pack("<QQIQ", p.gpa, p.size, p.block, p.offset)
        self._put(_HEAD.pack(MAGIC, VERSION) + struct.pack("<I", len(body)) + body)

    def pages(self, block_index: int, offset: int, data: memoryview) -> None:
        self._put(_PAGES.pack(REC_PAGES, block_index, offset, len(data)))
        self._put(data)

    def state(self, blob: bytes) -> None:
        self._put(_STATE.pack(REC_STATE, len(blob)) + blob)

    def times(self, times: dict[str, int]) -> None:
        """The source's CLOCK_MONOTONIC timestamps (ns), for the target's phase timeline."""
        body = b"".join(struct.pack("<B", len(k)) + k.encode() + struct.pack("<Q", v) for k, v in times.items())
        self._put(struct.pack("<BH", REC_TIMES, len(times)) + body)

    def end(self) -> None:
        self._put(bytes([REC_END]))


class Reader:
    def __init__(self, src) -> None:
        self.src = src
        self._recv_into = src.recv_into if hasattr(src, "recv_into") else src.readinto
        self.bytes = 0

    def _fill(self, view: memoryview, what: str) -> None:
        while view:
            n = self._recv_into(view)
            if not n:
                raise StreamError(f"truncated migration stream: {len(view)} more bytes expected in {what}")
            view = view[n:]
            self.bytes += n

    def _take(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._fill(memoryview(buf), what)
        return bytes(buf)

    def header(self) -> tuple[list[BlockInfo], list[Placement]]:
        magic, version = _HEAD.unpack(self._take(_HEAD.size, "the header"))
        if magic != MAGIC:
            raise StreamError(f"Not a migration stream (bad magic {int.from_bytes(magic, 'big'):x})")
        if version != VERSION:
            raise StreamError(f"Unsupported migration stream version {version}")
        (length,) = struct.unpack("<I", self._take(4, "the header"))
        if length > 1 << 20:
            raise StreamError(f"migration stream header of {length} bytes is too large")
        body = self._take(length, "the header")
        (count,) = struct.unpack_from("<I", body)
        pos, blocks = 4, []
        try:
            for _ in range(count):
                (n,) = struct.unpack_from("<H", body, pos)
                name = body[pos + 2 : pos + 2 + n].decode()
                size, sent = struct.unpack_from("<QB", body, pos + 2 + n)
                pos += 2 + n + 9
                blocks.append(BlockInfo(name, size, bool(sent)))
            (count,) = struct.unpack_from("<I", body, pos)
            layout = [Placement(*struct.unpack_from("<QQIQ", body, pos + 4 + 28 * i)) for i in range(count)]
        except (struct.error, UnicodeDecodeError):
            raise StreamError("corrupt RAM block list in the migration stream header") from None
        return blocks, layout

    def next_record(self) -> int:
        return self._take(1, "a record")[0]

    def pages_into(self, blocks: list[RamBlock]) -> int:
        """A REC_PAGES record (its type byte already read), straight into guest RAM."""
        _, index, offset, length = _PAGES.unpack(bytes([REC_PAGES]) + self._take(_PAGES.size - 1, "a page record"))
        if index >= len(blocks):
            raise StreamError(f"RAM page record for unknown block {index}")
        block = blocks[index]
        if offset % PAGE_SIZE or offset + length > block.size:
            raise StreamError(f"RAM page record {offset:#x}+{length:#x} is outside '{block.name}' ({block.size:#x})")
        self._fill(memoryview(block.mem)[offset : offset + length], f"'{block.name}' at {offset:#x}")
        return length

    def times(self) -> dict[str, int]:
        (count,) = struct.unpack("<H", self._take(2, "the timestamps"))
        out = {}
        for _ in range(count):
            n = self._take(1, "the timestamps")[0]
            name = self._take(n, "the timestamps").decode(errors="replace")
            out[name] = struct.unpack("<Q", self._take(8, "the timestamps"))[0]
        return out

    def state(self) -> bytes:
        (length,) = struct.unpack("<Q", self._take(8, "the device state"))
        if length > 64 << 20:
            raise StreamError(f"device state of {length} bytes is too large")
        return self._take(length, "the device state")

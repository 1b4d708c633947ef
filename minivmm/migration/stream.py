"""The migration stream: a header with the RAM block list, RAM page records,
the machine state blob (vmstate.py, with its own checksum), and an end mark.

RAM goes from the source's mmap straight into the socket or file and, on the
other side, from the socket straight into the target's mmap: no copies in
Python (but for pages sent while the guest runs, which are copied so that
their checksum matches what is sent). Every record is bounds-checked against the receiving block.

Large records are checksummed off the I/O thread (``_Workers``; zlib and
file I/O let go of the GIL). On a socket, one worker computes the next
record's CRC while this thread sends the current one, and the target checks
each record while it reads the next. In a file every record has a known
place, so a stopped guest's RAM goes as QEMU's mapped-ram with multifd
takes it: ``IO_THREADS`` workers each checksum and pwrite (or pread and
check) records of their own at their offsets, using every core for the
copies and page allocation that dominate a file migration. The bytes are
the same either way. Every check is done before the end mark is accepted
(nothing runs the loaded RAM before that).

Version 2 (this one writes it; version 1 still loads) adds integrity: a
CRC-32 of the header, of each page record's header (checked before a byte is
written, so a flipped offset is refused rather than written to the wrong
place) and of its data, of the timestamps, and an end mark that counts the
page records and bytes, so a record lost on the way is noticed too.

A reader on a socket gives up when nothing arrives for ``timeout()``
seconds (MINIVMM_STREAM_TIMEOUT, default 30): a stalled source never keeps
the target waiting forever.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from minivmm.memory import RamBlock
from minivmm.options import OptionError, seconds_from_env

MAGIC = b"MVMM"
VERSION = 2
OLDEST_VERSION = 1
REC_PAGES, REC_STATE, REC_END, REC_TIMES = 1, 2, 3, 4
PAGE_SIZE = 4096
MAX_HEADER = 1 << 20
MAX_STATE = 64 << 20
# The target's answer on the main channel, for a source with the return-path capability.
VERDICT_OK = b"OK\n"
TIMEOUT_ENV = "MINIVMM_STREAM_TIMEOUT"
DEFAULT_TIMEOUT = 30.0

_HEAD = struct.Struct("<4sI")
_PAGES_V1 = struct.Struct("<BHQQ")  # type, block index, offset, length
_PAGES = struct.Struct("<BHQQII")  # ... then CRC-32 of the data, CRC-32 of the 23 bytes before
_STATE = struct.Struct("<BQ")  # type, length
_END = struct.Struct("<BQQI")  # type, page records, page bytes, CRC-32 of the 17 bytes before


PIPELINE_MIN = 1 << 20  # on a socket, records at least this large are checksummed by a worker
IO_THREADS = min(4, os.cpu_count() or 1)  # a file's workers: the copies scale with cores, not beyond


class StreamError(ValueError):
    pass


class _Workers:
    """A pool for checksums and positioned file I/O, made at the first large record."""

    def __init__(self, n: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="stream-io")

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _regular_fd(io) -> int | None:
    """The fd of a regular file, whose records can be written and read at their offsets; else None."""
    if hasattr(io, "sendall") or not hasattr(io, "fileno"):
        return None
    try:
        fd = io.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError):  # an in-memory buffer has no fd
        return None


def _pwrite_all(fd: int, buffers: list, pos: int) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.pwritev(fd, views, pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][n:]


def _read_at(fd: int, view: memoryview, pos: int, what: str) -> int:
    """pread all of ``view`` from ``pos``, then its CRC-32 (a worker's job)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if not n:
            raise StreamError(f"truncated migration stream: {len(view) - done} more bytes expected in {what}")
        done += n
    return zlib.crc32(view)


def timeout() -> float:
    """Seconds of silence after which a socket stream is given up (MINIVMM_STREAM_TIMEOUT)."""
    try:
        return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    except OptionError as e:
        raise StreamError(str(e)) from None


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
        self.page_records = 0
        self.page_bytes = 0
        self._fd = _regular_fd(out)
        self._workers: _Workers | None = None

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None

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
        head = _HEAD.pack(MAGIC, VERSION) + struct.pack("<I", len(body))
        self._put(head + body + struct.pack("<I", zlib.crc32(body)))

    def pages(self, block_index: int, offset: int, data: memoryview, live: bool = False) -> None:
        """``live``: the guest runs and may change the pages as they go, so a copy is checked
        and sent (the dirty log sends them again); a stopped guest's go straight from RAM."""
        if live:
            data = bytes(data)
        self._record(block_index, offset, data, zlib.crc32(data))

    def stopped_pages(self, records: Iterable[tuple[int, int, memoryview]]) -> None:
        """(block index, offset, data) records of a stopped guest's RAM: in a file, written at
        their places by the workers; on a socket, each record's CRC is computed by a worker
        while the one before it is sent."""
        if self._fd is not None:
            self._stopped_to_file(records)
            return
        if self._workers is None:
            self._workers = _Workers(1)
        records = iter(records)
        current = next(records, None)
        crc = self._workers.submit(zlib.crc32, current[2]) if current is not None else None
        while current is not None:
            following = next(records, None)
            index, offset, data = current
            value = crc.result()
            if following is not None:
                crc = self._workers.submit(zlib.crc32, following[2])
            self._record(index, offset, data, value)
            current = following

    def _stopped_to_file(self, records: Iterable[tuple[int, int, memoryview]]) -> None:
        if self._workers is None:
            self._workers = _Workers(IO_THREADS)
        pos = self.out.tell()
        pending: deque = deque()
        try:
            for index, offset, data in records:
                pending.append(self._workers.submit(self._write_at, pos, index, offset, data))
                pos += _PAGES.size + len(data)
                self.bytes += _PAGES.size + len(data)
                self._count(data)
                if len(pending) > 2 * self._workers.n:  # a bounded queue: an error stops the rest soon
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:  # a failure or a cancel: nothing may still write once this returns
            for job in pending:
                job.cancel()
            for job in pending:
                if not job.cancelled():
                    job.exception()
        self.out.seek(pos)

    def _write_at(self, pos: int, index: int, offset: int, data) -> None:
        _pwrite_all(self._fd, [_page_head(index, offset, data, zlib.crc32(data)), data], pos)

    def _record(self, block_index: int, offset: int, data, crc: int) -> None:
        self._put(_page_head(block_index, offset, data, crc))
        self._put(data)
        self._count(data)

    def _count(self, data) -> None:
        self.page_records += 1
        self.page_bytes += len(data)

    def state(self, blob: bytes) -> None:
        self._put(_STATE.pack(REC_STATE, len(blob)) + blob)

    def times(self, times: dict[str, int]) -> None:
        """The source's CLOCK_MONOTONIC timestamps (ns), for the target's phase timeline."""
        body = struct.pack("<H", len(times)) + b"".join(
            struct.pack("<B", len(k)) + k.encode() + struct.pack("<Q", v) for k, v in times.items()
        )
        self._put(bytes([REC_TIMES]) + body + struct.pack("<I", zlib.crc32(body)))

    def end(self) -> None:
        head = _END.pack(REC_END, self.page_records, self.page_bytes, 0)[:-4]
        self._put(head + struct.pack("<I", zlib.crc32(head)))


def _page_head(block_index: int, offset: int, data, crc: int) -> bytes:
    head = _PAGES.pack(REC_PAGES, block_index, offset, len(data), crc, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


class Reader:
    def __init__(self, src, timeout_s: float | None = None) -> None:
        self.src = src
        self._recv_into = src.recv_into if hasattr(src, "recv_into") else src.readinto
        self.bytes = 0
        self.version = VERSION
        self.infos: list[BlockInfo] = []
        self.page_records = 0
        self.page_bytes = 0
        self._fd = _regular_fd(src)
        self._workers: _Workers | None = None
        self._checks: list = []  # (CRC future, expected, block name, offset) of records read
        self._reading: deque = deque()  # a file's reads in flight: (block index, start, end, future)
        self.timeout = None
        if hasattr(src, "settimeout"):  # a socket; a file cannot stall
            self.timeout = timeout() if timeout_s is None else timeout_s
            src.settimeout(self.timeout)

    def _fill(self, view: memoryview, what: str) -> None:
        while view:
            try:
                n = self._recv_into(view)
            except TimeoutError:
                raise StreamError(
                    f"migration stream stalled: nothing received for {self.timeout:g} s while reading {what}"
                ) from None
            if not n:
                raise StreamError(f"truncated migration stream: {len(view)} more bytes expected in {what}")
            view = view[n:]
            self.bytes += n

    def _take(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._fill(memoryview(buf), what)
        return bytes(buf)

    def _crc(self, data, what: str) -> None:
        (want,) = struct.unpack("<I", self._take(4, what))
        if zlib.crc32(data) != want:
            raise StreamError(f"{what}: checksum mismatch: the migration stream is corrupt")

    def header(self) -> tuple[list[BlockInfo], list[Placement]]:
        magic, version = _HEAD.unpack(self._take(_HEAD.size, "the header"))
        if magic != MAGIC:
            raise StreamError(f"Not a migration stream (bad magic {int.from_bytes(magic, 'big'):x})")
        if not OLDEST_VERSION <= version <= VERSION:
            raise StreamError(f"Unsupported migration stream version {version}")
        self.version = version
        (length,) = struct.unpack("<I", self._take(4, "the header"))
        if length > MAX_HEADER:
            raise StreamError(f"migration stream header of {length} bytes is too large")
        body = self._take(length, "the header")
        if version >= 2:
            self._crc(body, "the migration stream header")
        blocks, layout = _parse_header(body)
        self.infos = blocks
        return blocks, layout

    def next_record(self) -> int:
        return self._take(1, "a record")[0]

    def pages_into(self, blocks: list[RamBlock]) -> int:
        """A REC_PAGES record (its type byte already read), straight into guest RAM."""
        fmt = _PAGES if self.version >= 2 else _PAGES_V1
        head = bytes([REC_PAGES]) + self._take(fmt.size - 1, "a page record")
        if self.version >= 2:
            _, index, offset, length, data_crc, head_crc = fmt.unpack(head)
            if zlib.crc32(head[:-4]) != head_crc:
                raise StreamError("RAM page record header: checksum mismatch: the migration stream is corrupt")
        else:
            _, index, offset, length = fmt.unpack(head)
        if index >= len(blocks):
            raise StreamError(f"RAM page record for unknown block {index}")
        block = blocks[index]
        if index < len(self.infos) and not self.infos[index].sent:
            raise StreamError(f"RAM page record for '{block.name}', which the header says is not sent")
        if offset % PAGE_SIZE or length % PAGE_SIZE or not length or offset + length > block.size:
            raise StreamError(f"RAM page record {offset:#x}+{length:#x} is outside '{block.name}' ({block.size:#x})")
        where = memoryview(block.mem)[offset : offset + length]
        what = f"'{block.name}' at {offset:#x}"
        if self.version >= 2 and (self._fd is not None or length >= PIPELINE_MIN):  # a worker checks it
            if self._workers is None:
                self._workers = _Workers(IO_THREADS if self._fd is not None else 1)
            if self._fd is not None:  # a file: the worker reads it too, and this thread goes on
                self._settle(index, offset, offset + length)
                job = self._workers.submit(_read_at, self._fd, where, self.src.tell(), what)
                self._reading.append((index, offset, offset + length, job))
                self.src.seek(length, os.SEEK_CUR)
                self.bytes += length
            else:
                self._fill(where, what)
                job = self._workers.submit(zlib.crc32, where)
            self._checks.append((job, data_crc, block.name, offset))
        else:
            self._fill(where, what)
            if self.version >= 2 and zlib.crc32(where) != data_crc:
                _corrupt(block.name, offset)
        self.page_records += 1
        self.page_bytes += length
        return length

    def _settle(self, index: int, start: int, end: int) -> None:
        """Before a read goes to a worker: the reads of the same pages in flight finish first (a
        stream may send a page twice, the later copy winning), and at most a few are in flight."""
        while len(self._reading) >= 2 * self._workers.n:
            self._reading.popleft()[3].exception()
        for other, lo, hi, job in self._reading:
            if other == index and lo < end and start < hi:
                job.exception()  # waits; a failed read is reported with the checks, at the end mark

    def times(self) -> dict[str, int]:
        (count,) = struct.unpack("<H", self._take(2, "the timestamps"))
        body = bytearray(struct.pack("<H", count))
        out = {}
        for _ in range(count):
            n = self._take(1, "the timestamps")
            name = self._take(n[0], "the timestamps")
            at = self._take(8, "the timestamps")
            body += n + name + at
            out[name.decode(errors="replace")] = struct.unpack("<Q", at)[0]
        if self.version >= 2:
            self._crc(body, "the timestamps")
        return out

    def state(self) -> bytes:
        (length,) = struct.unpack("<Q", self._take(8, "the device state"))
        if length > MAX_STATE:
            raise StreamError(f"device state of {length} bytes is too large")
        return self._take(length, "the device state")

    def close(self) -> None:
        """Stop checksumming (the stream is done with, loaded or not)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        self._checks.clear()
        self._reading.clear()

    def end(self) -> None:
        """The end mark (its type byte already read): version 2 counts what was sent, and
        every record's data must have matched its checksum."""
        if self.version < 2:
            return
        for crc, want, name, offset in self._checks:
            if crc.result() != want:
                _corrupt(name, offset)
        self._checks.clear()
        head = bytes([REC_END]) + self._take(_END.size - 1, "the end mark")
        _, records, nbytes, crc = _END.unpack(head)
        if zlib.crc32(head[:-4]) != crc:
            raise StreamError("the end mark: checksum mismatch: the migration stream is corrupt")
        if (records, nbytes) != (self.page_records, self.page_bytes):
            raise StreamError(
                f"the source sent {records} RAM page records ({nbytes:#x} bytes) but "
                f"{self.page_records} ({self.page_bytes:#x} bytes) arrived"
            )


def _corrupt(name: str, offset: int):
    raise StreamError(f"RAM page record '{name}' at {offset:#x}: checksum mismatch: the data is corrupt")


def _parse_header(body: bytes) -> tuple[list[BlockInfo], list[Placement]]:
    """The block list and the layout; every malformation is a StreamError naming the entry."""
    where = "migration stream header"
    pos, blocks, names = 0, [], set()
    try:
        (count,) = struct.unpack_from("<I", body, pos)
        pos += 4
        if count > len(body) // 11:  # each entry takes at least 11 bytes
            raise StreamError(f"{where}: {count} RAM blocks cannot fit in {len(body)} bytes")
        for i in range(count):
            (n,) = struct.unpack_from("<H", body, pos)
            raw = body[pos + 2 : pos + 2 + n]
            if len(raw) != n:
                raise struct.error("short name")
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                raise StreamError(f"{where}: block[{i}] name: invalid UTF-8") from None
            size, sent = struct.unpack_from("<QB", body, pos + 2 + n)
            pos += 2 + n + 9
            if name in names:
                raise StreamError(f"{where}: block '{name}' is listed twice")
            if sent > 1:
                raise StreamError(f"{where}: block '{name}' sent flag {sent} is not 0 or 1")
            names.add(name)
            blocks.append(BlockInfo(name, size, bool(sent)))
        (count,) = struct.unpack_from("<I", body, pos)
        pos += 4
        if count > (len(body) - pos) // 28:
            raise StreamError(f"{where}: {count} layout entries cannot fit in {len(body) - pos} bytes")
        layout = [Placement(*struct.unpack_from("<QQIQ", body, pos + 28 * i)) for i in range(count)]
        pos += 28 * count
    except struct.error:
        raise StreamError(f"{where}: truncated RAM block list or layout") from None
    if pos != len(body):
        raise StreamError(f"{where}: {len(body) - pos} bytes after the layout")
    return blocks, layout

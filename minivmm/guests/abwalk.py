"""The shipped A-B walker, seen from outside the VM: its status block and its
invariant, read through the RAM memfd (guests/abwalk.S documents the block).
The demo, the benchmarks and the tests all judge the guest with this.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

STATUS_GPA = 0x1FF000
MAGIC = 0x4B574241  # "ABWK"
PAGE = 4096
FOUR_GIB = 1 << 32
BELOW_4G_WHEN_SPLIT = 3 << 30


@dataclass(frozen=True)
class Status:
    passes: int
    current: int
    ranges: list[tuple[int, int]]


def gpa_to_offset(gpa: int, ram_size: int) -> int:
    """Offset in the RAM memfd of a guest-physical address (layout: machine.ram_ranges)."""
    if ram_size >= 0xE0000000 and gpa >= FOUR_GIB:
        return gpa - FOUR_GIB + BELOW_4G_WHEN_SPLIT
    return gpa


def read_status(fd: int) -> Status | None:
    """None until the walker has written its magic."""
    head = os.pread(fd, 32, STATUS_GPA)
    magic, version, passes, current, nranges = struct.unpack("<IIQQQ", head)
    if magic != MAGIC:
        return None
    assert version == 1
    raw = os.pread(fd, 16 * nranges, STATUS_GPA + 32)
    ranges = [struct.unpack_from("<QQ", raw, 16 * i) for i in range(nranges)]
    return Status(passes, current, ranges)


def check_invariant(fd: int, ram_size: int) -> int:
    """Every walked page's first byte is v+1 before ``current`` and v after it;
    the page at ``current`` (stored just before its increment) holds either.

    Reads with the VM stopped; returns the number of pages checked.
    """
    status = read_status(fd)
    assert status is not None, "the walker has not started"
    before: set[int] = set()
    after: set[int] = set()
    pages = 0
    at_current = None
    with mmap.mmap(fd, ram_size, mmap.MAP_SHARED, mmap.PROT_READ) as ram:
        for start, end in status.ranges:
            offset = gpa_to_offset(start, ram_size)
            split = min(max(status.current, start), end)
            before.update(ram[offset : offset + split - start : PAGE])
            after.update(ram[offset + split - start + PAGE : offset + end - start : PAGE])
            if start <= status.current < end:
                at_current = ram[offset + split - start]
            pages += (end - start) // PAGE
    where = f"walker at {status.current:#x}"
    assert len(after) <= 1, f"pages after the {where} differ: {sorted(after)[:8]}"
    assert len(before) <= 1, f"pages before the {where} differ: {sorted(before)[:8]}"
    if before and after:
        assert before == {(next(iter(after)) + 1) & 0xFF}, f"{where}: before {before}, after {after}"
    if at_current is not None and (before or after):
        v = next(iter(after)) if after else (next(iter(before)) - 1) & 0xFF
        assert at_current in (v, (v + 1) & 0xFF), f"{where}: its page holds {at_current}, not {v} or {v + 1}"
    return pages

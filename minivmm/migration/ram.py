"""Sending guest RAM: whole blocks, all-zero chunks skipped on the first pass
(the target's fresh memfd is zero already), and the chunks KVM's dirty log
says changed since the last pass.
"""

from __future__ import annotations

import ctypes

from minivmm.kvm import constants as c
from minivmm.memory import PAGE_SIZE, RamBlock, Slot

CHUNK = 64 * PAGE_SIZE  # one 64-bit word of the dirty bitmap
_ZERO = bytes(CHUNK)
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


def is_zero(block: RamBlock, offset: int, length: int) -> bool:
    return _memcmp(block.host_addr + offset, _ZERO, length) == 0


class DirtyLog:
    """KVM dirty logging on the memory slots of the blocks being migrated."""

    def __init__(self, vm, slots: list[Slot]) -> None:
        self.vm = vm
        self.slots = [s for s in slots if not s.mapping.block.readonly]
        self.bitmaps = {s.slot: (ctypes.c_uint64 * -(-s.mapping.size // CHUNK))() for s in self.slots}

    def _set(self, on: bool) -> None:
        for s in self.slots:
            m = s.mapping
            flags = c.KVM_MEM_LOG_DIRTY_PAGES if on else 0
            self.vm.set_user_memory_region(s.slot, m.gpa, m.size, m.block.host_addr + m.offset, flags)

    def start(self) -> None:
        self._set(True)

    def stop(self) -> None:
        self._set(False)

    def dirty_chunks(self) -> list[tuple[RamBlock, int, int]]:
        """(block, offset, length) of every 256 KiB chunk written since the last call."""
        out = []
        for s in self.slots:
            bitmap = self.bitmaps[s.slot]
            self.vm.get_dirty_log(s.slot, bitmap)
            m = s.mapping
            for word, bits in enumerate(bitmap):
                if bits:
                    start = word * CHUNK
                    out.append((m.block, m.offset + start, min(CHUNK, m.size - start)))
        return out

"""Port 0x80, the POST-code port: guests write boot-phase markers here.

minivmm keeps the last value and a count, so tests and benchmarks can see how
far a guest got; ``-d postcode`` prints each marker with the time since the
machine started. A read returns the last value written, cut to the size of
the read (``outl`` then ``inb`` gives the low byte); the count wraps at 2**64.

Both live in a ``Latch`` the C run loop can write: a write here only stores
and counts, so C does it without the round trip to Python (not when tracing,
which prints).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from minivmm.devices.device import Device
from minivmm.kvm.runloop import Latch
from minivmm.vmstate import VMSD, Field

COUNT_MASK = (1 << 64) - 1
VMSTATE = VMSD("post-code", 1, 1, (Field("last", "u32"), Field("count", "u64")))


@dataclass
class PostCode(Device):
    vmstate = VMSTATE
    trace: bool = False
    name: str = "post-code"
    regs: Latch = field(default_factory=Latch, repr=False)  # last and count, shared with the C loop
    start_ns: int = field(default_factory=time.monotonic_ns)

    @property
    def latch(self) -> Latch | None:
        return None if self.trace else self.regs

    @property
    def last(self) -> int:
        return self.regs.last

    @last.setter
    def last(self, value: int) -> None:
        self.regs.last = value

    @property
    def count(self) -> int:
        return self.regs.count

    @count.setter
    def count(self, value: int) -> None:
        self.regs.count = value

    def save_state(self) -> dict:
        return {"last": self.last, "count": self.count}

    def load_state(self, state: dict) -> None:
        self.last, self.count = state["last"], state["count"]

    def read(self, offset: int, size: int) -> int:
        return self.last & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & ((1 << (8 * min(size, 4))) - 1)
        self.count = (self.count + 1) & COUNT_MASK
        if self.trace:
            ms = (time.monotonic_ns() - self.start_ns) / 1e6
            print(f"minivmm: post code {value:#04x} at {ms:.3f} ms", file=sys.stderr)

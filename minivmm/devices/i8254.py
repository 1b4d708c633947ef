"""The 8254 PIT in userspace, for ``kernel-irqchip=split`` (KVM's PIT needs its PIC).

Counters 0-2 at ports 0x40-0x42, the control word at 0x43 (device offsets
0-3), and port 0x61 (offset 4): bit 0 gates counter 2, bit 1 enables the
speaker, bit 4 toggles with memory refresh every 15 us, bit 5 is counter 2's
output (how Linux calibrates the TSC). Counter 0's output is IRQ 0.

Counters are computed from the time since their count was loaded, at
1.193182 MHz; nothing ticks. Counter 0 arms one main-loop timer for its next
output edge and pulses IRQ 0 there (an edge-triggered line sees only rises).
Periodic timers are limited to one interrupt per MIN_PERIOD_NS, as KVM's PIT
is. The saved state holds each counter's elapsed time, not a host clock, so
it means the same in another process or on another host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.devices.state import LockedState
from minivmm.vmstate import VMSD, Field

FREQ_HZ = 1193182
MIN_PERIOD_NS = 200_000  # KVM's PIT floor (kvm.min_timer_period_us)
RW_LSB, RW_MSB, RW_WORD0, RW_WORD1 = 1, 2, 3, 4
PORT_CONTROL, PORT_61 = 3, 4  # device offsets
REFRESH_NS = 15_085


def _ticks(ns: int) -> int:
    return ns * FREQ_HZ // 1_000_000_000


def _ns(ticks: int) -> int:
    return -(-ticks * 1_000_000_000 // FREQ_HZ)


@dataclass
class Counter:
    count: int = 0x10000  # the reload value; 0 written means 65536
    load_ns: int = 0  # host monotonic time of the load (not saved: elapsed_ns is)
    latched: int = 0
    latch_state: int = 0  # RW_* of a latched count still being read, or 0
    status: int = 0
    status_latched: bool = False
    read_state: int = RW_LSB
    write_state: int = RW_LSB
    write_latch: int = 0
    rw_mode: int = RW_LSB
    mode: int = 0
    bcd: bool = False
    gate: bool = True
    null_count: bool = True

    def elapsed(self, now: int) -> int:
        return _ticks(now - self.load_ns)

    def value(self, now: int) -> int:
        d = self.elapsed(now)
        if self.mode in (0, 1, 4, 5):
            return (self.count - d) & 0xFFFF
        if self.mode == 3:
            return (self.count - (2 * d) % self.count) & 0xFFFF
        return (self.count - d % self.count) & 0xFFFF

    def out(self, now: int) -> bool:
        d, n = self.elapsed(now), self.count
        if self.mode == 0:
            return d >= n
        if self.mode == 1:
            return d < n
        if self.mode == 2:
            return d % n != n - 1
        if self.mode == 3:
            return d % n < (n + 1) >> 1
        return d != n  # modes 4 and 5: one low tick at the count

    def next_edge_ns(self, now: int) -> int | None:
        """When the output next rises (the IRQ 0 edge), or None."""
        d, n = self.elapsed(now), self.count
        if self.mode in (2, 3):
            period = max(_ns(n), MIN_PERIOD_NS)
            return self.load_ns + ((now - self.load_ns) // period + 1) * period
        if self.mode in (0, 4) and d < n:
            return self.load_ns + _ns(n)
        return None


_COUNTER = VMSD(
    "i8254-counter",
    1,
    1,
    (
        Field("count", "u32", min=1, max=0x10000),
        Field("elapsed_ns", "u64", max=1 << 62),
        Field("latched", "u16"),
        Field("latch_state", "u8", max=RW_WORD1),
        Field("status", "u8"),
        Field("status_latched", "bool"),
        Field("read_state", "u8", min=RW_LSB, max=RW_WORD1),
        Field("write_state", "u8", min=RW_LSB, max=RW_WORD1),
        Field("write_latch", "u8"),
        Field("rw_mode", "u8", min=RW_LSB, max=RW_WORD0),
        Field("mode", "u8", max=5),
        Field("bcd", "bool"),
        Field("gate", "bool"),
        Field("null_count", "bool"),
    ),
)


@dataclass
class PitState:
    counters: list[Counter] = field(default_factory=lambda: [Counter(), Counter(), Counter(gate=False)])
    port61: int = 0  # the writable bits: gate 2 and speaker enable


def _save(s: PitState) -> dict:
    now = time.monotonic_ns()
    counters = []
    for ctr in s.counters:
        v = {k: getattr(ctr, k) for k in Counter.__dataclass_fields__ if k != "load_ns"}
        counters.append({**v, "elapsed_ns": max(now - ctr.load_ns, 0)})
    return {"counters": counters, "port61": s.port61}


def _load(v: dict) -> PitState:
    now = time.monotonic_ns()
    counters = []
    for c in v["counters"]:
        fields = {k: c[k] for k in Counter.__dataclass_fields__ if k != "load_ns"}
        counters.append(Counter(**fields, load_ns=now - c["elapsed_ns"]))
    return PitState(counters=counters, port61=v["port61"])


VMSTATE = VMSD(
    "i8254",
    1,
    1,
    (Field("counters", _COUNTER, is_list=True, max=3), Field("port61", "u8", mask=0x03)),
    check=lambda v: None if len(v["counters"]) == 3 else ("counters", "expected 3 counters"),
    pre_save=_save,
    post_load=_load,
)


class Pit(LockedState):
    """``set_irq0(level)`` drives IRQ 0; ``call_later(delay_s, fn)`` runs fn on the main loop."""

    name = "i8254"
    vmstate = VMSTATE

    def __init__(self, set_irq0: Callable[[int], None], call_later: Callable[[float, Callable[[], None]], None]):
        self.set_irq0, self.call_later = set_irq0, call_later
        self.lock = threading.Lock()
        self.s = PitState()
        self.generation = 0  # a timer armed for an older programming of counter 0 does nothing

    def _state_changed(self) -> None:
        self._arm(time.monotonic_ns())  # after a reset: no edge to come, earlier timers void

    def save_state(self) -> PitState:
        with self.lock:
            return _load(_save(self.s))  # a snapshot that keeps its elapsed times

    # --- counter 0's interrupt ----------------------------------------------------------------
    def _arm(self, now: int) -> None:
        self.generation += 1
        at = self.s.counters[0].next_edge_ns(now)
        if at is not None:
            self.call_later(max(at - now, 0) / 1e9, lambda g=self.generation: self._expire(g))

    def _expire(self, generation: int) -> None:
        with self.lock:
            if generation != self.generation:
                return
            self._arm(time.monotonic_ns())
        self.set_irq0(1)
        self.set_irq0(0)

    # --- ports ----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        now = time.monotonic_ns()
        with self.lock:
            if offset == PORT_61:
                out2 = self.s.counters[2].out(now) if self.s.counters[2].gate else False
                refresh = (now // REFRESH_NS) & 1
                return self.s.port61 | (refresh << 4) | (int(out2) << 5)
            if offset == PORT_CONTROL:
                return 0xFF
            ctr = self.s.counters[offset]
            if ctr.status_latched:
                ctr.status_latched = False
                return ctr.status
            if ctr.latch_state:
                return self._read_latched(ctr)
            return self._read_count(ctr, ctr.value(now))

    @staticmethod
    def _read_latched(ctr: Counter) -> int:
        """A latched count is read once: its low byte, then (for a word) its high byte."""
        state = ctr.latch_state
        ctr.latch_state = RW_MSB if state == RW_WORD0 else 0
        return (ctr.latched >> 8) & 0xFF if state == RW_MSB else ctr.latched & 0xFF

    @staticmethod
    def _read_count(ctr: Counter, value: int) -> int:
        state = ctr.read_state
        if state == RW_WORD0:
            ctr.read_state = RW_WORD1
        elif state == RW_WORD1:
            ctr.read_state = RW_WORD0
        return (value >> 8) & 0xFF if state in (RW_MSB, RW_WORD1) else value & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        now = time.monotonic_ns()
        with self.lock:
            if offset == PORT_61:
                gate = bool(value & 1)
                ctr = self.s.counters[2]
                if gate and not ctr.gate and ctr.mode in (1, 2, 3, 5):
                    ctr.load_ns = now  # a rising gate restarts these modes
                ctr.gate = gate
                self.s.port61 = value & 0x03
            elif offset == PORT_CONTROL:
                self._control(value, now)
            else:
                self._write_count(offset, value, now)

    def _control(self, value: int, now: int) -> None:
        channel = value >> 6
        if channel == 3:  # read-back
            for i, ctr in enumerate(self.s.counters):
                if value & (2 << i):
                    if not value & 0x20 and not ctr.latch_state:
                        ctr.latched, ctr.latch_state = ctr.value(now), ctr.rw_mode
                    if not value & 0x10 and not ctr.status_latched:
                        ctr.status = self._status(ctr, now)
                        ctr.status_latched = True
            return
        ctr = self.s.counters[channel]
        access = (value >> 4) & 3
        if access == 0:  # counter latch
            if not ctr.latch_state:
                ctr.latched, ctr.latch_state = ctr.value(now), ctr.rw_mode
            return
        mode = (value >> 1) & 7
        ctr.rw_mode = ctr.read_state = ctr.write_state = access
        ctr.mode = mode - 4 if mode >= 6 else mode
        ctr.bcd = bool(value & 1)
        ctr.null_count = True

    @staticmethod
    def _status(ctr: Counter, now: int) -> int:
        out = ctr.out(now)
        return (out << 7) | (ctr.null_count << 6) | (ctr.rw_mode << 4) | (ctr.mode << 1) | int(ctr.bcd)

    def _write_count(self, channel: int, value: int, now: int) -> None:
        ctr = self.s.counters[channel]
        if ctr.write_state == RW_WORD0:
            ctr.write_latch, ctr.write_state = value, RW_WORD1
            return
        if ctr.write_state == RW_WORD1:
            value, ctr.write_state = ctr.write_latch | (value << 8), RW_WORD0
        elif ctr.write_state == RW_MSB:
            value <<= 8
        ctr.count = value or 0x10000
        ctr.load_ns = now
        ctr.null_count = False
        if channel == 0:
            self._arm(now)

"""The MC146818 CMOS RTC at 0x70/0x71: the wall clock and 128 bytes of CMOS
RAM, with the memory-size bytes QEMU's PC stores there.

The clock is the host's UTC plus an offset the guest sets by writing the time
registers. Update-in-progress is reported for the last 244 us of each
second. No RTC interrupt (IRQ 8) is raised: periodic and alarm interrupts
are not emulated, but an alarm wakes a machine suspended to RAM (S3).

A guest may write any byte to any register. Out-of-range date and time
values (month 0, BCD nibbles above 9, hour 0x3f) are taken arithmetically,
as QEMU's mktimegm does (month 0 is December of the year before), and the
guest clock is kept within years 1 to 9999, so every later read has an
answer.

The machine may queue index-port writes in KVM's coalesced ring rather than
take an exit for each (as QEMU does); ``flush_coalesced`` replays them, and
the RTC calls it before anything that reads or replaces the index.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.arch.x86 import layout
from minivmm.devices.state import LockedState
from minivmm.vmstate import VMSD, Field

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0, 2, 4, 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
REG_A_UIP = 0x80
REG_B_24H, REG_B_BINARY, REG_B_AIE, REG_B_SET = 0x02, 0x04, 0x20, 0x80
SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM = 1, 3, 5
ALARM_DONT_CARE = 0xC0  # an alarm register with both top bits set matches any value
UIP_S = 244e-6  # the update-in-progress flag is set this long before each second's update
REG_D_VALID = 0x80
NMI_DISABLE = 0x80
_TIME_REGS = {SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY}
# The guest clock's range: 0001-01-01 00:00:00 to 9999-12-31 23:59:59 UTC (what gmtime can show).
TIME_MIN, TIME_MAX = -62135596800, 253402300799
OFFSET_LIMIT = TIME_MAX - TIME_MIN  # |guest time - host time| never needs more


def mktimegm(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    """Seconds since the epoch for any field values, in range or not (QEMU's mktimegm)."""
    if month < 3:
        month += 12
        year -= 1
    days = day + (153 * month - 457) // 5 + 365 * year + year // 4 - year // 100 + year // 400 - 719469
    return 86400 * days + 3600 * hour + 60 * minute + second


def _cmos_memory(ram_below_4g: int, ram_above_4g: int) -> dict[int, int]:
    """The memory-size bytes QEMU's pc_cmos_init writes."""
    base_kib = layout.LOW_RAM_END // 1024
    ext_kib = min(max(ram_below_4g - layout.HIGH_RAM_START, 0) // 1024, 0xFFFF)
    above_16m = min(max(ram_below_4g - 16 * layout.MiB, 0) // (64 * 1024), 0xFFFF)
    high = ram_above_4g // (64 * 1024)
    return {
        0x15: base_kib & 0xFF,
        0x16: base_kib >> 8,
        0x17: ext_kib & 0xFF,
        0x18: ext_kib >> 8,
        0x30: ext_kib & 0xFF,
        0x31: ext_kib >> 8,
        0x34: above_16m & 0xFF,
        0x35: above_16m >> 8,
        0x5B: high & 0xFF,
        0x5C: (high >> 8) & 0xFF,
        0x5D: (high >> 16) & 0xFF,
    }


@dataclass
class RtcState:
    index: int = 0
    cmos: bytearray = field(default_factory=lambda: bytearray(128))
    offset_s: int = 0  # guest time minus host time, in seconds


VMSTATE = VMSD(
    "rtc",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("index", "u8", max=0x7F),  # the index port masks NMI_DISABLE off
        Field("cmos", "bytes", size=128),
        Field("offset_s", "i64", min=-OFFSET_LIMIT, max=OFFSET_LIMIT),
    ),
    post_load=lambda v: RtcState(v["index"], bytearray(v["cmos"]), v["offset_s"]),
)


class Rtc(LockedState):
    name = "rtc"
    vmstate = VMSTATE

    def __init__(self, ram_below_4g: int, ram_above_4g: int) -> None:
        self.s = RtcState()
        self.s.cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.s.cmos[REG_B] = REG_B_24H
        self.s.cmos[REG_D] = REG_D_VALID
        for reg, value in _cmos_memory(ram_below_4g, ram_above_4g).items():
            self.s.cmos[reg] = value
        self.lock = threading.Lock()
        self.flush_coalesced: Callable[[], None] = lambda: None  # the machine's, when writes queue

    def save_state(self) -> RtcState:
        self.flush_coalesced()
        return super().save_state()

    def reset(self) -> None:
        """Nothing: the CMOS is battery-backed, so its clock and RAM outlive a reset."""

    def load_state(self, state: RtcState) -> None:
        self.flush_coalesced()  # writes from before the load are history: replayed now, then replaced
        super().load_state(state)

    def _encode(self, value: int) -> int:
        return value if self.s.cmos[REG_B] & REG_B_BINARY else (value // 10) * 16 + value % 10

    def _decode(self, value: int) -> int:
        return value if self.s.cmos[REG_B] & REG_B_BINARY else (value >> 4) * 10 + (value & 0xF)

    def _now(self) -> time.struct_time:
        return time.gmtime(min(max(int(time.time()) + self.s.offset_s, TIME_MIN), TIME_MAX))

    def _time_reg(self, reg: int) -> int:
        t = self._now()
        if reg == HOURS:
            hour = t.tm_hour
            if not self.s.cmos[REG_B] & REG_B_24H:
                pm = hour >= 12
                hour = hour % 12 or 12
                return self._encode(hour) | (0x80 if pm else 0)
            return self._encode(hour)
        value = {
            SECONDS: t.tm_sec,
            MINUTES: t.tm_min,
            WEEKDAY: (t.tm_wday + 1) % 7 + 1,
            DAY: t.tm_mday,
            MONTH: t.tm_mon,
            YEAR: t.tm_year % 100,
            CENTURY: t.tm_year // 100,
        }[reg]
        return self._encode(value)

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        self.flush_coalesced()
        with self.lock:
            reg = self.s.index
            if reg in _TIME_REGS:
                return self._time_reg(reg)
            if reg == REG_C:
                value, self.s.cmos[REG_C] = self.s.cmos[REG_C], 0
                return value
            if reg == REG_A:  # UIP: the last 244 us of each second, as a real MC146818 shows it
                return self.s.cmos[REG_A] | (REG_A_UIP if time.time() % 1 >= 1 - UIP_S else 0)
            return self.s.cmos[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        self.flush_coalesced()
        with self.lock:
            if offset == 0:
                self.s.index = value & ~NMI_DISABLE & 0x7F
                return
            reg = self.s.index
            if reg in _TIME_REGS:
                self._set_time(reg, value)
            elif reg == REG_A:
                self.s.cmos[REG_A] = value & 0x7F  # UIP is read-only
            elif reg not in (REG_C, REG_D):
                self.s.cmos[reg] = value

    def seconds_to_alarm(self) -> float | None:
        """When the alarm fires next (AIE set), in seconds from now; None when it is off. Only
        an alarm that waits for nothing but don't-care fields or the seconds is worked out (a
        match on minutes or hours: within the hour or day, found by stepping second by second)."""
        with self.lock:
            if not self.s.cmos[REG_B] & REG_B_AIE:
                return None
            alarm = [self.s.cmos[r] for r in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM)]
            now = time.time()
            base = int(now) + self.s.offset_s
            for step in range(1, 86400 + 1):
                t = time.gmtime(min(max(base + step, TIME_MIN), TIME_MAX))
                fields = (t.tm_sec, t.tm_min, t.tm_hour)
                if all(a & ALARM_DONT_CARE == ALARM_DONT_CARE or self._decode(a) == f for a, f in zip(alarm, fields)):
                    return int(now) + step - now
            return None

    def _set_time(self, reg: int, value: int) -> None:
        """Move the guest clock so that ``reg`` reads ``value`` (as far as the value makes sense)."""
        t = self._now()
        fields = [t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec]
        decoded = self._decode(value & 0x7F if reg == HOURS else value)
        if reg == HOURS and not self.s.cmos[REG_B] & REG_B_24H:
            decoded = decoded % 12 + (12 if value & 0x80 else 0)
        if reg == YEAR:
            fields[0] = fields[0] // 100 * 100 + decoded
        elif reg == CENTURY:
            fields[0] = decoded * 100 + fields[0] % 100
        elif reg in (MONTH, DAY, HOURS, MINUTES, SECONDS):
            fields[{MONTH: 1, DAY: 2, HOURS: 3, MINUTES: 4, SECONDS: 5}[reg]] = decoded
        else:
            return  # the weekday follows from the date
        wanted = min(max(mktimegm(*fields), TIME_MIN), TIME_MAX)
        self.s.offset_s = wanted - int(time.time())

"""The CMOS RTC's clock registers and memory-size bytes."""

import time

from minivmm.devices import rtc as r

GiB = 1 << 30


def read(dev, reg):
    dev.write(0, 1, reg)
    return dev.read(1, 1)


def write(dev, reg, value):
    dev.write(0, 1, reg)
    dev.write(1, 1, value)


def bcd(n):
    return (n // 10) * 16 + n % 10


def test_clock_reads_host_utc_in_bcd_then_binary():
    dev = r.Rtc(128 << 20, 0)
    now = time.gmtime()
    assert read(dev, r.YEAR) == bcd(now.tm_year % 100)
    assert read(dev, r.CENTURY) == bcd(now.tm_year // 100)
    assert read(dev, r.MONTH) == bcd(now.tm_mon)
    write(dev, r.REG_B, r.REG_B_24H | r.REG_B_BINARY)
    assert read(dev, r.YEAR) == now.tm_year % 100
    assert read(dev, r.REG_D) == r.REG_D_VALID


def test_setting_the_time_moves_the_guest_clock_only():
    dev = r.Rtc(128 << 20, 0)
    write(dev, r.REG_B, r.REG_B_24H | r.REG_B_BINARY)
    write(dev, r.YEAR, 99)
    write(dev, r.CENTURY, 19)
    assert (read(dev, r.CENTURY), read(dev, r.YEAR)) == (19, 99)
    assert abs(dev.s.offset_s) > 20 * 365 * 86400
    assert r.Rtc(128 << 20, 0).s.offset_s == 0


def test_twelve_hour_mode_flags_pm():
    dev = r.Rtc(128 << 20, 0)
    write(dev, r.REG_B, r.REG_B_BINARY)  # 12-hour, binary
    write(dev, r.HOURS, 0x80 | 3)  # 3 pm
    dev.write(0, 1, r.REG_B)
    dev.write(1, 1, r.REG_B_BINARY | r.REG_B_24H)
    assert read(dev, r.HOURS) == 15


def test_memory_size_bytes_as_qemu_writes_them():
    dev = r.Rtc(3 * GiB, 2 * GiB)
    word = lambda lo: read(dev, lo) | read(dev, lo + 1) << 8  # noqa: E731
    assert word(0x15) == 640
    assert word(0x30) == 0xFFFF  # extended memory in KiB, capped
    assert word(0x34) == (3 * GiB - (16 << 20)) >> 16
    assert read(dev, 0x5B) | read(dev, 0x5C) << 8 | read(dev, 0x5D) << 16 == (2 * GiB) >> 16


def test_index_port_masks_nmi_bit_and_scratch_ram_persists():
    dev = r.Rtc(128 << 20, 0)
    write(dev, 0x80 | 0x40, 0x5A)  # bit 7 of the index is the NMI mask
    assert read(dev, 0x40) == 0x5A
    assert dev.read(0, 1) == 0xFF

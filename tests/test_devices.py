"""Every emulated device takes whatever a guest writes, at any offset and size,
and never raises: what real hardware does is ignore, clamp or latch. Reads
always fit the access size, queues stay bounded, and a device's state always
saves and loads through its own description (a guest cannot drive a device
into a state its migration would refuse). Hypothesis with a fixed seed, so
every run tries the same inputs; a real-KVM guest does the known cases."""

from __future__ import annotations

import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEBUG_EXIT
from minivmm.devices import acpi_pm, debug_exit, i8042, postcode, pvpanic, rtc, serial
from minivmm.devices.bus import UNCLAIMED
from minivmm.vmstate import StateWriter, decode, read_blob

FUZZ = settings(
    derandomize=True,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Recorder:
    """The callbacks a device is given, counted instead of acted on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def __call__(self, name: str):
        return lambda *args: self.calls.append((name, args))


def make_devices() -> list[tuple[object, int]]:
    """(device, the length of the range the machine registers it with)."""
    r = Recorder()
    out = [
        (serial.Serial(r("output"), r("irq")), 8),
        (i8042.I8042(r("reset")), 5),
        (rtc.Rtc(128 << 20, 0), 2),
        (rtc.Rtc(3 << 30, 2 << 30), 2),
        (acpi_pm.AcpiPm(r("poweroff")), 2),
        (postcode.PostCode(), 1),
        (debug_exit.DebugExit(r("exit")), 4),
        (pvpanic.PvPanic(r("panic"), r("crash")), 1),
        (UNCLAIMED, 1),
    ]
    return out


def round_trip(device) -> None:
    """The device's state, saved now, loads through its description unchanged."""
    vmsd = getattr(device, "vmstate", None)
    if vmsd is None:
        return
    w = StateWriter()
    w.add(vmsd, device.save_state())
    (section,) = read_blob(w.blob())
    device.load_state(decode(vmsd, section.payload, section.version, section.path))


SIZES = st.sampled_from([1, 2, 4])
ACCESS = st.tuples(st.booleans(), st.integers(0, 7), SIZES, st.integers(0, 0xFFFFFFFF))


@given(index=st.integers(0, 8), accesses=st.lists(ACCESS, max_size=60))
@FUZZ
def test_any_access_sequence_is_taken_and_reads_fit_the_size(index, accesses):
    device, length = make_devices()[index]
    for is_write, offset, size, value in accesses:
        offset %= length
        value &= (1 << (8 * size)) - 1
        if is_write:
            device.write(offset, size, value)
        else:
            got = device.read(offset, size)
            assert isinstance(got, int) and 0 <= got < 1 << (8 * size), (device.name, offset, size, got)
    round_trip(device)


def test_every_register_every_byte_every_size():
    """Exhaustive for one-byte values: each offset, size 1/2/4, written then read."""
    for device, length in make_devices():
        for offset in range(length):
            for size in (1, 2, 4):
                for value in list(range(256)) + [0xFFFF, 0x1234, 0xFFFFFFFF, 0x80000001]:
                    value &= (1 << (8 * size)) - 1
                    device.write(offset, size, value)
                    got = device.read(offset, size)
                    assert 0 <= got < 1 << (8 * size), (device.name, offset, size, value, got)
        round_trip(device)


# --- the known cases -----------------------------------------------------------------------


def cmos(dev: rtc.Rtc, reg: int, value: int | None = None) -> int:
    dev.write(0, 1, reg)
    if value is not None:
        dev.write(1, 1, value)
    return dev.read(1, 1)


@pytest.mark.parametrize("binary", [False, True])
def test_rtc_takes_every_value_in_every_time_register(binary):
    dev = rtc.Rtc(128 << 20, 0)
    cmos(dev, rtc.REG_B, rtc.REG_B_24H | (rtc.REG_B_BINARY if binary else 0))
    for reg in sorted(rtc._TIME_REGS):
        for value in range(256):
            cmos(dev, reg, value)
            for other in sorted(rtc._TIME_REGS):
                assert 0 <= cmos(dev, other) <= 0xFF
            assert abs(dev.s.offset_s) <= rtc.OFFSET_LIMIT
    round_trip(dev)


def test_rtc_month_zero_is_december_of_the_year_before():
    dev = rtc.Rtc(128 << 20, 0)
    cmos(dev, rtc.REG_B, rtc.REG_B_24H | rtc.REG_B_BINARY)
    cmos(dev, rtc.CENTURY, 20)
    cmos(dev, rtc.YEAR, 30)
    cmos(dev, rtc.DAY, 15)
    cmos(dev, rtc.MONTH, 0)
    assert (cmos(dev, rtc.MONTH), cmos(dev, rtc.YEAR)) == (12, 29)
    cmos(dev, rtc.MONTH, 3)  # back into range, in the year the clock is in now
    assert (cmos(dev, rtc.CENTURY), cmos(dev, rtc.YEAR), cmos(dev, rtc.MONTH), cmos(dev, rtc.DAY)) == (20, 29, 3, 15)


def test_rtc_clock_stays_within_years_1_to_9999():
    dev = rtc.Rtc(128 << 20, 0)
    cmos(dev, rtc.CENTURY, 0x99)  # BCD 99: the year 99xx
    assert cmos(dev, rtc.CENTURY) == 0x99
    cmos(dev, rtc.CENTURY, 0xFF)  # not BCD: 165xx, clamped to the last second of 9999
    assert (cmos(dev, rtc.CENTURY), cmos(dev, rtc.YEAR), cmos(dev, rtc.MONTH)) == (0x99, 0x99, 0x12)
    cmos(dev, rtc.CENTURY, 0x00)
    cmos(dev, rtc.YEAR, 0x00)
    cmos(dev, rtc.MONTH, 0x00)  # before the year 1
    assert (cmos(dev, rtc.CENTURY), cmos(dev, rtc.YEAR), cmos(dev, rtc.MONTH)) == (0x00, 0x01, 0x01)


def test_postcode_read_after_a_wide_or_odd_write():
    dev = postcode.PostCode()
    dev.write(0, 4, 0x12345677)
    assert (dev.read(0, 1), dev.read(0, 2), dev.read(0, 4)) == (0x77, 0x5677, 0x12345677)
    dev.count = postcode.COUNT_MASK
    dev.write(0, 1, 0x55)
    assert dev.count == 0 and dev.read(0, 1) == 0x55
    round_trip(dev)


def test_i8042_reply_queue_is_bounded():
    dev = i8042.I8042(lambda: None)
    for _ in range(100_000):
        dev.write(i8042.COMMAND, 1, i8042.CMD_SELF_TEST)
    assert len(dev.s.queue) == i8042.QUEUE_SIZE
    assert [dev.read(i8042.DATA, 1) for _ in range(i8042.QUEUE_SIZE)] == [0x55] * i8042.QUEUE_SIZE
    assert dev.read(i8042.COMMAND, 1) & i8042.STATUS_OBF == 0
    dev.write(i8042.COMMAND, 1, i8042.CMD_READ_CTR)
    assert dev.read(2, 1) == 0xFF and dev.s.queue  # 0x62 is not the controller's: the reply waits
    dev.write(3, 1, 0x00)  # nor 0x63: no data byte for the pending command
    assert dev.read(i8042.DATA, 1) == dev.s.ctr


def test_acpi_pm_byte_writes_keep_the_other_byte():
    off = []
    dev = acpi_pm.AcpiPm(lambda: off.append(1))
    dev.write(0, 1, 0x34)
    dev.write(1, 1, 0x12 & ~(acpi_pm.SLP_EN >> 8))
    assert dev.read(0, 2) == 0x1234 and not off
    dev.write(1, 1, acpi_pm.SLP_EN >> 8)
    assert off == [1] and dev.read(0, 2) & acpi_pm.SLP_EN == 0


def test_debug_exit_status_is_what_a_process_can_return():
    statuses = []
    dev = debug_exit.DebugExit(statuses.append)
    dev.write(0, 4, 0xFFFFFFFF)
    dev.write(0, 1, 0x10)
    assert statuses == [0xFF, 0x21]


def test_serial_fifo_never_grows_past_its_size():
    out = []
    uart = serial.Serial(out.append, lambda level: None)
    uart.write(serial.IIR_FCR, 1, serial.FCR_ENABLE)
    uart.write(serial.MCR, 1, serial.MCR_LOOP)
    for i in range(1000):
        uart.write(serial.RBR_THR_DLL, 1, i & 0xFF)
    assert len(uart.s.rx) == serial.FIFO_SIZE and uart.s.lsr & serial.LSR_OE
    uart.receive(bytes(1000))
    assert len(uart.s.rx) == serial.FIFO_SIZE
    round_trip(uart)


# --- a real guest does the same through KVM ------------------------------------------------

# 16-bit real mode at the reset vector (F000:FFF0), assembled here with GNU as: month 0 into
# the CMOS clock in BCD, then 0x99 and 0xff into every time register, then read them all; a
# 32-bit value to port 0x80 read back with inb, inw and inl; 4096 i8042 commands without
# reading a reply; then a reply and its status must still come; success is 0x10 to
# isa-debug-exit, failure 0x11.
EDGE_GUEST = r"""
    .code16
    .globl _start
_start:
    cli
    mov %cs, %ax ; mov %ax, %ds
    mov $0x0b, %al ; out %al, $0x70 ; mov $0x02, %al ; out %al, $0x71   # BCD, 24-hour
    mov $0x08, %al ; out %al, $0x70 ; mov $0x00, %al ; out %al, $0x71   # month 0
    mov $0x08, %al ; out %al, $0x70 ; in $0x71, %al
    mov $0, %si
1:  mov regs(%si), %al ; out %al, $0x70 ; mov $0x99, %al ; out %al, $0x71
    mov regs(%si), %al ; out %al, $0x70 ; mov $0xff, %al ; out %al, $0x71
    mov regs(%si), %al ; out %al, $0x70 ; in $0x71, %al
    inc %si ; cmp $8, %si ; jne 1b
    mov $0x12345677, %eax ; out %eax, $0x80
    in $0x80, %al ; cmp $0x77, %al ; jne fail
    in $0x80, %ax ; cmp $0x5677, %ax ; jne fail
    in $0x80, %eax ; cmp $0x12345677, %eax ; jne fail
    mov $4096, %cx
2:  mov $0xaa, %al ; out %al, $0x64 ; loop 2b
    in $0x64, %al ; test $1, %al ; jz fail
    in $0x60, %al ; cmp $0x55, %al ; jne fail
    mov $0x10, %al ; out %al, $0xf4
3:  hlt ; jmp 3b
fail:
    mov $0x11, %al ; out %al, $0xf4
    jmp 3b
regs: .byte 0, 2, 4, 6, 7, 8, 9, 0x32
    .org 0xfff0
    ljmp $0xf000, $_start
    .org 0x10000
"""


def build_edge_guest(tmp_path) -> str:
    src, obj, elf, out = (tmp_path / f"edge.{ext}" for ext in ("S", "o", "elf", "bin"))
    src.write_text(EDGE_GUEST.replace(" ; ", "\n    "))
    try:
        for argv in (
            ["as", "--32", "-o", obj, src],
            ["ld", "-m", "elf_i386", "-Ttext", "0", "-e", "_start", "-o", elf, obj],
            ["objcopy", "-O", "binary", "-j", ".text", elf, out],
        ):
            subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    except FileNotFoundError as e:
        pytest.skip(f"needs GNU binutils to build the guest: {e}")
    assert out.stat().st_size == 0x10000
    return str(out)


def test_real_guest_pokes_the_edge_cases(vmm, tmp_path):
    bios = build_edge_guest(tmp_path)
    start = time.monotonic()
    r = vmm.run("-bios", bios, "-serial", "null", *DEBUG_EXIT, timeout=60)
    assert r.status == (0x10 << 1) | 1, r
    assert r.stderr == "", r.stderr
    assert time.monotonic() - start < 30

"""Versioned state descriptions: round trips, old state into new code, and
errors that name the path of what failed."""

from __future__ import annotations

import struct
from collections import deque
from pathlib import Path

import pytest

from minivmm.devices import serial
from minivmm.vmstate import (
    VMSD,
    Field,
    StateWriter,
    Subsection,
    VMStateError,
    decode,
    encode,
    read_blob,
)

FIXTURES = Path(__file__).parent / "fixtures"

# The serial description as minivmm 0.1 wrote it (version 1, before irq_level).
SERIAL_V1 = VMSD(
    "serial",
    1,
    1,
    tuple(f for f in serial.VMSTATE.fields if f.since == 1),
    pre_save=serial.VMSTATE.pre_save,
)


def _v1_serial_blob() -> bytes:
    state = serial.SerialState(ier=1, lcr=3, lsr=0x61, fcr=0xC1, rx=deque(b"hi"), divisor=1)
    w = StateWriter()
    w.add(SERIAL_V1, state, 0)
    return w.blob()


def test_round_trip_with_nested_lists_and_subsections():
    inner = VMSD("entry", 1, 1, (Field("index", "u32"), Field("value", "u64")))
    extra = VMSD("extra", 1, 1, (Field("note", "str"),))
    outer = VMSD(
        "thing",
        3,
        1,
        (Field("a", "u8"), Field("b", "i64"), Field("blob", "bytes", size=4), Field("items", inner, is_list=True)),
        subsections=(Subsection(extra, lambda o: bool(o["note"])),),
    )
    obj = {"a": 7, "b": -5, "blob": b"abcd", "items": [{"index": 1, "value": 2**63}], "note": "hello"}
    assert decode(outer, encode(outer, obj), 3) == obj
    without = {**obj, "note": ""}
    assert "note" not in decode(outer, encode(outer, without), 3)  # not needed: not written


def test_old_description_loads_into_the_new_one():
    blob = _v1_serial_blob()
    assert blob == (FIXTURES / "serial-v1.state").read_bytes(), "the fixture is what version 1 writes"
    (section,) = read_blob(blob)
    assert (section.name, section.version) == ("serial", 1)
    state = decode(serial.VMSTATE, section.payload, section.version, section.path)
    assert (state.ier, state.lcr, bytes(state.rx), state.irq_level) == (1, 3, b"hi", -1)
    levels = []
    uart = serial.Serial(lambda b: None, levels.append)
    uart.load_state(state)
    assert uart.s.irq_level == 1  # recomputed: data ready with RDI enabled
    assert uart.read(serial.RBR_THR_DLL, 1) == ord("h")


def test_errors_name_the_path():
    lapic = VMSD("vcpu", 1, 1, (Field("mp_state", "u32"), Field("lapic", "bytes", size=1024)))
    short = VMSD("vcpu", 1, 1, (Field("mp_state", "u32"), Field("lapic", "bytes")))
    payload = encode(short, {"mp_state": 0, "lapic": bytes(12)})
    with pytest.raises(VMStateError, match=r"^vcpu\[1\]/lapic: expected 1024 bytes, got 12$"):
        decode(lapic, payload, 1, "vcpu[1]")
    with pytest.raises(VMStateError, match=r"^vcpu\[1\]/lapic: truncated"):
        decode(lapic, payload[:10], 1, "vcpu[1]")


def test_unknown_subsection_is_refused_by_name():
    extra = VMSD("x-future-feature", 1, 1, (Field("v", "u8"),))
    newer = VMSD("rtc", 1, 1, (Field("index", "u8"),), subsections=(Subsection(extra, lambda o: True),))
    older = VMSD("rtc", 1, 1, (Field("index", "u8"),))
    payload = encode(newer, {"index": 1, "v": 2})
    with pytest.raises(VMStateError, match=r"^rtc\[0\]: unknown subsection 'x-future-feature'$"):
        decode(older, payload, 1, "rtc[0]")


def test_versions_outside_the_loadable_range():
    with pytest.raises(VMStateError, match="state version 3 is newer than this minivmm's 2"):
        decode(serial.VMSTATE, b"", 3, "serial[0]")
    strict = VMSD("dev", 5, 4, (Field("v", "u8"),))
    with pytest.raises(VMStateError, match="state version 3 is older than the oldest loadable, 4"):
        decode(strict, b"\0", 3)


def test_blob_magic_version_and_checksum():
    blob = bytearray(_v1_serial_blob())
    with pytest.raises(VMStateError, match="^Not a migration stream \\(bad magic 58585858\\)$"):
        read_blob(b"XXXX" + bytes(blob[4:]))
    newer = bytes(blob[:4]) + struct.pack("<I", 2) + bytes(blob[8:])
    with pytest.raises(VMStateError, match="^Unsupported migration stream version 2$"):
        read_blob(newer)
    blob[20] ^= 0xFF
    with pytest.raises(VMStateError, match="checksum mismatch"):
        read_blob(bytes(blob))


# --- declared ranges, checked in one place ---------------------------------------------------

CHECKED = VMSD(
    "dev",
    1,
    1,
    (
        Field("index", "u8", max=127),
        Field("offset", "i64", min=-10, max=10),
        Field("ier", "u8", mask=0x0F),
        Field("mode", "str", choices=frozenset({"a", "b"})),
        Field("fpu", "bytes", size=(0, 4)),
        Field("queue", "bytes", max=2),
        Field("on", "bool"),
        Field("items", VMSD("item", 1, 1, (Field("v", "u8"),)), is_list=True, max=2),
    ),
)
GOOD = {"index": 1, "offset": 0, "ier": 1, "mode": "a", "fpu": b"", "queue": b"", "on": True, "items": []}
LAX = VMSD("dev", 1, 1, tuple(Field(f.name, f.kind, is_list=f.is_list) for f in CHECKED.fields))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"index": 200}, "dev/index: 200 is out of range (at most 127)"),
        ({"offset": -11}, "dev/offset: -11 is out of range (at least -10)"),
        ({"ier": 0x10}, "dev/ier: 0x10 has bits outside 0xf set"),
        ({"mode": "c"}, "dev/mode: 'c' is not one of a, b"),
        ({"fpu": b"abc"}, "dev/fpu: expected 0 or 4 bytes, got 3"),
        ({"queue": bytes(3)}, "dev/queue: 3 bytes is more than the 2 allowed"),
        ({"items": [{"v": 1}] * 3}, "dev/items: 3 items is more than the 2 allowed"),
    ],
)
def test_declared_ranges_refuse_values_by_field(edit, message):
    assert decode(CHECKED, encode(LAX, GOOD), 1) == GOOD
    with pytest.raises(VMStateError, match=f"^{message.replace('(', '.').replace(')', '.')}$"):
        decode(CHECKED, encode(LAX, {**GOOD, **edit}), 1)


def test_malformed_primitives_are_vmstate_errors():
    payload = bytearray(encode(LAX, GOOD))
    payload[payload.index(b"a")] = 0xFF  # the mode string
    with pytest.raises(VMStateError, match=r"^dev/mode: invalid UTF-8 at byte 0 of 1$"):
        decode(CHECKED, bytes(payload), 1)
    raw = bytearray(encode(LAX, GOOD))
    raw[-9] = 2  # the bool, before the item count and the subsection count
    with pytest.raises(VMStateError, match=r"^dev/on: 2 is not a boolean"):
        decode(CHECKED, bytes(raw), 1)
    huge = encode(LAX, GOOD)[:-8] + struct.pack("<I", 1 << 31) + bytes(4)
    with pytest.raises(VMStateError, match=r"^dev/items: count 2147483648 is more than the 4 bytes left$"):
        decode(CHECKED, huge, 1)


def test_duplicate_sections_and_subsections_are_refused():
    w = StateWriter()
    w.add(SERIAL_V1, serial.SerialState(), 0)
    w.sections.append(w.sections[0])
    with pytest.raises(VMStateError, match=r"^serial\[0\]: section appears twice in the state$"):
        read_blob(w.blob())
    extra = VMSD("extra", 1, 1, (Field("v", "u8"),))
    outer = VMSD("rtc", 1, 1, (Field("index", "u8"),), subsections=(Subsection(extra, lambda o: True),))
    payload = encode(outer, {"index": 1, "v": 2})
    sub = payload[1 + 4 :]  # after the field and the subsection count
    twice = payload[:1] + struct.pack("<I", 2) + sub + sub
    with pytest.raises(VMStateError, match=r"^rtc: subsection 'extra' appears twice$"):
        decode(outer, twice, 1)

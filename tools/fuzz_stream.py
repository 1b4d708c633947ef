#!/usr/bin/env python3
"""Fuzz minivmm's migration-stream loader with mutations of a real saved state.

Usage: python tools/fuzz_stream.py [--seconds N] [--real N] [--seed S] [--ram MiB]

Saves a running A-B walker to a file (a real minivmm, stop-and-copy), then
mutates the stream: truncations, bit flips, and field-aware edits with the
checksums recomputed (an RTC index of 200, a 32 MiB keyboard queue, wrong-size
FPU/XSAVE records, an unknown run state, a duplicate section, a flipped RAM
record offset...). Every mutation is loaded in-process by the real decoders
(incoming.read_stream, machine_state.decode_all, the devices' load_state),
and ``--real`` of them by a real minivmm with ``-incoming file:``. A load
must either be refused (StreamError/VMStateError in-process; exit status 1
and one ``minivmm: ...`` line in a process) or give a valid machine (devices
that work and save again; a process that answers QMP with a run state). A
Python exception of any other kind, a traceback, or a hang is a finding.
tests/test_stream_fuzz.py runs the same code, bounded in time.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from fuzz import Processes  # noqa: E402  (tools/, beside this file)

from minivmm.arch.x86 import vcpu_state, vm_state
from minivmm.config import MachineConfig
from minivmm.devices import acpi_pm, fw_cfg, i8042, pci, postcode, rtc, serial
from minivmm.devices.bus import Bus
from minivmm.guests import path as guest_path
from minivmm.machine.devices import BOARD, DeviceManager
from minivmm.machine.pci import PciBus
from minivmm.memory import RamBlock
from minivmm.migration import incoming, machine_state, stream
from minivmm.vmstate import VMSD, Section, StateWriter, Subsection, VMStateError, decode, encode, read_blob

RAM_MIB = 4
GUEST_ARGS = ["-kernel", guest_path("abwalk.elf"), "-machine", "aux-ram-share=on", "-serial", "null"]
REFUSALS = (stream.StreamError, VMStateError)

SECTION_VMSDS: dict[str, VMSD] = {
    "configuration": machine_state.CONFIGURATION,
    "globalstate": machine_state.GLOBALSTATE,
    "vcpu": vcpu_state.VMSTATE,
    "kvm-pit": vm_state.PIT_VMSTATE,
    "kvmclock": vm_state.CLOCK_VMSTATE,
    "kvm-irqchip": vm_state.IRQCHIP_VMSTATE,
    "serial": serial.VMSTATE,
    "rtc": rtc.VMSTATE,
    "i8042": i8042.VMSTATE,
    "acpi-pm": acpi_pm.VMSTATE,
    "acpi-pm1-evt": acpi_pm.PM1_EVT_VMSTATE,
    "post-code": postcode.VMSTATE,
    "fw_cfg": fw_cfg.VMSTATE,
    "pci-host": pci.VMSTATE,
}


def guest_args(ram_mib: int = RAM_MIB) -> list[str]:
    return [*GUEST_ARGS, "-m", str(ram_mib)]


# --- the stream's structure -----------------------------------------------------------------


@dataclass
class Record:
    kind: int
    start: int  # the type byte
    end: int
    data: int = 0  # pages: where the page bytes begin


@dataclass
class Parsed:
    """Where everything is in a version-2 stream, for edits that keep it well-formed."""

    data: bytes
    header_end: int
    records: list[Record]

    @property
    def state(self) -> Record:
        return next(r for r in self.records if r.kind == stream.REC_STATE)

    def blob(self) -> bytes:
        r = self.state
        return self.data[r.start + stream._STATE.size : r.end]

    def pages(self) -> list[Record]:
        return [r for r in self.records if r.kind == stream.REC_PAGES]


def parse(data: bytes) -> Parsed:
    magic, version = stream._HEAD.unpack_from(data)
    assert magic == stream.MAGIC and version == 2, (magic, version)
    (length,) = struct.unpack_from("<I", data, 8)
    pos = 12 + length + 4
    header_end, records = pos, []
    while True:
        kind = data[pos]
        if kind == stream.REC_PAGES:
            length = stream._PAGES.unpack_from(data, pos)[3]
            records.append(Record(kind, pos, pos + stream._PAGES.size + length, pos + stream._PAGES.size))
        elif kind == stream.REC_STATE:
            (_, length) = stream._STATE.unpack_from(data, pos)
            records.append(Record(kind, pos, pos + stream._STATE.size + length))
        elif kind == stream.REC_TIMES:
            (count,) = struct.unpack_from("<H", data, pos + 1)
            end = pos + 3
            for _ in range(count):
                end += 1 + data[end] + 8
            records.append(Record(kind, pos, end + 4))
        elif kind == stream.REC_END:
            records.append(Record(kind, pos, pos + stream._END.size))
            return Parsed(data, header_end, records)
        else:
            raise ValueError(f"unknown record {kind} at {pos}")
        pos = records[-1].end


def to_v1(data: bytes) -> bytes:
    """The same stream as version 1 wrote it: no checksums, a one-byte end mark."""
    p = parse(data)
    (length,) = struct.unpack_from("<I", data, 8)
    out = bytearray(stream._HEAD.pack(stream.MAGIC, 1) + data[8 : 12 + length])
    for r in p.records:
        if r.kind == stream.REC_PAGES:
            out += data[r.start : r.start + stream._PAGES_V1.size] + data[r.data : r.end]
        elif r.kind == stream.REC_TIMES:
            out += data[r.start : r.end - 4]
        elif r.kind == stream.REC_END:
            out += bytes([stream.REC_END])
        else:
            out += data[r.start : r.end]
    return bytes(out)


def with_header_crc(data: bytearray) -> bytes:
    (length,) = struct.unpack_from("<I", data, 8)
    struct.pack_into("<I", data, 12 + length, zlib.crc32(data[12 : 12 + length]))
    return bytes(data)


def with_page_crc(data: bytearray, r: Record) -> bytes:
    struct.pack_into("<I", data, r.start + 19, zlib.crc32(data[r.data : r.end]))
    struct.pack_into("<I", data, r.start + 23, zlib.crc32(data[r.start : r.start + 23]))
    return bytes(data)


# --- field-aware edits of the state blob ------------------------------------------------------


def lax(vmsd: VMSD) -> VMSD:
    """The description without checks or conversions: loads and writes any values, as dicts
    (a subsection's fields merged in, written when they are there)."""
    subs = tuple(Subsection(lax(s.vmsd), partial(_holds, s.vmsd)) for s in vmsd.subsections)
    loose = tuple(
        replace(f, kind=lax(f.kind) if isinstance(f.kind, VMSD) else f.kind, size=None, min=None, max=None)
        for f in vmsd.fields
    )
    loose = tuple(replace(f, mask=None, choices=None) for f in loose)
    return replace(vmsd, fields=loose, subsections=subs, pre_save=None, post_load=None, check=None)


def _holds(vmsd: VMSD, values: dict) -> bool:
    return all(f.name in values for f in vmsd.fields)


def sections_of(blob: bytes) -> list[tuple[Section, dict]]:
    return [(sec, decode(lax(SECTION_VMSDS[sec.name]), sec.payload, sec.version, sec.path)) for sec in read_blob(blob)]


def blob_of(items: list[tuple[Section, dict | bytes]]) -> bytes:
    w = StateWriter()
    for sec, values in items:
        payload = values if isinstance(values, bytes) else encode(lax(SECTION_VMSDS[sec.name]), values, sec.path)
        w.sections.append(Section(sec.name, sec.instance, sec.version, payload))
    return w.blob()


def with_blob(p: Parsed, blob: bytes) -> bytes:
    r = p.state
    return p.data[: r.start] + stream._STATE.pack(stream.REC_STATE, len(blob)) + blob + p.data[r.end :]


def edit_field(p: Parsed, section: str, name: str, value: object, instance: int = 0) -> bytes:
    items = sections_of(p.blob())
    for sec, values in items:
        if (sec.name, sec.instance) == (section, instance):
            values[name] = value
            break
    else:
        raise KeyError(section)
    return with_blob(p, blob_of(items))


def raw_str_field(p: Parsed, section: str, name: str, raw: bytes) -> bytes:
    """A str field holding bytes that are not UTF-8 (the lax description writes them as bytes)."""
    items = sections_of(p.blob())
    out = []
    for sec, values in items:
        if sec.name == section:
            vmsd = lax(SECTION_VMSDS[section])
            vmsd = replace(vmsd, fields=tuple(replace(f, kind="bytes") if f.name == name else f for f in vmsd.fields))
            out.append((sec, encode(vmsd, {**values, name: raw}, sec.path)))
        else:
            out.append((sec, values))
    return with_blob(p, blob_of(out))


@dataclass(frozen=True)
class Mutation:
    category: str
    what: str
    data: bytes
    expect: str = ""  # for named edits: "load", or a fragment the refusal must contain


def named_edits(p: Parsed) -> Iterator[Mutation]:
    """The issue's cases and their neighbours, each with what must happen."""
    vcpu = next(values for sec, values in sections_of(p.blob()) if sec.name == "vcpu")
    xsave = len(vcpu["xsave"])
    page = p.pages()[len(p.pages()) // 2]

    def m(what: str, data: bytes, expect: str) -> Mutation:
        return Mutation("field", what, data, expect)

    yield m("rtc index 200", edit_field(p, "rtc", "index", 200), "rtc[0]/index: 200 is out of range")
    yield m("rtc index 100", edit_field(p, "rtc", "index", 100), "load")
    yield m("rtc offset 2**62", edit_field(p, "rtc", "offset_s", 1 << 62), "rtc[0]/offset_s")
    yield m("rtc cmos 127 bytes", edit_field(p, "rtc", "cmos", bytes(127)), "rtc[0]/cmos: expected 128 bytes")
    yield m("i8042 32 MiB queue", edit_field(p, "i8042", "queue", bytes(32 << 20)), "i8042[0]/queue")
    yield m("i8042 full queue", edit_field(p, "i8042", "queue", bytes(i8042.QUEUE_SIZE)), "load")
    yield m("i8042 pending 0x42", edit_field(p, "i8042", "pending", 0x42), "i8042[0]/pending")
    yield m("serial 17 rx bytes", edit_field(p, "serial", "rx", bytes(17)), "serial[0]/rx")
    yield m("serial rx, FIFO off", edit_field(p, "serial", "rx", b"ab"), "serial[0]/rx")
    yield m("serial ier 0xff", edit_field(p, "serial", "ier", 0xFF), "serial[0]/ier")
    yield m("serial irq_level 7", edit_field(p, "serial", "irq_level", 7), "serial[0]/irq_level")
    yield m("acpi SLP_EN stored", edit_field(p, "acpi-pm", "control", acpi_pm.SLP_EN), "acpi-pm[0]/control")
    yield m("post-code count 2**64-1", edit_field(p, "post-code", "count", (1 << 64) - 1), "load")
    yield m("machine type q35", edit_field(p, "configuration", "name", "q35"), "Machine type received is 'q35'")
    yield m("runstate unknown", edit_field(p, "globalstate", "runstate", "warp-speed"), "globalstate[0]/runstate")
    yield m("runstate paused", edit_field(p, "globalstate", "runstate", "paused"), "load")
    yield m("runstate invalid UTF-8", raw_str_field(p, "globalstate", "runstate", b"\xffrun"), "invalid UTF-8")
    yield m("fpu 100 bytes", edit_field(p, "vcpu", "fpu", bytes(100)), "vcpu[0]/fpu: expected 0 or")
    yield m("xsave 100 bytes", edit_field(p, "vcpu", "xsave", bytes(100)), "vcpu[0]/xsave")
    yield m("xsave 1 page more", edit_field(p, "vcpu", "xsave", bytes(xsave + 4096)), "vcpu[0]/xsave")
    yield m("no xsave, no fpu", edit_field(p, "vcpu", "xsave", b""), "vcpu[0]/")
    yield m("xcrs 3 bytes", edit_field(p, "vcpu", "xcrs", b"abc"), "vcpu[0]/xcrs")
    yield m("lapic 12 bytes", edit_field(p, "vcpu", "lapic", bytes(12)), "vcpu[0]/lapic: expected 1024 bytes")
    yield m("mp_state 77", edit_field(p, "vcpu", "mp_state", 77), "vcpu[0]/mp_state")
    yield m("held ExtINT", edit_field(p, "vcpu", "extint", 0x20), "vcpu[0]/extint: a held ExtINT")
    msrs = [*vcpu["msrs"], {"index": 0xDEAD0000, "value": 1}]
    yield m("unknown MSR", edit_field(p, "vcpu", "msrs", msrs), "vcpu[0]/msrs: MSR 0xdead0000")
    yield m("300 MSRs", edit_field(p, "vcpu", "msrs", vcpu["msrs"] * 300), "vcpu[0]/msrs: ")
    yield m("irqchip 1 says 0", edit_field(p, "kvm-irqchip", "chip", vm_irqchip(0), 1), "kvm-irqchip[1]/chip")
    yield m("pit 10 bytes", edit_field(p, "kvm-pit", "pit", bytes(10)), "kvm-pit[0]/pit")
    items = sections_of(p.blob())
    rtc_item = next(i for i in items if i[0].name == "rtc")
    yield m("duplicate section", with_blob(p, blob_of([*items, rtc_item])), "rtc[0]: section appears twice")
    yield m("missing section", with_blob(p, blob_of([i for i in items if i is not rtc_item])), "rtc[0]: missing")
    extra = (replace(rtc_item[0], instance=1), rtc_item[1])
    yield m("extra instance", with_blob(p, blob_of([*items, extra])), "'rtc' 1")
    newer = (replace(rtc_item[0], version=99), rtc_item[1])
    yield m("section version 99", with_blob(p, blob_of([newer if i is rtc_item else i for i in items])), "rtc[0]")

    def s(what: str, data: bytes, expect: str) -> Mutation:
        return Mutation("stream", what, data, expect)

    d = bytearray(p.data)
    d[page.start + 3] ^= 0x10  # offset bit 4 KiB * 4 * 256
    yield s("page offset flipped", bytes(d), "RAM page record header: checksum mismatch")
    d = bytearray(p.data)
    struct.pack_into("<Q", d, page.start + 3, 1 << 40)
    yield s("page offset outside, crc redone", with_page_crc(d, page), "is outside 'pc.ram'")
    d = bytearray(p.data)
    d[page.data + 100] ^= 1
    yield s("page data flipped", bytes(d), "checksum mismatch: the data is corrupt")
    yield s("page record lost", p.data[: page.start] + p.data[page.end :], "RAM page records")
    d = bytearray(p.data)
    (length,) = struct.unpack_from("<I", d, 8)
    d[18] = 0xFF  # the first byte of the first block's name
    yield s("block name not UTF-8", with_header_crc(d), "block[0] name: invalid UTF-8")
    d = bytearray(p.data)
    d[14] ^= 0xFF
    yield s("header flipped", bytes(d), "header: checksum mismatch")
    yield s("version 3", p.data[:4] + struct.pack("<I", 3) + p.data[8:], "Unsupported migration stream version 3")
    state = p.state
    yield s("state twice", p.data[: state.end] + p.data[state.start : state.end] + p.data[state.end :], "two device")
    end = p.records[-1]
    yield s("unknown record", p.data[: end.start] + b"\x09" + p.data[end.start :], "unknown record type 9")
    yield s("no end mark", p.data[: end.start], "truncated")
    yield s("junk after the end", p.data + b"junk" * 100, "load")
    yield s("version 1", to_v1(p.data), "load")
    yield s("short header", p.data[:6], "truncated")


def vm_irqchip(chip_id: int) -> bytes:
    from minivmm.kvm import structs

    chip = structs.kvm_irqchip()
    chip.chip_id = chip_id
    return bytes(chip)


def truncations(p: Parsed, rng: random.Random, n: int) -> Iterator[Mutation]:
    """Every cut in the header and around every record boundary, then random ones."""
    points = set(range(p.header_end + 1))
    for r in p.records:
        points.update(range(max(r.start - 2, 0), r.start + 30))
    state = p.state
    points.update(range(state.start, state.end, 7))
    points.update(range(p.records[-1].start, len(p.data)))
    ordered = sorted(x for x in points if x < len(p.data))  # every cut leaves something out
    rng.shuffle(ordered)
    extra = [rng.randrange(len(p.data)) for _ in range(max(0, n - len(ordered)))]
    for at in (ordered + extra)[:n]:
        yield Mutation("truncate", f"cut at {at}", p.data[:at])


def bit_flips(p: Parsed, rng: random.Random, n: int) -> Iterator[Mutation]:
    """Bits flipped: mostly outside page data (the header, record heads, the state blob)."""
    spans = [(0, p.header_end)] + [(r.start, r.data or r.end) for r in p.records]
    for i in range(n):
        if i % 4 == 3:
            page = rng.choice(p.pages())
            at = rng.randrange(page.data, page.end)
        else:
            lo, hi = rng.choice(spans)
            at = rng.randrange(lo, hi)
        d = bytearray(p.data)
        bit = rng.randrange(8)
        d[at] ^= 1 << bit
        yield Mutation("bitflip", f"bit {bit} of byte {at}", bytes(d))


def random_field_edits(p: Parsed, rng: random.Random, n: int) -> Iterator[Mutation]:
    """A random value (of the field's kind, often a boundary) in a random field, checksums redone."""
    items = sections_of(p.blob())
    for _ in range(n):
        sec, values = rng.choice(items)
        vmsd = SECTION_VMSDS[sec.name]
        f = rng.choice(vmsd.fields)
        value = random_value(f.kind if isinstance(f.kind, str) else "list", values.get(f.name), rng)
        if f.is_list and not isinstance(value, list):
            value = values[f.name][: rng.randrange(len(values[f.name]) + 1)] * rng.choice([0, 1, 2, 100])
        try:
            data = edit_field(p, sec.name, f.name, value, sec.instance)
        except (struct.error, TypeError, AttributeError, OverflowError):
            continue  # not encodable as this kind
        yield Mutation("field-random", f"{sec.path}/{f.name} = {short(value)}", data)


def random_value(kind: str, old: object, rng: random.Random) -> object:
    widths = {"u8": 8, "u16": 16, "u32": 32, "u64": 64}
    if kind in widths:
        top = (1 << widths[kind]) - 1
        return rng.choice([0, 1, top, top >> 1, rng.randrange(top + 1), rng.randrange(256)])
    if kind == "i64":
        return rng.choice([-(1 << 63), (1 << 63) - 1, 0, -1, rng.randrange(-(1 << 40), 1 << 40)])
    if kind == "bool":
        return rng.choice([False, True])
    if kind == "bytes":
        n = len(old) if isinstance(old, bytes) else 8
        size = rng.choice([0, 1, n - 1, n + 1, n, rng.randrange(2 * n + 2)])
        return bytes(rng.randrange(256) for _ in range(max(size, 0)))
    if kind == "str":
        return rng.choice(["", "running", "paused", "x" * 100, "\u00e9t\u00e9", "shutdown", "inmigrate"])
    return None


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


def mutations(p: Parsed, seed: int, n_trunc: int, n_flip: int, n_field: int) -> Iterator[Mutation]:
    rng = random.Random(seed)
    yield from named_edits(p)
    yield from truncations(p, rng, n_trunc)
    yield from bit_flips(p, rng, n_flip)
    yield from random_field_edits(p, rng, n_field)


# --- loading in-process -----------------------------------------------------------------------


class _BoardHost:
    """What the machine's BOARD table asks of its device manager, for devices built without a VM."""

    def __init__(self, ram: int) -> None:
        nothing = lambda *a, **k: None  # noqa: E731
        self.control = SimpleNamespace(request_reset=nothing, request_shutdown=nothing, request_suspend=nothing)
        self.ram_ranges = [(0, ram)]
        self.memory = None
        self.rtc = rtc.Rtc(ram, 0)
        self.pm1_event = acpi_pm.Pm1Event()
        self.i8042 = i8042.I8042(nothing)

    make_fw_cfg = DeviceManager.make_fw_cfg


class _Vcpus(list):
    """What machine_state asks of a machine's vCPU manager: the vCPUs (their index) and the state caps."""

    def __init__(self, count: int, caps: vcpu_state.StateCaps) -> None:
        super().__init__(SimpleNamespace(index=i) for i in range(count))
        self.caps = caps


@dataclass
class Shape:
    """What a target machine built with the source's options offers the decoders: its RAM
    blocks (in host memory), layout, vCPU count and state caps, and real devices."""

    blocks: list[RamBlock]
    layout: list[stream.Placement]
    machine: SimpleNamespace
    devices: list = field(default_factory=list)

    @classmethod
    def of(cls, data: bytes) -> Shape:
        reader = stream.Reader(io.BytesIO(data))
        infos, got_layout = reader.header()
        blocks = [RamBlock(i.name, i.size, -1, False, "ram", mem=bytearray(i.size)) for i in infos]
        secs = read_blob(parse(data).blob())
        vcpu = [decode(vcpu_state.VMSTATE, s.payload, s.version, s.path) for s in secs if s.name == "vcpu"]
        caps = vcpu_state.StateCaps(
            xsave_size=ctypes.sizeof(vcpu[0].xsave) if vcpu[0].xsave is not None else 0,
            xcrs=vcpu[0].xcrs is not None,
            msr_indices=tuple(vcpu[0].msrs),
        )
        pio = Bus("pio")
        devices = []
        for sec in secs:
            if sec.name == "serial":
                uart = serial.Serial(lambda b: None, lambda level: None, name=f"serial{sec.instance}")
                pio.register((0x3F8, 0x2F8, 0x3E8, 0x2E8)[sec.instance], 8, uart)
                devices.append(uart)
        host = _BoardHost(blocks[0].size)
        for board in BOARD:  # the machine's own table of the devices every PC has
            device = board.make(host, MachineConfig(smp=len(vcpu)))
            pio.register(board.port, board.size, device, board.offset)
            if all(d is not device for d in devices):  # one device may answer in two ranges
                devices.append(device)
        PciBus(pio, Bus("mmio"), lambda irq, level: None)  # the host bridge every PC has
        persistent = [d for d in pio.devices() if d.vmstate is not None]
        machine = SimpleNamespace(
            vcpus=_Vcpus(len(vcpu), caps),
            devices=SimpleNamespace(persistent=lambda: persistent),
            irqchip=SimpleNamespace(
                split=False, kvm_chips=True, kvm_pit=True
            ),  # the source's default, kernel-irqchip=on
            config=MachineConfig(),  # the source's machine type, pc
        )
        return cls(blocks, got_layout, machine, devices)


def load_in_process(data: bytes, shape: Shape, via: Path | None = None) -> str | None:
    """None when the stream loads into a valid machine; the refusal's text otherwise.
    Anything else it raises is a bug. ``via``: a scratch file to read it from, as
    ``-incoming file:`` does (large records read at their offsets by worker threads)."""
    if via is not None:
        via.write_bytes(data)
    with open(via, "rb", buffering=0) if via is not None else io.BytesIO(data) as src:
        try:
            loaded, _ = incoming.read_stream(stream.Reader(src), shape.blocks, shape.layout, shape.machine)
        except REFUSALS as e:
            return str(e)
    assert loaded.runstate in machine_state.RESUMABLE, loaded.runstate
    for st in loaded.vcpus:  # what would go to KVM re-encodes under the strict description
        decode(vcpu_state.VMSTATE, encode(vcpu_state.VMSTATE, st), vcpu_state.VMSTATE.version_id)
    for device, state in loaded.devices:
        device.load_state(state)
        for offset in range(2):
            for size in (1, 2, 4):
                assert 0 <= device.read(offset, size) < 1 << (8 * size)
        w = StateWriter()
        w.add(device.vmstate, device.save_state())
        (sec,) = read_blob(w.blob())
        device.load_state(decode(device.vmstate, sec.payload, sec.version, sec.path))
    return None


# --- loading in a real minivmm ------------------------------------------------------------------


@dataclass
class Verdict:
    kind: str  # "refused", "loaded", or a finding: "hang", "bad-exit", "traceback"
    detail: str


def judge(start: Callable[..., subprocess.Popen], args: list[str], path: Path, qmp: Path, timeout: float) -> Verdict:
    """Load ``path`` in a real minivmm started by ``start`` (which must kill it by process group)."""
    proc = start(*args, "-incoming", f"file:{path}", "-qmp", f"unix:{qmp},server=on,wait=off")
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline and proc.poll() is None:
        status = _query_status(qmp, deadline)
        if status is not None:
            break
        time.sleep(0.01)
    if status is not None:
        _quit(qmp)
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if status is None:
            return Verdict("hang", f"no answer within {timeout} s")
    err = proc.stderr.read().decode(errors="replace")
    if "Traceback" in err or "internal error" in err:
        return Verdict("traceback", err)
    if status is not None:
        return Verdict("loaded", status)
    lines = err.strip().splitlines()
    if proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("minivmm: "):
        return Verdict("refused", lines[0])
    return Verdict("bad-exit", f"status {proc.returncode}: {err!r}")


def _query_status(qmp: Path, deadline: float) -> str | None:
    """The run state over QMP, or None if the monitor is not (yet) there or went away."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        s.connect(str(qmp))
        f = s.makefile("rwb")
        if not f.readline():  # the greeting
            return None
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    return None
                reply = json.loads(line)
                if "return" in reply or "error" in reply:
                    break
        return reply["return"]["status"]
    except (OSError, ValueError, KeyError):
        return None
    finally:
        s.close()


def _quit(qmp: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(5)
        s.connect(str(qmp))
        f = s.makefile("rwb")
        f.readline()
        f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
        f.flush()
        f.readline()
    except OSError:
        pass
    finally:
        s.close()


def save_state(start: Callable[..., subprocess.Popen], workdir: Path, ram_mib: int = RAM_MIB) -> bytes:
    """A real stop-and-copy file of a running walker (its target resumes it)."""
    qmp = workdir / "source.qmp"
    proc = start(*guest_args(ram_mib), "-qmp", f"unix:{qmp},server=on,wait=off")
    out = workdir / "source.state"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _query_status(qmp, deadline) != "running":
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        time.sleep(0.02)
    time.sleep(0.3)  # the walker has dirtied its RAM
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(qmp))
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.write(json.dumps({"execute": "migrate", "arguments": {"uri": f"file:{out}"}}).encode() + b"\n")
    f.flush()
    while time.monotonic() < deadline:
        f.write(b'{"execute": "query-migrate"}\n')
        f.flush()
        reply = json.loads(f.readline())
        status = reply.get("return", {}).get("status")
        if status == "completed":
            break
        if status == "failed":
            raise RuntimeError(f"saving the state failed: {reply}")
        time.sleep(0.02)
    s.close()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return out.read_bytes()


# --- the CLI ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="in-process fuzzing time (default 60)")
    ap.add_argument("--real", type=int, default=20, help="mutations also loaded by a real minivmm (default 20)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ram", type=int, default=RAM_MIB, help="guest RAM in MiB (default 4)")
    opts = ap.parse_args(argv)
    findings: list[tuple[Mutation, str]] = []
    tried: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-stream-") as tmp:
        work = Path(tmp)
        procs = Processes(work)
        try:
            data = save_state(procs.start, work, opts.ram)
            p = parse(data)
            shape = Shape.of(data)
            assert load_in_process(data, shape) is None, "the unmutated state must load"
            deadline = time.monotonic() + opts.seconds
            seed = opts.seed
            real: list[Mutation] = []
            while time.monotonic() < deadline:
                for mut in mutations(p, seed, 400, 400, 400):
                    if time.monotonic() > deadline:
                        break
                    tried[mut.category] += 1
                    try:
                        load_in_process(mut.data, shape)
                    except Exception as e:  # noqa: BLE001 - a finding
                        findings.append((mut, f"{type(e).__name__}: {e}"))
                    if len(real) < opts.real and random.Random(seed * 7919 + tried.total()).random() < 0.02:
                        real.append(mut)
                seed += 1
            for i, mut in enumerate(real):
                path = work / "mutated.state"
                path.write_bytes(mut.data)
                v = judge(procs.start, guest_args(opts.ram), path, work / f"t{i}.qmp", 30)
                tried[f"real-{v.kind}"] += 1
                if v.kind not in ("refused", "loaded"):
                    findings.append((mut, f"{v.kind}: {v.detail}"))
        finally:
            procs.close()
    print(f"in-process loads: {sum(n for k, n in tried.items() if not k.startswith('real-'))}")
    for kind, n in sorted(tried.items()):
        print(f"  {kind}: {n}")
    print(f"findings: {len(findings)}")
    for mut, what in findings[:20]:
        print(f"  [{mut.category}] {mut.what}: {what}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

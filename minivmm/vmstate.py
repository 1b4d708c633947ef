"""Versioned state descriptions and their binary form, after QEMU's VMState.

A description (VMSD) names a record, its version and the oldest version it
can still load, and lists typed fields. A field added later carries the
version it appeared in (``since``): state written before that loads without
it and the field takes its default. Data that only some states need goes in
a subsection with a ``needed`` predicate; a loader that does not know a
subsection refuses it by name rather than misreading the bytes after it.

A state blob is: magic, format version, then sections (name, instance,
version, length, payload), then a CRC-32 of everything before it. Every
load error carries the path of what failed: ``vcpu[1]/lapic: expected 1024
bytes, got 12``.

Every loaded value is checked here, in one place, against what its field
declares (``min``/``max``, ``mask``, ``choices``, the allowed sizes): the
same values a guest write could produce, so a crafted blob cannot give a
device a state its own code never makes. Loading raises VMStateError and
nothing else, whatever the bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass

MAGIC = b"MVMS"
FORMAT_VERSION = 1

_INTS = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q", "i64": "<q"}


class VMStateError(ValueError):
    """A state blob that cannot be loaded; the message starts with the failing path."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str | VMSD  # u8 u16 u32 u64 i64 bool bytes str, or a nested description
    since: int = 1  # the description version that added the field
    size: int | tuple[int, ...] | None = None  # bytes: the exact length, or the lengths allowed
    is_list: bool = False
    default: object = None  # when loading state older than ``since``
    min: int | None = None  # integers: the smallest value loaded
    max: int | None = None  # integers: the largest value; bytes, str: the longest; lists: the most items
    mask: int | None = None  # integers: the only bits that may be set
    choices: frozenset | None = None  # the only values loaded (ints or strs)

    def sizes(self) -> tuple[int, ...] | None:
        return (self.size,) if isinstance(self.size, int) else self.size


@dataclass(frozen=True)
class Subsection:
    vmsd: VMSD
    needed: Callable[[object], bool]


@dataclass(frozen=True)
class VMSD:
    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[Field, ...]
    subsections: tuple[Subsection, ...] = ()
    pre_save: Callable[[object], object] | None = None  # obj -> what the fields are read from
    post_load: Callable[[dict], object] | None = None  # loaded fields -> the object to return
    check: Callable[[dict], tuple[str, str] | None] | None = None  # loaded fields -> (field, problem)
    # A device section an older minivmm did not write: when a stream lacks it, the device
    # keeps its power-on state (state from an older minivmm loads in a newer one).
    optional: bool = False


def _get(obj: object, name: str) -> object:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def as_dict(obj: object) -> dict:
    """A dataclass's fields as a dict (shallow): what a loaded record looks like."""
    if is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in fields(obj)}
    return dict(obj)


# --- writing ---------------------------------------------------------------------------


class _Out:
    def __init__(self) -> None:
        self.buf = bytearray()

    def int(self, kind: str, value: int) -> None:
        self.buf += struct.pack(_INTS[kind], value)

    def blob(self, data: bytes) -> None:
        self.int("u32", len(data))
        self.buf += data


def _write_value(out: _Out, f: Field, value: object, path: str) -> None:
    kind = f.kind
    if isinstance(kind, VMSD):
        out.buf += encode(kind, value, path)
    elif kind in _INTS:
        out.int(kind, int(value))
    elif kind == "bool":
        out.int("u8", 1 if value else 0)
    elif kind == "bytes":
        data = bytes(value)
        _check_size(f, len(data), path)
        out.blob(data)
    elif kind == "str":
        out.blob(str(value).encode())
    else:
        raise VMStateError(f"{path}: unknown field kind {kind!r}")


def encode(vmsd: VMSD, obj: object, path: str | None = None) -> bytes:
    """A record: its fields in order, then the subsections it needs."""
    path = path or vmsd.name
    src = vmsd.pre_save(obj) if vmsd.pre_save else obj
    out = _Out()
    for f in vmsd.fields:
        value = _get(src, f.name)
        where = f"{path}/{f.name}"
        if f.is_list:
            items = list(value)
            out.int("u32", len(items))
            for i, item in enumerate(items):
                _write_value(out, f, item, f"{where}[{i}]")
        else:
            _write_value(out, f, value, where)
    subs = [s for s in vmsd.subsections if s.needed(obj)]
    out.int("u32", len(subs))
    for sub in subs:
        out.blob(sub.vmsd.name.encode())
        out.int("u32", sub.vmsd.version_id)
        out.blob(encode(sub.vmsd, obj, f"{path}/{sub.vmsd.name}"))
    return bytes(out.buf)


# --- reading ----------------------------------------------------------------------------


class _In:
    def __init__(self, data: bytes | memoryview, path: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise VMStateError(f"{what}: truncated: expected {n} more bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self, kind: str, what: str) -> int:
        fmt = _INTS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def blob(self, what: str) -> bytes:
        return bytes(self.take(self.int("u32", what), what))

    def text(self, what: str) -> str:
        raw = self.blob(what)
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise VMStateError(f"{what}: invalid UTF-8 at byte {e.start} of {len(raw)}") from None

    def count(self, what: str) -> int:
        """A list or section count; every item takes at least a byte, so more than are left is corrupt."""
        n = self.int("u32", what)
        if n > len(self.data) - self.pos:
            raise VMStateError(f"{what}: count {n} is more than the {len(self.data) - self.pos} bytes left")
        return n


def _check_size(f: Field, n: int, path: str) -> None:
    sizes = f.sizes()
    if sizes is not None and n not in sizes:
        want = " or ".join(str(x) for x in sizes)
        raise VMStateError(f"{path}: expected {want} bytes, got {n}")
    if f.max is not None and n > f.max:
        raise VMStateError(f"{path}: {n} bytes is more than the {f.max} allowed")


def _check_int(f: Field, value: int, path: str) -> None:
    if f.min is not None and value < f.min:
        raise VMStateError(f"{path}: {value} is out of range (at least {f.min})")
    if f.max is not None and value > f.max:
        raise VMStateError(f"{path}: {value} is out of range (at most {f.max})")
    if f.mask is not None and value & ~f.mask:
        raise VMStateError(f"{path}: {value:#x} has bits outside {f.mask:#x} set")


def _read_value(inp: _In, f: Field, version: int, path: str) -> object:
    kind = f.kind
    if isinstance(kind, VMSD):
        return _decode(kind, inp, version, path)
    if kind in _INTS:
        value = inp.int(kind, path)
        _check_int(f, value, path)
    elif kind == "bool":
        raw = inp.int("u8", path)
        if raw > 1:
            raise VMStateError(f"{path}: {raw} is not a boolean (0 or 1)")
        value = bool(raw)
    elif kind == "bytes":
        value = inp.blob(path)
        _check_size(f, len(value), path)
    elif kind == "str":
        value = inp.text(path)
        if f.max is not None and len(value) > f.max:
            raise VMStateError(f"{path}: a string of {len(value)} characters is longer than the {f.max} allowed")
    else:
        raise VMStateError(f"{path}: unknown field kind {kind!r}")
    if f.choices is not None and value not in f.choices:
        shown = value if isinstance(value, int) else repr(value)
        raise VMStateError(f"{path}: {shown} is not one of {', '.join(sorted(map(str, f.choices)))}")
    return value


def _decode(vmsd: VMSD, inp: _In, version: int, path: str) -> object:
    values: dict = {}
    for f in vmsd.fields:
        where = f"{path}/{f.name}"
        if f.since > version:
            values[f.name] = f.default() if callable(f.default) else f.default
            continue
        if f.is_list:
            count = inp.count(where)
            if f.max is not None and count > f.max:
                raise VMStateError(f"{where}: {count} items is more than the {f.max} allowed")
            values[f.name] = [_read_value(inp, f, version, f"{where}[{i}]") for i in range(count)]
        else:
            values[f.name] = _read_value(inp, f, version, where)
    known = {s.vmsd.name: s.vmsd for s in vmsd.subsections}
    seen: set[str] = set()
    for _ in range(inp.count(f"{path}: subsection count")):
        name = inp.blob(f"{path}: subsection name").decode(errors="replace")
        sub_version = inp.int("u32", f"{path}/{name}: version")
        payload = inp.blob(f"{path}/{name}")
        sub = known.get(name)
        if sub is None:
            raise VMStateError(f"{path}: unknown subsection '{name}'")
        if name in seen:
            raise VMStateError(f"{path}: subsection '{name}' appears twice")
        seen.add(name)
        values.update(as_dict(decode(sub, payload, sub_version, f"{path}/{name}")))
    problem = vmsd.check(values) if vmsd.check else None
    if problem is not None:
        raise VMStateError(f"{path}/{problem[0]}: {problem[1]}")
    if vmsd.post_load is None:
        return values
    try:
        return vmsd.post_load(values)
    except VMStateError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as e:  # a description's checks missed it
        raise VMStateError(f"{path}: cannot be loaded: {e}") from None


def decode(vmsd: VMSD, data: bytes | memoryview, version: int, path: str | None = None) -> object:
    """Load one record written with ``version`` of this description."""
    path = path or vmsd.name
    if version > vmsd.version_id:
        raise VMStateError(f"{path}: state version {version} is newer than this minivmm's {vmsd.version_id}")
    if version < vmsd.minimum_version_id:
        raise VMStateError(
            f"{path}: state version {version} is older than the oldest loadable, {vmsd.minimum_version_id}"
        )
    inp = _In(data, path)
    value = _decode(vmsd, inp, version, path)
    if inp.pos != len(inp.data):
        raise VMStateError(f"{path}: {len(inp.data) - inp.pos} bytes left over after the record")
    return value


# --- blobs of sections ---------------------------------------------------------------------


@dataclass
class Section:
    name: str
    instance: int
    version: int
    payload: bytes

    @property
    def path(self) -> str:
        return f"{self.name}[{self.instance}]"


@dataclass
class StateWriter:
    sections: list[Section] = field(default_factory=list)

    def add(self, vmsd: VMSD, obj: object, instance: int = 0) -> None:
        path = f"{vmsd.name}[{instance}]"
        self.sections.append(Section(vmsd.name, instance, vmsd.version_id, encode(vmsd, obj, path)))

    def blob(self) -> bytes:
        out = _Out()
        out.buf += MAGIC
        out.int("u32", FORMAT_VERSION)
        out.int("u32", len(self.sections))
        for s in self.sections:
            out.blob(s.name.encode())
            out.int("u32", s.instance)
            out.int("u32", s.version)
            out.blob(s.payload)
        out.int("u32", zlib.crc32(out.buf))
        return bytes(out.buf)


def read_blob(data: bytes | memoryview) -> list[Section]:
    """The sections of a state blob, after checking magic, version and checksum.

    The checksum covers the whole body and is checked before any section is
    parsed, so damage reads as damage; only a blob whose checksum was
    recomputed reaches the field checks.
    """
    view = memoryview(data)
    inp = _In(view, "state")
    magic = bytes(inp.take(4, "state: magic"))
    if magic != MAGIC:
        raise VMStateError(f"Not a migration stream (bad magic {int.from_bytes(magic, 'big'):x})")
    version = inp.int("u32", "state: version")
    if version != FORMAT_VERSION:
        raise VMStateError(f"Unsupported migration stream version {version}")
    if len(view) < 16:
        raise VMStateError(f"state: truncated: {len(view)} bytes is too short for a state blob")
    (crc,) = struct.unpack("<I", view[-4:])
    if crc != zlib.crc32(view[:-4]):
        raise VMStateError("state: checksum mismatch: the stream is corrupt")
    inp = _In(view[:-4], "state")
    inp.pos = 8
    sections = []
    seen: set[tuple[str, int]] = set()
    for _ in range(inp.count("state: section count")):
        name = inp.blob("state: section name").decode(errors="replace")
        instance = inp.int("u32", f"{name}: instance")
        sversion = inp.int("u32", f"{name}[{instance}]: version")
        sections.append(Section(name, instance, sversion, inp.blob(f"{name}[{instance}]")))
        if (name, instance) in seen:
            raise VMStateError(f"{name}[{instance}]: section appears twice in the state")
        seen.add((name, instance))
    if inp.pos != len(inp.data):
        raise VMStateError(f"state: {len(inp.data) - inp.pos} bytes after the last section")
    return sections

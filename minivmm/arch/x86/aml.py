"""A small AML (ACPI Machine Language, ACPI spec chapter 20) encoder: the few
terms a PC's DSDT needs, each a function returning its encoded bytes.

Terms nest by concatenation: ``device("COM1", name("_HID", eisa_id("PNP0501")))``
is the bytes of a DeviceOp whose body is one NameOp. Objects that carry a
length (Scope, Device, Method, Package, Buffer) prefix their body with a
PkgLength, which counts its own bytes too. Resource templates (_CRS values)
are Buffers of resource descriptors (spec 6.4) closed by an End Tag.

Values: an ``int`` is encoded as the shortest AML integer (Zero, One,
BytePrefix, WordPrefix, DWordPrefix, QWordPrefix), a ``str`` as a String,
``bytes`` as an already encoded term (a Package, a Buffer).
"""

from __future__ import annotations

import re
import struct

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP, RETURN_OP = 0x08, 0x10, 0x11, 0x12, 0x14, 0xA4
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x5E, 0x2E, 0x2F
PKG_LENGTH_MAX = (1 << 28) - 1  # 4 bits in the lead byte and 3 more bytes

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")

Value = int | str | bytes


def pkg_length(content: int) -> bytes:
    """The PkgLength of ``content`` bytes: the encoded total counts the PkgLength's own bytes."""
    if content < 0:
        raise ValueError(f"AML package content length {content} is negative")
    if content + 1 < 0x40:
        return bytes([content + 1])  # one byte: bits 0-5 hold the length
    for extra in (1, 2, 3):
        total = content + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)  # bits 6-7: following bytes; bits 0-3: low nibble
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {content} bytes is longer than PkgLength can say ({PKG_LENGTH_MAX})")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"AML name segment {seg!r} is not 1-4 of A-Z, 0-9, _ (not starting with a digit)")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    r"""A NameString: optional root ('\') or parent ('^') prefixes, then dot-separated segments."""
    out = bytearray()
    rest = path
    if rest.startswith("\\"):
        out.append(ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            out.append(PARENT_PREFIX)
            rest = rest[1:]
    segs = rest.split(".") if rest else []
    if len(segs) > 255:
        raise ValueError(f"AML name {path!r} has {len(segs)} segments, more than 255")
    encoded = b"".join(name_seg(s) for s in segs)
    if not segs:
        out.append(0x00)  # NullName
    elif len(segs) == 2:
        out.append(DUAL_NAME_PREFIX)
    elif len(segs) > 2:
        out += bytes([MULTI_NAME_PREFIX, len(segs)])
    return bytes(out) + encoded


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned integer (ComputationalData)."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer {value} is outside 0 to 2**64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 8), (WORD_PREFIX, "<H", 16), (DWORD_PREFIX, "<I", 32)):
        if value < 1 << limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String: ASCII 0x01-0x7f, NUL-terminated."""
    if not text.isascii() or "\0" in text:
        raise ValueError(f"AML string {text!r} must be ASCII without NUL")
    return bytes([STRING_PREFIX]) + text.encode() + b"\0"


def eisa_id(text: str) -> int:
    """ASL's EisaId(): "PNP0501" as the 32-bit compressed EISA id (three 5-bit letters, four hex digits).

    The value is what the DWord holds in memory order: byte 0 and 1 are the
    letters, bytes 2 and 3 the product number, so PNP0A03 is 0x030AD041.
    """
    if not re.fullmatch(r"[A-Z@]{3}[0-9A-F]{4}", text):
        raise ValueError(f"EISA id {text!r} is not three capital letters and four hex digits")
    c1, c2, c3 = (ord(c) - 0x40 for c in text[:3])
    raw = bytes([(c1 << 2) | (c2 >> 3), ((c2 & 7) << 5) | c3]) + bytes.fromhex(text[3:])
    return int.from_bytes(raw, "little")


def value(v: Value) -> bytes:
    """A DataRefObject: an int, a str, or an already encoded term."""
    if isinstance(v, bool):
        raise TypeError("AML value: use 0 or 1, not a bool")
    if isinstance(v, int):
        return integer(v)
    if isinstance(v, str):
        return string(v)
    if isinstance(v, bytes | bytearray):
        return bytes(v)
    raise TypeError(f"AML value {v!r} is not an int, str or encoded term")


def _with_length(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


def package(*elements: Value) -> bytes:
    """Package(n){...}: up to 255 elements."""
    if len(elements) > 255:
        raise ValueError(f"AML Package of {len(elements)} elements: PackageOp holds at most 255")
    body = bytes([len(elements)]) + b"".join(value(e) for e in elements)
    return _with_length(bytes([PACKAGE_OP]), body)


def buffer(data: bytes) -> bytes:
    """Buffer(n){bytes}: the size as an integer term, then the bytes."""
    return _with_length(bytes([BUFFER_OP]), integer(len(data)) + bytes(data))


def name(path: str, v: Value) -> bytes:
    """Name(path, value)."""
    return bytes([NAME_OP]) + name_string(path) + value(v)


def scope(path: str, *terms: bytes) -> bytes:
    return _with_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return _with_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False) -> bytes:
    """Method(path, nargs, [Not]Serialized){terms}: sync level 0."""
    if not 0 <= nargs <= 7:
        raise ValueError(f"AML Method {path!r}: {nargs} arguments, the most is 7")
    flags = nargs | (0x08 if serialized else 0)
    return _with_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(v: Value) -> bytes:
    """Return(value)."""
    return bytes([RETURN_OP]) + value(v)


# --- resource descriptors (ACPI spec 6.4) ------------------------------------------------------------


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """IO(Decode16, min, max, alignment, length): the small I/O port descriptor."""
    for what, v, limit in (("min", minimum, 0xFFFF), ("max", maximum, 0xFFFF), ("alignment", alignment, 0xFF)):
        if not 0 <= v <= limit:
            raise ValueError(f"IO descriptor {what} {v:#x} is outside 0 to {limit:#x}")
    if not 0 <= length <= 0xFF:
        raise ValueError(f"IO descriptor length {length} is outside 0 to 255")
    if maximum < minimum:
        raise ValueError(f"IO descriptor max {maximum:#x} is below min {minimum:#x}")
    return struct.pack("<BBHHBB", 0x47, 0x01, minimum, maximum, alignment, length)  # 0x01: 16-bit decode


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags(){irqs}: ISA IRQs, edge-triggered, active high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ descriptor: IRQ {irq} is not an ISA IRQ (0-15)")
        mask |= 1 << irq
    return struct.pack("<BH", 0x22, mask)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, count)."""
    if not 0 <= minimum <= maximum <= 0xFF:
        raise ValueError(f"bus number range {minimum}-{maximum} is not within 0-255")
    length = maximum - minimum + 1
    # tag, length 13, resource type 2 (bus number), general flags (min fixed, max fixed), type flags 0
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, minimum, maximum, 0, length)


def dword_memory(minimum: int, length: int) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0, min,
    min + length - 1, 0, length): a fixed 32-bit memory range, as QEMU describes q35's ECAM window."""
    if not (length >= 1 and minimum >= 0 and minimum + length <= 1 << 32):
        raise ValueError(f"DWordMemory {minimum:#x}+{length:#x} is not a range below 4 GiB")
    # tag, length 23, resource type 0 (memory), general flags (min, max fixed), read-write non-cacheable
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x01, 0, minimum, minimum + length - 1, 0, length)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors and the End Tag (checksum 0: not checked)."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0x00]))

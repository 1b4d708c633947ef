"""Guest RAM blocks and bounds-checked guest-physical access."""

import os

import pytest

from minivmm.memory import GuestMemory, GuestMemoryError, RamBlock

MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory()
    yield m
    m.close()


def test_named_memfd_shared_and_private(mem):
    shared = mem.add_block(RamBlock.memfd("pc.ram", 4 * MiB, shared=True))
    assert os.readlink(f"/proc/self/fd/{shared.fd}") == "/memfd:pc.ram (deleted)"
    mem.map(0, 4 * MiB, shared)
    mem.write(0x1000, b"hello")
    assert os.pread(shared.fd, 5, 0x1000) == b"hello"  # the memfd *is* guest RAM
    private = mem.add_block(RamBlock.memfd("private", 4 * MiB, shared=False))
    private.mem[0:5] = b"hello"
    assert os.pread(private.fd, 5, 0) == bytes(5)  # MAP_PRIVATE: the memfd is untouched


def test_reads_and_writes_outside_ram_are_refused(mem):
    block = mem.add_block(RamBlock.memfd("pc.ram", 2 * MiB, shared=True))
    mem.map(0, 2 * MiB, block)
    for gpa, length in [(2 * MiB, 1), (2 * MiB - 4, 8), (-1, 1), (1 << 40, 4)]:
        with pytest.raises(GuestMemoryError, match="not RAM|bad guest-physical"):
            mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.write(2 * MiB - 2, b"abcd")
    assert mem.read(2 * MiB - 4, 4) == bytes(4)


def test_overlay_punches_a_hole(mem):
    ram = mem.add_block(RamBlock.memfd("pc.ram", 2 * MiB, shared=True))
    rom = mem.add_block(RamBlock.memfd("pc.bios", 64 * 1024, shared=False))
    mem.map(0, 2 * MiB, ram)
    mem.map(0xF0000, 0x10000, rom)
    assert [(m.gpa, m.size, m.block.name, m.offset) for m in mem.mappings] == [
        (0, 0xF0000, "pc.ram", 0),
        (0xF0000, 0x10000, "pc.bios", 0),
        (0x100000, 0x100000, "pc.ram", 0x100000),
    ]
    rom.mem[0:2] = b"\xea\x5b"
    assert mem.read(0xF0000, 2) == b"\xea\x5b"
    with pytest.raises(GuestMemoryError):
        mem.read(0xEFFFF, 2)  # a single access may not straddle two blocks


def test_cstring_is_bounded_by_ram(mem):
    block = mem.add_block(RamBlock.memfd("pc.ram", 1 * MiB, shared=True))
    mem.map(0, 1 * MiB, block)
    block.mem[MiB - 3 : MiB] = b"abc"  # no NUL before the end of RAM
    assert mem.read_cstring(MiB - 3) == b"abc"
    assert mem.read_cstring(0x100, limit=16) == b""


def test_misaligned_mapping_is_refused(mem):
    block = mem.add_block(RamBlock.memfd("pc.ram", 1 * MiB, shared=True))
    with pytest.raises(GuestMemoryError, match="bad mapping"):
        mem.map(0x800, 0x1000, block)
    twin = RamBlock.memfd("pc.ram", 1 * MiB, shared=True)
    with pytest.raises(GuestMemoryError, match="already exists"):
        mem.add_block(twin)
    twin.close()

"""Guest RAM as the command line describes it: which block backs it, where
it sits in guest-physical memory (split around the 32-bit MMIO hole when
large, as the machine type says: MachineType.ram_ranges), the -bios ROM, and the KVM memory slots made from that map.

Every block with an fd is opened through the CPR fd table: an incoming
update finds the guest's RAM there, as it is, and writes nothing to it.
"""

from __future__ import annotations

import os

from minivmm.arch.x86 import layout
from minivmm.config import MIN_RAM, MachineConfig, MemoryBackendConfig
from minivmm.cpr.fdtable import FdTable
from minivmm.kvm import constants as c
from minivmm.kvm.system import KvmError, Vm
from minivmm.log import message
from minivmm.memory import GuestMemory, GuestMemoryError, RamBlock, Slot

from .errors import MachineError


def host_memory_limit() -> int:
    """Bytes of RAM plus swap: more than this cannot be backed."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("MemTotal", "SwapTotal"):
                total += int(value.split()[0]) * 1024
    return total


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g} {unit}"
    return f"{size} B"


def ram_size(cfg: MachineConfig) -> int:
    """-m, or the size of the backend -machine memory-backend names (they must agree)."""
    if cfg.memory_backend is None:
        return cfg.ram_size
    backend = cfg.backends.get(cfg.memory_backend)
    if backend is None:
        raise MachineError(
            f"-machine memory-backend={cfg.memory_backend}",
            f"Device '{cfg.memory_backend}' not found (no -object with that id)",
        )
    if backend.size < MIN_RAM:
        raise MachineError(backend.option, f"guest RAM must be at least {MIN_RAM >> 20} MiB")
    if cfg.ram_size_option is not None and backend.size != cfg.ram_size:
        raise MachineError(
            f"-m {cfg.ram_size_option}",
            f"Memory size does not match the size of the memory backend '{backend.id}' "
            f"(-m is {cfg.ram_size} bytes, the backend {backend.size} bytes)",
        )
    return backend.size


class RamBuilder:
    def __init__(self, cfg: MachineConfig, fds: FdTable) -> None:
        self.cfg, self.fds = cfg, fds

    def build(self, memory: GuestMemory, ranges: list[tuple[int, int]], firmware: bytes | None) -> None:
        cfg = self.cfg
        size = sum(length for _, length in ranges)
        if cfg.memory_backend is not None:
            backend = cfg.backends[cfg.memory_backend]
            ram = self._block(backend.id, size, backend, backend.option)
        else:
            ram = self._block("pc.ram", size, None, f"-m {cfg.ram_size_option or size >> 20}")
        memory.add_block(ram)
        offset = 0
        split = len(ranges) > 1
        for (gpa, length), label in zip(ranges, ("ram-below-4g", "ram-above-4g")):
            memory.map(gpa, length, ram, offset, label if split else None)
            offset += length
        if firmware is not None:
            self._rom(memory, firmware)

    def _rom(self, memory: GuestMemory, fw: bytes) -> None:
        """-bios: a ROM ending at 4 GiB, its last 128 KiB also below 1 MiB (isa-bios)."""
        rom_size = -(-len(fw) // layout.PAGE_SIZE) * layout.PAGE_SIZE
        rom = self._block("pc.bios", rom_size, None, f"-bios {self.cfg.bios}")
        rom.readonly = True
        if not self.cfg.incoming:  # incoming, the ROM comes with the stream or stays in its memfd (CPR)
            rom.mem[rom_size - len(fw) :] = fw
        memory.add_block(rom)
        memory.map(layout.FOUR_GIB - rom_size, rom_size, rom, 0)
        alias = min(rom_size, layout.BIOS_ALIAS_MAX)
        memory.map(layout.BIOS_ALIAS_END - alias, alias, rom, rom_size - alias, "isa-bios")

    def _block(self, name: str, size: int, backend: MemoryBackendConfig | None, option: str) -> RamBlock:
        kind = "memfd" if backend is None else backend.kind
        shared = self.cfg.aux_ram_share if backend is None else backend.share
        saved = self.fds.claim("ram", name)
        if saved >= 0:  # an incoming CPR: the guest's RAM, as it is
            have = os.fstat(saved).st_size
            if have < size:
                raise MachineError(option, f"cpr: RAM block '{name}' has {have} bytes, this machine needs {size}")
            try:
                return RamBlock.from_fd(name, size, saved, shared=shared, kind=kind)
            except GuestMemoryError as e:
                raise MachineError(option, str(e)) from None
        block = self._new(name, size, backend, option)
        if block.fd >= 0:
            self.fds.save("ram", name, block.fd)
        return block

    def _new(self, name: str, size: int, backend: MemoryBackendConfig | None, option: str) -> RamBlock:
        limit = host_memory_limit()
        if size > limit:
            raise MachineError(
                option,
                f"cannot set up guest memory '{name}': {_size_text(size)} is more than the host has "
                f"({_size_text(limit)} of RAM and swap)",
            )
        cfg = self.cfg
        try:
            if backend is None:
                prealloc = cfg.mem_prealloc and name == "pc.ram"
                return RamBlock.memfd(name, size, shared=cfg.aux_ram_share, prealloc=prealloc)
            if backend.kind == "memfd":
                return RamBlock.memfd(
                    name, size, shared=backend.share, hugetlb=backend.hugetlb, prealloc=backend.prealloc
                )
            if backend.kind == "file":
                return RamBlock.file(name, size, backend.mem_path, shared=backend.share, prealloc=backend.prealloc)
            return RamBlock.anonymous(name, size, shared=backend.share, prealloc=backend.prealloc)
        except GuestMemoryError as e:
            raise MachineError(option, str(e)) from None


def add_memslots(vm: Vm, memory: GuestMemory) -> list[Slot]:
    """One KVM memory slot per mapping; a ROM's is read-only to the guest."""
    slots = []
    for slot, m in enumerate(memory.mappings):
        flags = c.KVM_MEM_READONLY if m.block.readonly else 0
        vm.set_user_memory_region(slot, m.gpa, m.size, m.block.host_addr + m.offset, flags)
        slots.append(Slot(slot, m))
    return slots


class DeviceSlots:
    """KVM memory slots for device memory (an assigned device's mmap'd BARs), numbered after RAM's.

    A slot follows its BAR: KVM cannot move a slot to another address with the same number while
    keeping it, so a move deletes it (size 0) and adds it again; unmapping the BAR deletes it. The
    address is the guest's choice, made in a vCPU's configuration write: where KVM refuses the slot
    (over RAM or another slot) the BAR stays trapped, as on the buses, and the guest runs on.
    """

    def __init__(self, vm: Vm, first: int) -> None:
        self.vm, self.next = vm, first
        self.slots: dict[str, tuple[int, int | None]] = {}  # key -> (slot, gpa while mapped)

    def place(self, key: str, gpa: int | None, size: int, host_addr: int) -> None:
        slot, at = self.slots.get(key, (None, None))
        if slot is None:
            slot, self.next = self.next, self.next + 1
        if at is not None:
            self.vm.set_user_memory_region(slot, at, 0, host_addr)
        self.slots[key] = (slot, None)
        if gpa is None:
            return
        try:
            self.vm.set_user_memory_region(slot, gpa, size, host_addr)
        except KvmError as e:
            message(f"{key} at {gpa:#x}: no memory slot ({os.strerror(e.errno)}): its accesses are trapped")
            return
        self.slots[key] = (slot, gpa)

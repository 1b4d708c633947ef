"""QEMU's "edu" educational PCI device (1234:11e8): one 1 MiB MMIO BAR with an
identification register, a liveness check, a factorial computer, interrupts
and DMA to and from a 4 KiB buffer at 0x40000 (QEMU's docs/specs/edu.rst).

Registers (32-bit unless noted): 0x00 identification 0x010000ed; 0x04 card
liveness (reads the bitwise NOT of what was written); 0x08 factorial (write
n, read n! modulo 2^32); 0x20 status (bit 0 computing, bit 7 raise an
interrupt when a factorial is done); 0x24 interrupt status; 0x60 raise
interrupt (ORs the value in); 0x64 acknowledge; 0x80/0x88/0x90 (64-bit) DMA
source, destination and count; 0x98 DMA command (bit 0 start, bit 1
direction: 0 RAM to the buffer, 1 the buffer to RAM, bit 2 interrupt 0x100
when done). The factorial and DMA complete at once (QEMU does them in a
thread; a guest polls the same bits either way). DMA addresses are checked:
the buffer side must lie in 0x40000-0x40fff, the RAM side in guest RAM;
anything else is not done. The RAM side is a bus address: ``memory`` is the
function's DMA view (guest RAM, or the IOMMU's translation of it).

Interrupts are INTA, or, once the guest enables the MSI capability (at 0x40,
as QEMU's edu has it), one MSI per raise, through ``send_msi``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.devices.device import Device
from minivmm.memory import GuestMemoryError

from .pci import Bar, PciFunction

MMIO_SIZE = 1 << 20
IDENT = 0x010000ED
STATUS_COMPUTING, STATUS_IRQ_FACT = 0x01, 0x80
IRQ_FACT, IRQ_DMA = 0x1, 0x100
DMA_START, DMA_TO_RAM, DMA_IRQ = 0x1, 0x2, 0x4
DMA_BASE, DMA_SIZE = 0x40000, 0x1000
DMA_MASK = (1 << 28) - 1  # the device's DMA address width, as QEMU's


@dataclass
class EduRegisters(Device):
    memory: object  # GuestMemory: read(gpa, n), write(gpa, data), raising on addresses outside RAM
    set_irq: Callable[[int], None]
    name: str = "edu"
    liveness: int = 0
    factorial: int = 1
    status: int = 0
    irq_status: int = 0
    dma: dict[int, int] = field(default_factory=lambda: {0x80: 0, 0x88: 0, 0x90: 0, 0x98: 0})
    buffer: bytearray = field(default_factory=lambda: bytearray(DMA_SIZE))

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset >= DMA_BASE and offset + size <= DMA_BASE + DMA_SIZE:
            return int.from_bytes(self.buffer[offset - DMA_BASE : offset - DMA_BASE + size], "little")
        value = {
            0x00: IDENT,
            0x04: ~self.liveness & 0xFFFFFFFF,
            0x08: self.factorial,
            0x20: self.status,
            0x24: self.irq_status,
        }.get(offset)
        if value is None:
            value = self.dma.get(offset, 0xFFFFFFFF if offset < 0x80 else 0)
        return value & mask

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= DMA_BASE and offset + size <= DMA_BASE + DMA_SIZE:
            self.buffer[offset - DMA_BASE : offset - DMA_BASE + size] = value.to_bytes(size, "little")
            return
        value &= (1 << (8 * size)) - 1
        if offset == 0x04:
            self.liveness = value
        elif offset == 0x08 and not self.status & STATUS_COMPUTING:
            result = 1
            for n in range(2, min(value, 34) + 1):  # 34! has 2^32 as a factor: the result is 0 from there
                result = result * n & 0xFFFFFFFF
            self.factorial = result if value < 34 else 0
            if self.status & STATUS_IRQ_FACT:
                self._raise(IRQ_FACT)
        elif offset == 0x20:
            self.status = (self.status & STATUS_COMPUTING) | (value & STATUS_IRQ_FACT)
        elif offset == 0x60:
            self._raise(value)
        elif offset == 0x64:
            self.irq_status &= ~value
            if not self.irq_status:
                self.set_irq(0)
        elif offset in self.dma:
            self.dma[offset] = value
            if offset == 0x98 and value & DMA_START:
                self._dma(value)

    def _raise(self, bits: int) -> None:
        self.irq_status |= bits
        if self.irq_status:
            self.set_irq(1)

    def _dma(self, command: int) -> None:
        src, dst, count = self.dma[0x80] & DMA_MASK, self.dma[0x88] & DMA_MASK, self.dma[0x90]
        ram, buf = (dst, src) if command & DMA_TO_RAM else (src, dst)
        if buf >= DMA_BASE and buf + count <= DMA_BASE + DMA_SIZE and count:
            at = buf - DMA_BASE
            try:
                if command & DMA_TO_RAM:
                    self.memory.write(ram, bytes(self.buffer[at : at + count]))
                else:
                    self.buffer[at : at + count] = self.memory.read(ram, count)
            except GuestMemoryError:  # an address outside RAM: nothing is transferred
                pass
        self.dma[0x98] = command & ~DMA_START
        if command & DMA_IRQ:
            self._raise(IRQ_DMA)

    def reset(self) -> None:
        self.liveness, self.factorial, self.status, self.irq_status = 0, 1, 0, 0
        self.dma = dict.fromkeys(self.dma, 0)
        self.buffer[:] = bytes(DMA_SIZE)


class Edu(PciFunction):
    name = "edu"

    def __init__(self, memory) -> None:
        super().__init__(0x1234, 0x11E8, 0x00FF00, revision=0x10, interrupt_pin=1)
        self.registers = EduRegisters(memory, self._interrupt)
        self.add_bar(0, Bar("mmio", MMIO_SIZE, self.registers))
        self.add_msi()
        self.send_msi: Callable[[int, int], None] = lambda address, data: None  # set by the machine

    def _interrupt(self, level: int) -> None:
        """QEMU's edu_raise_irq/edu_lower_irq: an MSI per raise when enabled, else INTA's level."""
        message = self.msi_message()
        if message is None:
            self.set_irq(level)
        elif level:
            self.send_msi(*message)

    def reset(self) -> None:
        super().reset()
        self.registers.reset()

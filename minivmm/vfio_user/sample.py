"""minivmm's sample vfio-user device, served by ``minivmm-vfio-user SOCKET``.

A PCI function ``1234:4d56`` (vendor 0x1234 is the id QEMU's own test devices
use, edu's 1234:11e8 among them; 0x4d56 is "MV"), class 0x00ff00 (unclassified),
INTx pin A, an MSI capability with one vector (at 0x40), an MSI-X capability
with two vectors (at 0x50: its table at offset 0 and its pending bits at 0x800
of BAR2, a 64-bit memory BAR of 4 KiB the client emulates), a 2 KiB expansion
ROM (``ROM``: a PCI option ROM image for EFI, which a BIOS does not run), and
BAR0 of 4 KiB of 32-bit registers (little-endian):

======  ============  ===========================================================
offset  name          meaning
======  ============  ===========================================================
0x00    ID            RO ``0x4d565531`` ("MVU1")
0x04    VERSION       RO ``0x00010000`` (1.0)
0x08    SCRATCH       RW, reset 0
0x0c    COUNTER       RO, DMA transfers completed since reset
0x10    DMA_SRC_LO    RW; 0x14 DMA_SRC_HI: where a transfer reads, in DMA addresses
0x18    DMA_DST_LO    RW; 0x1c DMA_DST_HI: where it writes
0x20    DMA_LEN       RW, bytes (at most 1 MiB)
0x24    DMA_CMD       W bit 0: start; bit 1: interrupt when done. Reads the last command
0x28    DMA_STATUS    RO 0 done, 1 an address outside the client's DMA windows, 2 too long
0x2c    IRQ_STATUS    RO bit 0 a transfer ended, bit 1 raised by IRQ_RAISE
0x30    IRQ_RAISE     W sets IRQ_STATUS bits (the interrupt rises)
0x34    IRQ_ACK       W clears IRQ_STATUS bits (INTx falls when none is left)
======  ============  ===========================================================

A transfer copies DMA_LEN bytes from DMA_SRC to DMA_DST in guest memory, after
the reply to the write that started it. The interrupt goes to MSI-X when the
client gave MSI-X eventfds (vector 0 for a transfer, 1 for IRQ_RAISE), else to
MSI when it gave an MSI eventfd, else to INTx (level, automasked as VFIO's is,
so the client unmasks it after the guest's EOI).
"""

from __future__ import annotations

import argparse
import struct
import sys

from minivmm.devices import pci
from minivmm.vfio import constants as vc

from . import server as s

VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x4D56, 0x00FF00
BAR0_SIZE = 0x1000
ID, VERSION, SCRATCH, COUNTER = 0x00, 0x04, 0x08, 0x0C
DMA_SRC, DMA_DST, DMA_LEN, DMA_CMD, DMA_STATUS = 0x10, 0x18, 0x20, 0x24, 0x28
IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x2C, 0x30, 0x34
REGS_SIZE = 0x38
ID_VALUE, VERSION_VALUE = 0x4D565531, 0x00010000
CMD_START, CMD_IRQ = 1 << 0, 1 << 1
STATUS_OK, STATUS_FAULT, STATUS_TOO_LONG = 0, 1, 2
IRQ_DMA, IRQ_SOFT = 1 << 0, 1 << 1
DMA_MAX_LEN = 1 << 20
MSI_CAP, MSIX_CAP = 0x40, 0x50
PCI_STATUS_CAP_LIST, PCI_CAPABILITY_LIST, PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX = 0x10, 0x34, 0x05, 0x11
MSIX_BAR, MSIX_BAR_SIZE, MSIX_VECTORS, MSIX_TABLE, MSIX_PBA = 2, 0x1000, 2, 0x000, 0x800
ROM_SIZE, ROM_TEXT = 0x800, b"minivmm-vfio-user sample ROM"


def _rom() -> bytes:
    """An option ROM image: the 0x55aa signature and its size, the PCI data structure ("PCIR": the
    ids, the class, code type 3, EFI, the last image) at 0x20, and a line of text at 0x40."""
    rom = bytearray(ROM_SIZE)
    struct.pack_into("<BBB", rom, 0, 0x55, 0xAA, ROM_SIZE // 512)
    struct.pack_into("<H", rom, 0x18, 0x20)
    pcir = struct.pack(
        "<4sHHHHB3sHHBBH",
        b"PCIR",
        VENDOR_ID,
        DEVICE_ID,
        0,
        0x18,
        3,
        CLASS_CODE.to_bytes(3, "little"),
        ROM_SIZE // 512,
        0,
        3,
        0x80,
        0,
    )
    rom[0x20 : 0x20 + len(pcir)] = pcir
    rom[0x40 : 0x40 + len(ROM_TEXT)] = ROM_TEXT
    return bytes(rom)


ROM = _rom()


class SampleDevice(s.Device):
    regions = {
        vc.VFIO_PCI_BAR0_REGION_INDEX: s.Region(BAR0_SIZE),
        vc.VFIO_PCI_BAR0_REGION_INDEX + MSIX_BAR: s.Region(MSIX_BAR_SIZE),
        vc.VFIO_PCI_ROM_REGION_INDEX: s.Region(ROM_SIZE, vc.VFIO_REGION_INFO_FLAG_READ),
        vc.VFIO_PCI_CONFIG_REGION_INDEX: s.Region(pci.CONFIG_SIZE),
    }
    irqs = {
        vc.VFIO_PCI_INTX_IRQ_INDEX: s.Irq(
            1, vc.VFIO_IRQ_INFO_EVENTFD | vc.VFIO_IRQ_INFO_MASKABLE | vc.VFIO_IRQ_INFO_AUTOMASKED
        ),
        vc.VFIO_PCI_MSI_IRQ_INDEX: s.Irq(1, vc.VFIO_IRQ_INFO_EVENTFD | vc.VFIO_IRQ_INFO_NORESIZE),
        vc.VFIO_PCI_MSIX_IRQ_INDEX: s.Irq(MSIX_VECTORS, vc.VFIO_IRQ_INFO_EVENTFD | vc.VFIO_IRQ_INFO_NORESIZE),
    }

    def __init__(self) -> None:
        self.config = pci.PciFunction(VENDOR_ID, DEVICE_ID, CLASS_CODE, revision=1, interrupt_pin=1)
        self.config.add_bar(0, pci.Bar("mmio", BAR0_SIZE, None))  # type: ignore[arg-type]  # served, not on a bus
        self.config.add_bar(MSIX_BAR, pci.Bar("mmio", MSIX_BAR_SIZE, None, wide=True))  # type: ignore[arg-type]
        self.config.set_bar_address(MSIX_BAR, 0)  # its type bits: 64-bit
        cfg = self.config.config
        cfg[pci.STATUS] |= PCI_STATUS_CAP_LIST
        cfg[PCI_CAPABILITY_LIST] = MSI_CAP
        # MSI: id, next MSI-X, message control: 64-bit capable, one vector; address and data follow
        struct.pack_into("<BBH", cfg, MSI_CAP, PCI_CAP_ID_MSI, MSIX_CAP, 1 << 7)
        # MSI-X: id, next 0, message control: table size - 1; table and PBA offsets with their BAR
        struct.pack_into(
            "<BBHII", cfg, MSIX_CAP, PCI_CAP_ID_MSIX, 0, MSIX_VECTORS - 1, MSIX_TABLE | MSIX_BAR, MSIX_PBA | MSIX_BAR
        )
        self.config.initial = bytes(cfg)
        self.regs = bytearray(REGS_SIZE)
        self.server: s.Server | None = None
        self.reset()

    def attach(self, server: s.Server) -> None:
        self.server = server

    def reset(self) -> None:
        self.config.reset()
        self.regs[:] = bytes(REGS_SIZE)
        struct.pack_into("<II", self.regs, ID, ID_VALUE, VERSION_VALUE)

    def _reg(self, offset: int) -> int:
        return struct.unpack_from("<I", self.regs, offset)[0]

    def _set(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.regs, offset, value & 0xFFFFFFFF)

    # --- regions ---------------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == vc.VFIO_PCI_CONFIG_REGION_INDEX:
            return bytes(self.config.config[offset : offset + count])
        if index == vc.VFIO_PCI_ROM_REGION_INDEX:
            return ROM[offset : offset + count]
        if index != vc.VFIO_PCI_BAR0_REGION_INDEX:
            return bytes(count)  # BAR2: the MSI-X table and PBA are the client's to emulate
        return bytes(self.regs[offset : offset + count]).ljust(count, b"\0")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == vc.VFIO_PCI_CONFIG_REGION_INDEX:
            for at in range(0, len(data), 4):  # PciFunction takes accesses of at most 4 bytes
                chunk = data[at : at + 4]
                self.config.write_config(offset + at, len(chunk), int.from_bytes(chunk, "little"))
            return
        if index != vc.VFIO_PCI_BAR0_REGION_INDEX:
            return
        writes: dict[int, int] = {}
        for i, byte in enumerate(data):
            at = offset + i
            if at >= REGS_SIZE:
                break
            reg = at & ~3
            if reg == SCRATCH or DMA_SRC <= reg <= DMA_LEN:
                self.regs[at] = byte
            elif reg in (DMA_CMD, IRQ_RAISE, IRQ_ACK):
                writes[reg] = writes.get(reg, 0) | byte << (8 * (at - reg))
        if DMA_CMD in writes:
            self._set(DMA_CMD, writes[DMA_CMD])
            if writes[DMA_CMD] & CMD_START:
                self.server.defer(lambda cmd=writes[DMA_CMD]: self._transfer(cmd))
        if IRQ_RAISE in writes:
            self._raise(writes[IRQ_RAISE] & (IRQ_DMA | IRQ_SOFT))
        if IRQ_ACK in writes:
            self._set(IRQ_STATUS, self._reg(IRQ_STATUS) & ~writes[IRQ_ACK])

    # --- DMA and interrupts ------------------------------------------------------------------------
    def _transfer(self, cmd: int) -> None:
        src = self._reg(DMA_SRC) | self._reg(DMA_SRC + 4) << 32
        dst = self._reg(DMA_DST) | self._reg(DMA_DST + 4) << 32
        length = self._reg(DMA_LEN)
        status = STATUS_OK
        if length > DMA_MAX_LEN:
            status = STATUS_TOO_LONG
        else:
            try:
                self.server.dma.write(dst, self.server.dma.read(src, length))
            except s.DmaError as e:
                self.server.say(f"DMA {src:#x} -> {dst:#x} ({length} bytes): {e}")
                status = STATUS_FAULT
        self._set(DMA_STATUS, status)
        if status == STATUS_OK:
            self._set(COUNTER, self._reg(COUNTER) + 1)
        if cmd & CMD_IRQ:
            self._raise(IRQ_DMA)

    def _raise(self, bits: int) -> None:
        if not bits:
            return
        self._set(IRQ_STATUS, self._reg(IRQ_STATUS) | bits)
        irqs = self.server.irqs
        if (vc.VFIO_PCI_MSIX_IRQ_INDEX, 0) in irqs.triggers:
            for vector, bit in enumerate((IRQ_DMA, IRQ_SOFT)):
                if bits & bit:
                    irqs.signal(vc.VFIO_PCI_MSIX_IRQ_INDEX, vector)
        elif (vc.VFIO_PCI_MSI_IRQ_INDEX, 0) in irqs.triggers:
            irqs.signal(vc.VFIO_PCI_MSI_IRQ_INDEX)
        else:
            self._intx()

    def _intx(self) -> None:
        command = struct.unpack_from("<H", self.config.config, pci.COMMAND)[0]
        if self._reg(IRQ_STATUS) and not command & pci.CMD_INTX_DISABLE:
            self.server.irqs.signal(vc.VFIO_PCI_INTX_IRQ_INDEX, automask=True)

    def unmasked(self, index: int, sub: int) -> None:
        if index == vc.VFIO_PCI_INTX_IRQ_INDEX:
            self._intx()  # still asserted: it fires again


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minivmm-vfio-user", description="minivmm's sample vfio-user PCI device, served on a unix socket"
    )
    parser.add_argument("socket", help="the unix socket path to listen on (vfio-user-pci,socket=PATH)")
    args = parser.parse_args(argv)
    try:
        listener = s.listen(args.socket)
    except OSError as e:
        print(f"minivmm-vfio-user: {args.socket}: {e.strerror}", file=sys.stderr)
        return 1
    server = s.Server(SampleDevice(), listener)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

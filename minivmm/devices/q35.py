"""The q35 chipset's PCI functions, as QEMU's q35 machine has them after its
firmware ran: the MCH host bridge (8086:29c0) at 00:00.0, whose PCIEXBAR
register places the ECAM window (pcie.py), and the ICH9 LPC/ISA bridge
(8086:2918) at 00:1f.0, whose chipset configuration decides where PCI
interrupts go.

The LPC is configuration space only: its PMBASE says the ACPI PM block is at
0x600 (with ACPI enabled, SCI on IRQ 9), as SeaBIOS leaves it, and its PIRQ
routing registers keep their reset value (routing to the PICs disabled), so
PCI INTx reaches the IOAPIC alone, on GSIs 16-23 (``pirq_gsi``). Writes to
them are ignored: the PM block stays where the FADT says. QEMU's q35 also
has SATA (00:1f.2) and SMBus (00:1f.3) functions, which minivmm leaves out:
their drivers would find registers that do nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from minivmm.arch.x86 import layout

from .pci import HEADER_TYPE, PciFunction

MCH_ID, LPC_ID = (0x8086, 0x29C0), (0x8086, 0x2918)
LPC_SLOT = 0x1F
HEADER_MULTIFUNCTION = 0x80  # QEMU's LPC shares its slot with SATA and SMBus

# MCH PCIEXBAR (64 bits at 0x60): enable, length (256, 128 or 64 MiB), base address bits 35:26.
PCIEXBAR = 0x60
PCIEXBAR_EN = 1 << 0
PCIEXBAR_LENGTH_SHIFT = 1
PCIEXBAR_LENGTHS = {0: 256 << 20, 1: 128 << 20, 2: 64 << 20}  # 3 is reserved: no window
PCIEXBAR_ADDRESS = ((1 << 36) - 1) & ~((1 << 26) - 1)
PCIEXBAR_WRITABLE = PCIEXBAR_ADDRESS | 0x7

# ICH9 LPC registers, as firmware leaves them.
LPC_PMBASE, LPC_ACPI_CNTL = 0x40, 0x44
PMBASE_IO = 0x1  # the register's I/O-space indicator bit
ACPI_CNTL_ACPI_EN = 0x80  # SCI IRQ select 0: IRQ 9
LPC_PIRQA_ROUT, LPC_PIRQE_ROUT = 0x60, 0x68
PIRQ_ROUT_DISABLED = 0x80  # their reset value: the PIRQ does not reach the PICs
PIRQ_GSI_BASE = 16  # in APIC mode PIRQ A-H are GSIs 16-23


def pirq_gsi(slot: int, pin: int) -> int:
    """The GSI INTx pin ``pin`` (1-4: INTA-INTD) of a device in ``slot`` reaches, as QEMU's ICH9
    routes it: PIRQ[(slot + pin - 1) mod 4 + E] for slots 0-24 (avoiding PIRQ A-D, which PCI Express
    root ports use), INTA-INTD to PIRQ A-D for the chipset's slots 25-29 and 31 (the default
    D25IR-D31IR), INTA-INTD to PIRQ E-H for slot 30 (the DMI-to-PCI bridge)."""
    intx = pin - 1
    if slot == 30:
        pirq = intx + 4
    elif slot >= 25:
        pirq = intx
    else:
        pirq = (slot + intx) % 4 + 4
    return PIRQ_GSI_BASE + pirq


class MchHostBridge(PciFunction):
    """QEMU's q35 host bridge; PCIEXBAR enabled at the default ECAM base, as SeaBIOS sets it."""

    name = "mch"

    def __init__(self) -> None:
        super().__init__(*MCH_ID, 0x060000)
        struct.pack_into("<Q", self.config, PCIEXBAR, layout.PCIE_ECAM_BASE | PCIEXBAR_EN)
        self.initial = bytes(self.config)
        # set by the bus: map the ECAM window (enabled, base, size)
        self.map_ecam: Callable[[bool, int, int], None] = lambda enabled, base, size: None

    def ecam_window(self) -> tuple[bool, int, int]:
        """(enabled, base, size) as PCIEXBAR says."""
        value = struct.unpack_from("<Q", self.config, PCIEXBAR)[0]
        size = PCIEXBAR_LENGTHS.get((value >> PCIEXBAR_LENGTH_SHIFT) & 0x3)
        if size is None:
            return False, 0, 0
        return bool(value & PCIEXBAR_EN), value & PCIEXBAR_ADDRESS & ~(size - 1), size

    def write_config(self, offset: int, size: int, value: int) -> None:
        moved = size == 0  # after a load or reset: re-read PCIEXBAR too
        for i in range(size):
            at = offset + i
            if PCIEXBAR <= at < PCIEXBAR + 8:
                mask = (PCIEXBAR_WRITABLE >> (8 * (at - PCIEXBAR))) & 0xFF
                self.config[at] = (self.config[at] & ~mask) | ((value >> (8 * i)) & mask)
                moved = True
        super().write_config(offset, size, value)  # the common registers (PCIEXBAR is not among them)
        if moved:
            self.map_ecam(*self.ecam_window())


class Ich9Lpc(PciFunction):
    """The LPC/ISA bridge at 00:1f.0: configuration space only (see the module's docstring)."""

    name = "ICH9-LPC"

    def __init__(self) -> None:
        super().__init__(*LPC_ID, 0x060100, revision=2)
        self.config[HEADER_TYPE] = HEADER_MULTIFUNCTION
        struct.pack_into("<I", self.config, LPC_PMBASE, layout.PORT_ACPI_PM1A_EVT | PMBASE_IO)
        self.config[LPC_ACPI_CNTL] = ACPI_CNTL_ACPI_EN
        for base in (LPC_PIRQA_ROUT, LPC_PIRQE_ROUT):
            self.config[base : base + 4] = bytes([PIRQ_ROUT_DISABLED]) * 4
        self.initial = bytes(self.config)

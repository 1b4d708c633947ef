"""The ACPI tables of minivmm's PC for a direct kernel boot (no firmware to
build them): how Linux finds the CPUs, the IOAPIC, the serial ports, and how
it powers the machine off; kvm-unit-tests finds the FADT and FACS through
the RSDP.

What is described, after QEMU's pc machine (PIIX4 power management):

- RSDP (revision 2) at ACPI_RSDP_ADDR, 16-byte aligned in 0xe0000-0xfffff,
  where Linux and kvm-unit-tests scan for it; it points at both the RSDT
  (32-bit entries) and the XSDT (64-bit entries), which list the FADT and
  the MADT.
- FADT (revision 6): PM1a event block at 0x600 (4 bytes), PM1a control block
  at 0x604 (2 bytes, the AcpiPm device: a write with SLP_EN powers off), the
  PM timer at 0x608 only when the machine has one, SCI on IRQ 9; no SMI
  command port, so the OS takes the machine as already in ACPI mode; the
  reset register (QEMU uses the PIIX reset control at 0xcf9; minivmm's
  default is the i8042's pulse-reset command, the reset line it emulates);
  the century byte of the CMOS RTC; IA-PC boot flags: legacy devices and an
  8042, no VGA. FACS and DSDT are given in both the 32- and 64-bit fields.
- FACS (64 bytes, 64-byte aligned): the firmware waking vector an S3 resume
  jumps to, and the global lock.
- MADT: the local APIC address, one enabled processor local APIC per vCPU
  (APIC id = index, as the MP table and the vCPU setup use), one IOAPIC
  with id ncpus (the id after the CPUs, as the MP table) and GSI base 0, and
  QEMU's interrupt source overrides: ISA IRQ 0 goes to GSI 2, because the
  PIT is wired to IOAPIC pin 2 (pin 0 carries the 8259's ExtINT), and the
  PCI-routable IRQs 5, 9 (the SCI), 10 and 11 are level-triggered, active
  high; LINT1 of every local APIC is the NMI input.
- DSDT (AML): \\_S5 = {0, 0, 0, 0} (SLP_TYP 0: ``SLP_EN | 0 << 10`` to
  PM1a_CNT is power-off) and \\_S3 = {1, 1, 0, 0} (QEMU's PIIX encoding:
  SLP_TYP 1 suspends to RAM; ``s3=False`` leaves S3 out); the present
  COM ports as PNP0501 devices with their I/O range and IRQ; QEMU's
  pvpanic device (QEMU0001) when present; fw_cfg (QEMU0002) when present;
  a PCI root bridge (PNP0A03, bus 0, the 0xcf8 config ports) only when the
  machine has PCI. Processors are not declared in the DSDT: Linux takes
  them from the MADT (no CPU hotplug, no C-states).
- With PCI Express enhanced configuration (q35, ``mcfg``): the MCFG table
  (one allocation: the ECAM base, segment 0, buses 0-255), the root bridge
  as PNP0A08 with _CID PNP0A03, and QEMU's DRAM controller device (DRAC,
  PNP0C01) whose _CRS reserves the ECAM window for the OS.
- ``dmar`` (q35 with ``-device intel-iommu``): the DMAR table as QEMU's q35
  builds it: host address width 48 bits (the field holds 47), the
  INTR_REMAP flag with interrupt remapping, and one DRHD for PCI segment 0
  with INCLUDE_PCI_ALL at the unit's register base; with interrupt
  remapping its device scope names the IOAPIC (enumeration id: the MADT's
  IOAPIC id) at QEMU's pseudo source id 0xff:00.0, the id interrupt
  remapping tables name it by.
- ``prt``: the root bridge's _PRT, one static entry per slot and pin with
  the GSI its INTx reaches (q35: GSIs 16-23; such entries are level-triggered,
  active low, which KVM's and minivmm's IOAPICs take as they take any line).

Nothing here is written through firmware: ``build`` returns (guest-physical
address, bytes) pieces the boot code writes, like mptable.build. With
``-bios`` the firmware's ROM alias covers 0xe0000, and firmware builds its
own tables.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import aml, layout

OEM_ID = b"MINIVM"
OEM_TABLE_ID = b"MINIVMM "
OEM_REVISION = 1
CREATOR_ID = b"MVMM"
CREATOR_REVISION = 1
HEADER_SIZE = 36

# QEMU's PIIX4 PM I/O layout: the control block is minivmm's AcpiPm device.
PM1A_CNT = layout.PORT_ACPI_PM1A_CNT
PM_BASE = PM1A_CNT - 4
PM1A_EVT = PM_BASE  # PM1 status (2 bytes) and enable (2 bytes)
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR = PM_BASE + 8
PM_TMR_LEN = 4
SCI_IRQ = 9
SLP_TYP_SHIFT = 10
S3_PACKAGE = (1, 1, 0, 0)  # QEMU's PIIX: SLP_TYP 1
S5_PACKAGE = (0, 0, 0, 0)  # QEMU's PIIX: SLP_TYP 0
I8042_PULSE_RESET = 0xFE

FADT_REVISION, FADT_MINOR_REVISION, FADT_SIZE = 6, 0, 276
FACS_SIZE, FACS_VERSION = 64, 2
MADT_REVISION = 3  # ACPI 5/6 MADT (same entries as revision 1 for these types)
DSDT_REVISION = 2  # 64-bit AML integers

# FADT fixed feature flags (ACPI 5.2.9.3)
F_WBINVD = 1 << 0
F_PROC_C1 = 1 << 2
F_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
F_RTC_S4 = 1 << 7
F_RESET_REG_SUP = 1 << 10
F_USE_PLATFORM_CLOCK = 1 << 15
F_FORCE_APIC_CLUSTER_MODEL = 1 << 18  # flat logical mode reaches 8 CPUs only
# IA-PC boot architecture flags (ACPI 5.2.9.3)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2

# GAS address space ids
SPACE_SYSTEM_IO = 1

# MADT
MADT_PCAT_COMPAT = 1  # dual 8259s present
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1
ISO_ACTIVE_HIGH, ISO_LEVEL = 0x1, 0xC
ISO_LEVEL_HIGH = ISO_ACTIVE_HIGH | ISO_LEVEL
ISA_OVERRIDES = ((0, 2, 0),) + tuple((irq, irq, ISO_LEVEL_HIGH) for irq in (5, 9, 10, 11))  # (IRQ, GSI, flags)
ALL_PROCESSORS = 0xFF

# MCFG (PCI Firmware Specification 3.0, 4.1.2)
MCFG_REVISION = 1
MCFG_BUS_SIZE = 1 << 20  # each bus's share of the ECAM window

# DMAR (Intel VT-d 8.1)
DMAR_REVISION = 1
DMAR_HOST_ADDRESS_WIDTH = 48  # the IOMMU's MGAW
DMAR_INTR_REMAP = 0x1
DMAR_DRHD, DRHD_INCLUDE_PCI_ALL = 0, 0x1
SCOPE_IOAPIC = 3
IOAPIC_SOURCE_BUS, IOAPIC_SOURCE_DEVFN = 0xFF, 0x00  # QEMU's Q35_PSEUDO_BUS_PLATFORM, Q35_PSEUDO_DEVFN_IOAPIC

PVPANIC_HID = "QEMU0001"
FW_CFG_HID = "QEMU0002"
PCI_CONFIG_PORT, PCI_CONFIG_PORTS = 0xCF8, 8


@dataclass(frozen=True)
class AcpiConfig:
    """The machine the tables describe.

    ``serial``: indices into layout.COM_PORTS of the COM ports present (0 is
    COM1). ``pvpanic_port``: the pvpanic device's port, or None.
    ``fw_cfg_port``: fw_cfg's base port (its 12-byte DMA range), or None.
    ``reset``: (port, value) of the FADT reset register.
    ``mcfg``: (base, size) of the ECAM window, or None (no PCI Express).
    ``prt``: (slot, pin 0-3 for INTA-INTD, GSI) of the root bridge's _PRT, or none.
    ``dmar``: (register base, interrupt remapping) of the VT-d unit, or None (no DMAR table).
    """

    ncpus: int
    serial: tuple[int, ...] = ()
    pvpanic_port: int | None = None
    fw_cfg_port: int | None = None
    pci: bool = False
    pm_timer: bool = False  # minivmm has no PM timer at 0x608 yet
    s3: bool = True
    reset: tuple[int, int] = (layout.PORT_I8042_CMD, I8042_PULSE_RESET)
    mcfg: tuple[int, int] | None = None
    prt: tuple[tuple[int, int, int], ...] = ()
    dmar: tuple[int, bool] | None = None
    rsdp_addr: int = layout.ACPI_RSDP_ADDR
    tables_addr: int = layout.ACPI_TABLES_ADDR
    tables_end: int = layout.ACPI_TABLES_END

    def __post_init__(self) -> None:
        if not 1 <= self.ncpus <= layout.MP_MAX_CPUS:
            raise ValueError(f"ACPI tables describe 1 to {layout.MP_MAX_CPUS} CPUs, not ncpus={self.ncpus}")
        if len(set(self.serial)) != len(self.serial) or any(not 0 <= i < len(layout.COM_PORTS) for i in self.serial):
            raise ValueError(f"serial={self.serial!r}: each must be a distinct COM port index 0-3")
        for what, port in (("pvpanic_port", self.pvpanic_port), ("fw_cfg_port", self.fw_cfg_port)):
            if port is not None and not 0 <= port <= 0xFFFF - 12:
                raise ValueError(f"{what}={port:#x} is not an I/O port")
        if not (0 <= self.reset[0] <= 0xFFFF and 0 <= self.reset[1] <= 0xFF):
            raise ValueError(f"reset={self.reset!r}: a port and a byte value")
        if self.rsdp_addr % 16 or not 0xE0000 <= self.rsdp_addr <= 0x100000 - 36:
            raise ValueError(f"rsdp_addr={self.rsdp_addr:#x}: must be 16-byte aligned in 0xe0000-0xfffff")
        if self.tables_addr % 64 or not self.tables_addr < self.tables_end <= 1 << 32:
            raise ValueError(
                f"tables_addr={self.tables_addr:#x}, tables_end={self.tables_end:#x}: "
                "a 64-byte aligned window below 4 GiB"
            )
        if self.mcfg is not None:
            base, size = self.mcfg
            if base % MCFG_BUS_SIZE or size % MCFG_BUS_SIZE or not 1 <= size // MCFG_BUS_SIZE <= 256:
                raise ValueError(f"mcfg=({base:#x}, {size:#x}): a 1 MiB aligned window of 1 to 256 buses")
            if base + size > 1 << 32:
                raise ValueError(f"mcfg=({base:#x}, {size:#x}): the window must end below 4 GiB (DRAC's DWordMemory)")
            if not self.pci:
                raise ValueError("mcfg needs pci=True: ECAM belongs to the PCI root bridge")
        for entry in self.prt:
            slot, pin, gsi = entry
            if not (0 <= slot < 32 and 0 <= pin < 4 and 0 <= gsi <= 0xFFFFFFFF):
                raise ValueError(f"prt entry {entry!r}: (slot 0-31, pin 0-3, GSI)")
        if len(self.prt) > 255:
            raise ValueError(f"prt: {len(self.prt)} entries, a Package holds at most 255")
        if self.prt and not self.pci:
            raise ValueError("prt needs pci=True: it is the PCI root bridge's")
        if self.dmar is not None and (self.mcfg is None or self.dmar[0] % 4096 or not 0 < self.dmar[0] < 1 << 64):
            raise ValueError(f"dmar={self.dmar!r}: a page-aligned register base, on a PCI Express machine (mcfg)")
        if self.tables_addr < self.rsdp_addr + 36 and self.rsdp_addr < self.tables_end:
            raise ValueError(f"rsdp_addr={self.rsdp_addr:#x} overlaps the table window at {self.tables_addr:#x}")


@dataclass
class AcpiTables:
    """The tables as built: name -> (guest-physical address, bytes)."""

    rsdp: tuple[int, bytes]
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def pieces(self) -> list[tuple[int, bytes]]:
        return [self.rsdp, *self.tables.values()]

    def end(self) -> int:
        """The first byte after the last table."""
        return max(addr + len(data) for addr, data in self.tables.values())


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] = 0
    out[at] = checksum(out)
    return bytes(out)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header, then ``body``; checksum at byte 9."""
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        HEADER_SIZE + len(body),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    return _with_checksum(header + body, 9)


def gas(space: int, bit_width: int, address: int, access_size: int = 0) -> bytes:
    """A Generic Address Structure (12 bytes); an absent register is all zeros."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """RSDP revision 2: the checksum covers the first 20 bytes, the extended checksum all 36."""
    raw = struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, 36, xsdt_addr, 0, bytes(3))
    raw = _with_checksum(raw[:20], 8) + raw[20:]
    return _with_checksum(raw, 32)


def rsdt(addrs: list[int]) -> bytes:
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in addrs))


def xsdt(addrs: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addrs))


def facs() -> bytes:
    """FACS: no checksum; the waking vectors start at 0 (the OS sets them before S3)."""
    raw = struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, bytes(3), 0, bytes(24))
    assert len(raw) == FACS_SIZE
    return raw


def fadt(cfg: AcpiConfig, facs_addr: int, dsdt_addr: int) -> bytes:
    flags = F_WBINVD | F_PROC_C1 | F_SLP_BUTTON | F_RTC_S4 | F_RESET_REG_SUP | F_USE_PLATFORM_CLOCK
    if cfg.ncpus > 8:
        flags |= F_FORCE_APIC_CLUSTER_MODEL
    tmr, tmr_len = (PM_TMR, PM_TMR_LEN) if cfg.pm_timer else (0, 0)
    reset_port, reset_value = cfg.reset
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        facs_addr,  # FIRMWARE_CTRL
        dsdt_addr,  # DSDT
        0,  # reserved (INT_MODEL in ACPI 1.0)
        0,  # Preferred_PM_Profile: unspecified
        SCI_IRQ,
        0,  # SMI_CMD: none, the machine is always in ACPI mode
        0,  # ACPI_ENABLE
        0,  # ACPI_DISABLE
        0,  # S4BIOS_REQ
        0,  # PSTATE_CNT
        PM1A_EVT,
        0,  # PM1b_EVT_BLK
        PM1A_CNT,
        0,  # PM1b_CNT_BLK
        0,  # PM2_CNT_BLK
        tmr,
        0,  # GPE0_BLK: no general-purpose events
        0,  # GPE1_BLK
        PM1_EVT_LEN,
        PM1_CNT_LEN,
        0,  # PM2_CNT_LEN
        tmr_len,
        0,  # GPE0_BLK_LEN
        0,  # GPE1_BLK_LEN
        0,  # GPE1_BASE
        0,  # CST_CNT
        0xFFF,  # P_LVL2_LAT: > 100, C2 not supported
        0xFFF,  # P_LVL3_LAT: > 1000, C3 not supported
        0,  # FLUSH_SIZE
        0,  # FLUSH_STRIDE
        0,  # DUTY_OFFSET
        0,  # DUTY_WIDTH
        0,  # DAY_ALRM
        0,  # MON_ALRM
        0x32,  # CENTURY: the CMOS RTC's century register
        BOOT_LEGACY_DEVICES | BOOT_8042 | BOOT_VGA_NOT_PRESENT,  # IAPC_BOOT_ARCH
        0,  # reserved
        flags,
    )
    body += gas(SPACE_SYSTEM_IO, 8, reset_port, access_size=1)  # RESET_REG
    body += struct.pack("<BHB", reset_value, 0, FADT_MINOR_REVISION)  # RESET_VALUE, ARM_BOOT_ARCH, minor version
    body += struct.pack("<QQ", facs_addr, dsdt_addr)  # X_FIRMWARE_CTRL, X_DSDT
    body += gas(SPACE_SYSTEM_IO, 8 * PM1_EVT_LEN, PM1A_EVT)  # X_PM1a_EVT_BLK
    body += bytes(12)  # X_PM1b_EVT_BLK
    body += gas(SPACE_SYSTEM_IO, 8 * PM1_CNT_LEN, PM1A_CNT)  # X_PM1a_CNT_BLK
    body += bytes(12) * 2  # X_PM1b_CNT_BLK, X_PM2_CNT_BLK
    body += gas(SPACE_SYSTEM_IO, 8 * tmr_len, tmr) if cfg.pm_timer else bytes(12)  # X_PM_TMR_BLK
    body += bytes(12) * 2  # X_GPE0_BLK, X_GPE1_BLK
    body += bytes(12) * 2  # SLEEP_CONTROL_REG, SLEEP_STATUS_REG: hardware-reduced ACPI only
    body += bytes(8)  # hypervisor vendor identity
    table = sdt(b"FACP", FADT_REVISION, body)
    assert len(table) == FADT_SIZE, len(table)
    return table


def madt(ncpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for i in range(ncpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED)  # ACPI processor UID, APIC id
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, ncpus, 0, layout.IOAPIC_ADDR, 0)
    for irq, gsi, flags in ISA_OVERRIDES:
        body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, irq, gsi, flags)  # bus 0: ISA
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 1)  # LINT1, flags: conforming
    return sdt(b"APIC", MADT_REVISION, body)


def mcfg(base: int, size: int) -> bytes:
    """MCFG: 8 reserved bytes, then one allocation: base, PCI segment 0, first and last bus."""
    last_bus = size // MCFG_BUS_SIZE - 1
    body = bytes(8) + struct.pack("<QHBBI", base, 0, 0, last_bus, 0)
    return sdt(b"MCFG", MCFG_REVISION, body)


def dmar(base: int, intremap: bool, ioapic_id: int) -> bytes:
    """DMAR: host address width, flags, 10 reserved bytes, then the one DRHD (with the IOAPIC's
    scope when interrupts are remapped: type, length, 2 reserved, enumeration id, bus, path)."""
    scope = b""
    if intremap:
        scope = struct.pack("<BBHBBBB", SCOPE_IOAPIC, 8, 0, ioapic_id, IOAPIC_SOURCE_BUS, IOAPIC_SOURCE_DEVFN >> 3, 0)
    drhd = struct.pack("<HHBBHQ", DMAR_DRHD, 16 + len(scope), DRHD_INCLUDE_PCI_ALL, 0, 0, base) + scope
    flags = DMAR_INTR_REMAP if intremap else 0
    return sdt(b"DMAR", DMAR_REVISION, struct.pack("<BB", DMAR_HOST_ADDRESS_WIDTH - 1, flags) + bytes(10) + drhd)


def _sta_present() -> bytes:
    return aml.method("_STA", 0, aml.return_(0x0F))  # present, enabled, shown, functioning


def dsdt_aml(cfg: AcpiConfig) -> bytes:
    """The DSDT's AML body (the definition block without its header)."""
    devices = []
    if cfg.pci:
        ids = [aml.name("_HID", aml.eisa_id("PNP0A03"))]
        if cfg.mcfg is not None:  # a PCI Express root: PCI Express aware OSes use ECAM, others still find PCI
            ids = [aml.name("_HID", aml.eisa_id("PNP0A08")), aml.name("_CID", aml.eisa_id("PNP0A03"))]
        prt = []
        if cfg.prt:
            entries = [aml.package(slot << 16 | 0xFFFF, pin, 0, gsi) for slot, pin, gsi in cfg.prt]
            prt = [aml.name("_PRT", aml.package(*entries))]
        devices.append(
            aml.device(
                "PCI0",
                *ids,
                aml.name("_UID", 0),
                aml.name("_BBN", 0),
                aml.name(
                    "_CRS",
                    aml.resource_template(
                        aml.word_bus_number(0, 0xFF),
                        aml.io(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS),
                    ),
                ),
                *prt,
            )
        )
    if cfg.mcfg is not None:
        base, size = cfg.mcfg
        devices.append(
            aml.device(
                "DRAC",
                aml.name("_HID", aml.eisa_id("PNP0C01")),
                aml.name("_CRS", aml.resource_template(aml.dword_memory(base, size))),
            )
        )
    for index in sorted(cfg.serial):
        port, irq = layout.COM_PORTS[index]
        devices.append(
            aml.device(
                f"COM{index + 1}",
                aml.name("_HID", aml.eisa_id("PNP0501")),
                aml.name("_UID", index + 1),
                _sta_present(),
                aml.name("_CRS", aml.resource_template(aml.io(port, port, 0, 8), aml.irq_no_flags(irq))),
            )
        )
    if cfg.pvpanic_port is not None:
        p = cfg.pvpanic_port
        devices.append(
            aml.device(
                "PEVT",
                aml.name("_HID", PVPANIC_HID),
                _sta_present(),
                aml.name("_CRS", aml.resource_template(aml.io(p, p, 1, 1))),
            )
        )
    if cfg.fw_cfg_port is not None:
        p = cfg.fw_cfg_port
        devices.append(
            aml.device(
                "FWCF",
                aml.name("_HID", FW_CFG_HID),
                aml.name("_STA", 0x0B),  # present, enabled, functioning, not shown in UI (as QEMU)
                aml.name("_CRS", aml.resource_template(aml.io(p, p, 1, layout.FW_CFG_PORTS_SIZE))),
            )
        )
    terms = [aml.scope("\\_SB", *devices)]
    if cfg.s3:
        terms.append(aml.name("\\_S3", aml.package(*S3_PACKAGE)))
    terms.append(aml.name("\\_S5", aml.package(*S5_PACKAGE)))
    return b"".join(terms)


def dsdt(cfg: AcpiConfig) -> bytes:
    return sdt(b"DSDT", DSDT_REVISION, dsdt_aml(cfg))


def _align(addr: int, to: int) -> int:
    return (addr + to - 1) & -to


def build_tables(cfg: AcpiConfig) -> AcpiTables:
    """Lay the tables out in the window: FACS (64-byte aligned) first, then DSDT, FADT, MADT, MCFG (with
    ECAM), DMAR (with an IOMMU), RSDT, XSDT."""
    tables: dict[str, tuple[int, bytes]] = {}
    at = cfg.tables_addr

    def place(name: str, data: bytes, align: int = 16) -> int:
        nonlocal at
        addr = _align(at, align)
        tables[name] = (addr, data)
        at = addr + len(data)
        return addr

    facs_addr = place("FACS", facs(), 64)
    dsdt_addr = place("DSDT", dsdt(cfg))
    fadt_addr = place("FACP", fadt(cfg, facs_addr, dsdt_addr))
    madt_addr = place("APIC", madt(cfg.ncpus))
    listed = [fadt_addr, madt_addr]
    if cfg.mcfg is not None:
        listed.append(place("MCFG", mcfg(*cfg.mcfg)))
    if cfg.dmar is not None:
        listed.append(place("DMAR", dmar(*cfg.dmar, ioapic_id=cfg.ncpus)))  # the MADT's IOAPIC id
    # The RSDT and XSDT sizes are known before they are built, so both can be placed now.
    rsdt_addr = place("RSDT", rsdt(listed))
    xsdt_addr = place("XSDT", xsdt(listed))
    if at > cfg.tables_end:
        raise ValueError(f"ACPI tables for {cfg.ncpus} CPUs end at {at:#x}, past the window's end {cfg.tables_end:#x}")
    return AcpiTables((cfg.rsdp_addr, rsdp(rsdt_addr, xsdt_addr)), tables)


def build(cfg: AcpiConfig) -> list[tuple[int, bytes]]:
    """(guest-physical address, bytes): the RSDP and every table."""
    return build_tables(cfg).pieces()

"""The ACPI tables as a guest finds them: the RSDP by scanning 0xe0000-0xfffff
on 16-byte boundaries (Linux, kvm-unit-tests), every table through its
pointers, checksums and lengths, the FADT's registers, the MADT's entries,
and the DSDT's AML read back by a small reader here (and by ``iasl -d`` when
acpica-tools is installed). No VM is started."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from minivmm.arch.x86 import acpi, aml, layout, mptable
from minivmm.arch.x86.machine_types import Q35
from minivmm.devices import q35
from minivmm.devices.acpi_pm import AcpiPm

LOW, HIGH = 0xE0000, 0x100000
FULL = dict(serial=(0, 1, 2, 3), pvpanic_port=0x505, fw_cfg_port=layout.PORT_FW_CFG, pci=True)
Q35_PRT = tuple((slot, pin - 1, q35.pirq_gsi(slot, pin)) for slot in range(32) for pin in range(1, 5))
Q35_FULL = dict(FULL, mcfg=Q35.ecam, prt=Q35_PRT)  # what the q35 machine describes


class Memory:
    """The BIOS area as a guest sees it after the pieces are written."""

    def __init__(self, pieces: list[tuple[int, bytes]]) -> None:
        self.buf = bytearray(HIGH - LOW)
        for addr, data in pieces:
            assert LOW <= addr <= HIGH - len(data), f"{addr:#x}+{len(data)} outside the BIOS area"
            self.buf[addr - LOW : addr - LOW + len(data)] = data

    def __call__(self, addr: int, n: int) -> bytes:
        assert LOW <= addr <= HIGH - n, f"{addr:#x}+{n} outside the BIOS area"
        return bytes(self.buf[addr - LOW : addr - LOW + n])


def find_rsdp(mem: Memory) -> int:
    for addr in range(LOW, HIGH, 16):
        if mem(addr, 8) == b"RSD PTR ":
            return addr
    raise AssertionError("no RSDP in 0xe0000-0xfffff")


def table(mem: Memory, addr: int) -> tuple[bytes, bytes]:
    """(signature, whole table), after checking the header's length and checksum."""
    sig, length = struct.unpack("<4sI", mem(addr, 8))
    data = mem(addr, length)
    assert sum(data) % 256 == 0, f"{sig!r} at {addr:#x}: checksum"
    return sig, data


class Guest:
    """The tables followed from the RSDP, as an OS does."""

    def __init__(self, cfg: acpi.AcpiConfig) -> None:
        self.cfg = cfg
        self.built = acpi.build_tables(cfg)
        self.mem = Memory(acpi.build(cfg))
        self.rsdp_addr = find_rsdp(self.mem)
        self.rsdp = self.mem(self.rsdp_addr, 36)
        _, _, _, rev, self.rsdt_addr, length, self.xsdt_addr = struct.unpack("<8sB6sBIIQ", self.rsdp[:32])
        assert rev == 2 and length == 36
        sig, rsdt = table(self.mem, self.rsdt_addr)
        assert sig == b"RSDT"
        self.rsdt_entries = list(struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:]))
        sig, xsdt = table(self.mem, self.xsdt_addr)
        assert sig == b"XSDT"
        self.xsdt_entries = list(struct.unpack(f"<{(len(xsdt) - 36) // 8}Q", xsdt[36:]))
        self.tables = {}
        for addr in self.xsdt_entries:
            sig, data = table(self.mem, addr)
            self.tables[sig] = (addr, data)
        fadt = self.tables[b"FACP"][1]
        self.facs_addr, self.dsdt_addr = struct.unpack_from("<II", fadt, 36)
        self.x_facs_addr, self.x_dsdt_addr = struct.unpack_from("<QQ", fadt, 132)
        sig, self.dsdt = table(self.mem, self.x_dsdt_addr)
        assert sig == b"DSDT"
        self.facs = self.mem(self.x_facs_addr, 64)


@pytest.fixture(params=[1, 2, 8, 9, layout.MP_MAX_CPUS], ids=lambda n: f"{n}cpu")
def guest(request) -> Guest:
    return Guest(acpi.AcpiConfig(ncpus=request.param, **FULL))


# --- RSDP, RSDT, XSDT ------------------------------------------------------------------------------


def test_rsdp_is_where_guests_scan_with_both_checksums(guest):
    assert guest.rsdp_addr == layout.ACPI_RSDP_ADDR
    assert guest.rsdp_addr % 16 == 0
    assert sum(guest.rsdp[:20]) % 256 == 0, "ACPI 1.0 checksum (first 20 bytes)"
    assert sum(guest.rsdp) % 256 == 0, "extended checksum (36 bytes)"
    assert guest.rsdp[9:15] == acpi.OEM_ID


def test_rsdt_and_xsdt_list_the_same_tables(guest):
    assert guest.rsdt_entries == guest.xsdt_entries
    assert sorted(guest.tables) == [b"APIC", b"FACP"]
    assert guest.rsdt_addr < 1 << 32 and guest.xsdt_addr < 1 << 32


def test_every_table_has_its_length_and_checksum(guest):
    for name, (addr, data) in guest.built.tables.items():
        length = struct.unpack_from("<I", data, 4)[0]
        assert length == len(data), name
        if name != "FACS":  # the FACS has no checksum
            assert sum(data) % 256 == 0, name
            assert data[:4] == name.encode()
        assert addr % (64 if name == "FACS" else 16) == 0, name


def test_tables_do_not_overlap(guest):
    ranges = sorted((addr, addr + len(data)) for addr, data in guest.built.pieces())
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start


# --- FADT and FACS -----------------------------------------------------------------------------------


def gas(data: bytes, at: int) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("<BBBBQ", data, at)


def test_fadt_points_at_facs_and_dsdt_in_both_widths(guest):
    addr, fadt = guest.tables[b"FACP"]
    assert len(fadt) == acpi.FADT_SIZE == 276 and fadt[8] == 6
    assert guest.facs_addr == guest.x_facs_addr == guest.built.tables["FACS"][0]
    assert guest.dsdt_addr == guest.x_dsdt_addr == guest.built.tables["DSDT"][0]
    assert guest.facs_addr % 64 == 0


def test_fadt_pm_registers_are_qemus_piix4_layout(guest):
    fadt = guest.tables[b"FACP"][1]
    (sci,) = struct.unpack_from("<H", fadt, 46)
    (smi_cmd,) = struct.unpack_from("<I", fadt, 48)
    pm1a_evt, pm1b_evt, pm1a_cnt, _, _, pm_tmr, gpe0, gpe1 = struct.unpack_from("<8I", fadt, 56)
    evt_len, cnt_len, pm2_len, tmr_len = fadt[88:92]
    assert sci == 9 and smi_cmd == 0
    assert (pm1a_evt, evt_len) == (0x600, 4)
    assert (pm1a_cnt, cnt_len) == (layout.PORT_ACPI_PM1A_CNT, 2) == (0x604, 2)
    assert pm1b_evt == 0 and pm2_len == 0 and gpe0 == gpe1 == 0
    assert (pm_tmr, tmr_len) == (0, 0), "no PM timer unless the machine has one"
    assert gas(fadt, 148) == (acpi.SPACE_SYSTEM_IO, 32, 0, 0, 0x600)  # X_PM1a_EVT_BLK
    assert gas(fadt, 172) == (acpi.SPACE_SYSTEM_IO, 16, 0, 0, 0x604)  # X_PM1a_CNT_BLK
    assert gas(fadt, 208) == (0, 0, 0, 0, 0)  # X_PM_TMR_BLK
    assert fadt[108] == 0x32  # CENTURY: the RTC's century register


def test_fadt_pm_timer_when_present():
    fadt = Guest(acpi.AcpiConfig(ncpus=1, pm_timer=True)).tables[b"FACP"][1]
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608 and fadt[91] == 4
    assert gas(fadt, 208) == (acpi.SPACE_SYSTEM_IO, 32, 0, 0, 0x608)


def test_fadt_reset_register_and_flags(guest):
    fadt = guest.tables[b"FACP"][1]
    (flags,) = struct.unpack_from("<I", fadt, 112)
    (boot,) = struct.unpack_from("<H", fadt, 109)
    assert flags & acpi.F_RESET_REG_SUP
    assert gas(fadt, 116) == (acpi.SPACE_SYSTEM_IO, 8, 0, 1, layout.PORT_I8042_CMD)
    assert fadt[128] == 0xFE  # the i8042's pulse-reset command
    assert boot & acpi.BOOT_8042 and boot & acpi.BOOT_LEGACY_DEVICES
    assert not flags & (1 << 20), "not hardware-reduced: the PM1 blocks are used"
    assert bool(flags & acpi.F_FORCE_APIC_CLUSTER_MODEL) == (guest.cfg.ncpus > 8)


def test_fadt_reset_register_can_be_the_pci_reset_control():
    fadt = Guest(acpi.AcpiConfig(ncpus=1, reset=(0xCF9, 0x06))).tables[b"FACP"][1]
    assert gas(fadt, 116)[4] == 0xCF9 and fadt[128] == 0x06


def test_facs_has_the_waking_vectors(guest):
    facs = guest.facs
    sig, length, _hw, waking, _lock, _flags, x_waking, version = struct.unpack_from("<4sIIIIIQB", facs)
    assert (sig, length, version) == (b"FACS", 64, 2)
    assert waking == 0 and x_waking == 0  # the OS writes them before S3


# --- MADT ----------------------------------------------------------------------------------------------


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 44
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        assert length >= 2 and at + length <= len(madt), f"MADT entry at {at}: length {length}"
        out.append((kind, madt[at : at + length]))
        at += length
    assert at == len(madt)
    return out


def test_madt_cpus_ioapic_overrides_nmi(guest):
    n = guest.cfg.ncpus
    madt = guest.tables[b"APIC"][1]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.LAPIC_ADDR and flags & 1
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == acpi.MADT_LAPIC]
    assert [(uid, apic_id) for _, _, uid, apic_id, _ in lapics] == [(i, i) for i in range(n)]
    assert all(f & 1 for *_, f in lapics), "every processor enabled"
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == acpi.MADT_IOAPIC]
    assert ioapics == [(1, 12, n, 0, layout.IOAPIC_ADDR, 0)]
    overrides = {
        src: (gsi, fl) for _, _, bus, src, gsi, fl in (struct.unpack("<BBBBIH", e) for k, e in entries if k == 2)
    }
    assert overrides == {0: (2, 0), 5: (5, 0xD), 9: (9, 0xD), 10: (10, 0xD), 11: (11, 0xD)}
    nmis = [struct.unpack("<BBBHB", e) for k, e in entries if k == acpi.MADT_LAPIC_NMI]
    assert nmis == [(4, 6, 0xFF, 0, 1)]
    assert {k for k, _ in entries} == {0, 1, 2, 4}


def test_madt_ioapic_id_matches_the_mp_table():
    """Both tables give the IOAPIC the id after the CPUs."""
    for n in (1, 3, layout.MP_MAX_CPUS):
        madt = Guest(acpi.AcpiConfig(ncpus=n)).tables[b"APIC"][1]
        (ioapic,) = [e for k, e in madt_entries(madt) if k == 1]
        mp = dict(mptable.build(n, 0, 0))[layout.MP_CONFIG_ADDR]
        at = 44 + 20 * n + 8  # processor entries, the bus entry, then the IOAPIC
        assert mp[at] == 2 and ioapic[2] == mp[at + 1] == n


# --- DSDT: a small AML reader ----------------------------------------------------------------------------


class AmlReader:
    """Reads the AML terms the encoder emits into {absolute path: value}.

    Devices read as "Device", Methods as ("Method", nargs, returned value),
    Packages as lists, Buffers as bytes, strings as str.
    """

    def __init__(self, data: bytes) -> None:
        self.d = data
        self.ns: dict[str, object] = {}
        self.terms(0, len(data), "\\")

    def pkg(self, pos: int) -> tuple[int, int]:
        """(end of the package, position after the PkgLength)."""
        lead = self.d[pos]
        follow = lead >> 6
        if follow == 0:
            return pos + (lead & 0x3F), pos + 1
        assert not lead & 0x30, "reserved PkgLength bits set"
        length = (lead & 0x0F) | int.from_bytes(self.d[pos + 1 : pos + 1 + follow], "little") << 4
        return pos + length, pos + 1 + follow

    def name(self, pos: int, scope: str) -> tuple[str, int]:
        d = self.d
        prefix = ""
        if d[pos] == 0x5C:
            prefix, pos = "\\", pos + 1
        while d[pos] == 0x5E:
            prefix, pos = prefix + "^", pos + 1
        if d[pos] == 0x00:
            count, pos = 0, pos + 1
        elif d[pos] == 0x2E:
            count, pos = 2, pos + 1
        elif d[pos] == 0x2F:
            count, pos = d[pos + 1], pos + 2
        else:
            count = 1
        segs = [d[pos + 4 * i : pos + 4 * i + 4].decode() for i in range(count)]
        pos += 4 * count
        if prefix.startswith("\\"):
            return "\\" + ".".join(segs), pos
        base = scope.rstrip(".").split(".") if scope != "\\" else []
        base = base[: len(base) - prefix.count("^")] if prefix else base
        path = ".".join([*(b.lstrip("\\") for b in base), *segs])
        return "\\" + path, pos

    def data(self, pos: int) -> tuple[object, int]:
        d = self.d
        op = d[pos]
        if op in (0x00, 0x01):
            return op, pos + 1
        if op == 0xFF:
            return (1 << 64) - 1, pos + 1
        sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
        if op in sizes:
            n = sizes[op]
            return int.from_bytes(d[pos + 1 : pos + 1 + n], "little"), pos + 1 + n
        if op == 0x0D:
            end = d.index(0, pos + 1)
            return d[pos + 1 : end].decode("ascii"), end + 1
        if op == 0x12:
            end, p = self.pkg(pos + 1)
            count, p = d[p], p + 1
            items = []
            while p < end:
                item, p = self.data(p)
                items.append(item)
            assert p == end and len(items) == count
            return items, end
        if op == 0x11:
            end, p = self.pkg(pos + 1)
            size, p = self.data(p)
            assert end - p == size, "Buffer size term"
            return bytes(d[p:end]), end
        raise AssertionError(f"unexpected AML data opcode {op:#x} at {pos}")

    def terms(self, pos: int, end: int, scope: str) -> None:
        d = self.d
        while pos < end:
            op = d[pos]
            if op == 0x08:  # Name
                path, p = self.name(pos + 1, scope)
                self.ns[path], pos = self.data(p)
            elif op == 0x10:  # Scope
                stop, p = self.pkg(pos + 1)
                path, p = self.name(p, scope)
                self.terms(p, stop, path)
                pos = stop
            elif op == 0x5B and d[pos + 1] == 0x82:  # Device
                stop, p = self.pkg(pos + 2)
                path, p = self.name(p, scope)
                self.ns[path] = "Device"
                self.terms(p, stop, path)
                pos = stop
            elif op == 0x14:  # Method: a body of one Return
                stop, p = self.pkg(pos + 1)
                path, p = self.name(p, scope)
                flags, p = d[p], p + 1
                assert d[p] == 0xA4, f"{path}: a Method body of one Return"
                value, p = self.data(p + 1)
                assert p == stop
                self.ns[path] = ("Method", flags & 7, value)
                pos = stop
            else:
                raise AssertionError(f"unexpected AML opcode {op:#x} at {pos}")
        assert pos == end, "a term ran past its package"


def resources(buf: bytes) -> list[tuple]:
    """Resource descriptors: ("io", min, max, align, len), ("irq", [irqs]), ("bus", min, max),
    ("mem", min, length, read-write); up to the End Tag."""
    out, at = [], 0
    while True:
        tag = buf[at]
        if tag & 0x80:
            kind, length = tag, struct.unpack_from("<H", buf, at + 1)[0]
            body = buf[at + 3 : at + 3 + length]
            if kind == 0x87:  # DWordMemory
                rtype, flags, tflags, _, lo, hi, _, size = struct.unpack("<BBBIIIII", body)
                assert rtype == 0 and flags == 0x0C and hi == lo + size - 1
                out.append(("mem", lo, size, bool(tflags & 1)))
                at += 3 + length
                continue
            assert kind == 0x88 and body[0] == 2, "only a WordBusNumber or a DWordMemory is expected"
            _, _, _, _, lo, hi, _, count = struct.unpack("<BBBHHHHH", body)
            assert count == hi - lo + 1
            out.append(("bus", lo, hi))
            at += 3 + length
            continue
        kind, length = (tag >> 3) & 0xF, tag & 7
        body = buf[at + 1 : at + 1 + length]
        if kind == 0xF:
            assert at + 2 == len(buf), "the End Tag ends the template"
            return out
        if kind == 0x8:
            _, lo, hi, align, n = struct.unpack("<BHHBB", body)
            out.append(("io", lo, hi, align, n))
        elif kind == 0x4:
            (mask,) = struct.unpack_from("<H", body)
            out.append(("irq", [i for i in range(16) if mask >> i & 1]))
        else:
            raise AssertionError(f"unexpected resource descriptor {tag:#x}")
        at += 1 + length


def dsdt_namespace(cfg: acpi.AcpiConfig) -> dict[str, object]:
    data = Guest(cfg).dsdt
    assert data[:4] == b"DSDT" and data[8] == 2
    return AmlReader(data[36:]).ns


def test_dsdt_sleep_states(guest):
    ns = AmlReader(guest.dsdt[36:]).ns
    assert ns["\\_S5_"] == [0, 0, 0, 0]
    assert ns["\\_S3_"] == [1, 1, 0, 0]


def test_dsdt_without_s3():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1, s3=False))
    assert "\\_S3_" not in ns and ns["\\_S5_"] == [0, 0, 0, 0]


def test_s5_slp_typ_written_to_pm1a_cnt_powers_off():
    """What an OS does with \\_S5 and the FADT: SLP_TYP << 10 | SLP_EN to PM1a_CNT, which AcpiPm takes as off."""
    g = Guest(acpi.AcpiConfig(ncpus=1))
    slp_typ = AmlReader(g.dsdt[36:]).ns["\\_S5_"][0]
    pm1a_cnt = struct.unpack_from("<I", g.tables[b"FACP"][1], 64)[0]
    calls = []
    pm = AcpiPm(lambda: calls.append("off"))
    pm.write(pm1a_cnt - layout.PORT_ACPI_PM1A_CNT, 2, slp_typ << acpi.SLP_TYP_SHIFT | 1 << 13)
    assert calls == ["off"]


def test_dsdt_com_ports_with_their_resources():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=2, serial=(0, 1, 2, 3)))
    for i, (port, irq) in enumerate(layout.COM_PORTS):
        dev = f"\\_SB_.COM{i + 1}"
        assert ns[dev] == "Device"
        assert ns[f"{dev}._HID"] == aml.eisa_id("PNP0501") == 0x0105D041
        assert ns[f"{dev}._UID"] == i + 1
        assert ns[f"{dev}._STA"] == ("Method", 0, 0x0F)
        assert resources(ns[f"{dev}._CRS"]) == [("io", port, port, 0, 8), ("irq", [irq])]


def test_dsdt_only_the_present_devices():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1, serial=(1,)))
    devices = sorted(k for k, v in ns.items() if v == "Device")
    assert devices == ["\\_SB_.COM2"]
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1))
    assert not [k for k, v in ns.items() if v == "Device"]


def test_dsdt_pvpanic():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1, pvpanic_port=0x505))
    assert ns["\\_SB_.PEVT._HID"] == "QEMU0001"
    assert ns["\\_SB_.PEVT._STA"] == ("Method", 0, 0x0F)
    assert resources(ns["\\_SB_.PEVT._CRS"]) == [("io", 0x505, 0x505, 1, 1)]


def test_dsdt_fw_cfg():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1, fw_cfg_port=0x510))
    assert ns["\\_SB_.FWCF._HID"] == "QEMU0002" and ns["\\_SB_.FWCF._STA"] == 0x0B
    assert resources(ns["\\_SB_.FWCF._CRS"]) == [("io", 0x510, 0x510, 1, 12)]


def test_dsdt_pci_root_bridge_only_with_pci():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1, pci=True))
    assert ns["\\_SB_.PCI0._HID"] == aml.eisa_id("PNP0A03") == 0x030AD041
    assert ns["\\_SB_.PCI0._UID"] == 0 and ns["\\_SB_.PCI0._BBN"] == 0
    assert resources(ns["\\_SB_.PCI0._CRS"]) == [("bus", 0, 0xFF), ("io", 0xCF8, 0xCF8, 1, 8)]
    assert "\\_SB_.PCI0" not in dsdt_namespace(acpi.AcpiConfig(ncpus=1))


def test_mcfg_gives_the_ecam_window_as_qemus_q35():
    g = Guest(acpi.AcpiConfig(ncpus=2, **Q35_FULL))
    assert sorted(g.tables) == [b"APIC", b"FACP", b"MCFG"] and g.rsdt_entries == g.xsdt_entries
    mcfg = g.tables[b"MCFG"][1]
    assert len(mcfg) == 60 and mcfg[8] == 1 and mcfg[36:44] == bytes(8)
    assert struct.unpack_from("<QHBBI", mcfg, 44) == (layout.PCIE_ECAM_BASE, 0, 0, 255, 0)


def test_dsdt_q35_pci_express_root_with_its_routing_table_and_the_ecam_reservation():
    ns = dsdt_namespace(acpi.AcpiConfig(ncpus=1, **Q35_FULL))
    assert ns["\\_SB_.PCI0._HID"] == aml.eisa_id("PNP0A08") and ns["\\_SB_.PCI0._CID"] == aml.eisa_id("PNP0A03")
    prt = ns["\\_SB_.PCI0._PRT"]
    assert len(prt) == 128 and prt[4] == [0x1FFFF, 0, 0, 21]  # slot 1 INTA: PIRQF, GSI 21
    assert [entry[3] for entry in prt[31 * 4 :]] == [16, 17, 18, 19]  # the LPC's slot: PIRQ A-D
    assert ns["\\_SB_.DRAC._HID"] == aml.eisa_id("PNP0C01")  # QEMU's DRAM controller: the OS sees ECAM reserved
    assert resources(ns["\\_SB_.DRAC._CRS"]) == [("mem", layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE, True)]
    pc = dsdt_namespace(acpi.AcpiConfig(ncpus=1, pci=True))
    assert "\\_SB_.PCI0._PRT" not in pc and "\\_SB_.PCI0._CID" not in pc and "\\_SB_.DRAC" not in pc


# --- sizes and the window ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ncpus", [1, 2, layout.MP_MAX_CPUS])
def test_tables_fit_the_window_below_the_mp_table(ncpus):
    built = acpi.build_tables(acpi.AcpiConfig(ncpus=ncpus, **FULL))
    assert layout.ACPI_RSDP_ADDR + 36 <= layout.ACPI_TABLES_ADDR
    for addr, data in built.tables.values():
        assert layout.ACPI_TABLES_ADDR <= addr <= layout.ACPI_TABLES_END - len(data)
    assert built.end() <= layout.ACPI_TABLES_END <= layout.MP_CONFIG_ADDR
    madt = built.tables["APIC"][1]
    assert len(madt) == 44 + 8 * ncpus + 12 + 5 * 10 + 6


def test_the_window_is_scanned_by_guests():
    assert 0xE0000 <= layout.ACPI_RSDP_ADDR < 0x100000 and layout.ACPI_RSDP_ADDR % 16 == 0
    assert layout.ACPI_TABLES_ADDR % 64 == 0
    assert layout.ACPI_TABLES_END <= layout.MP_CONFIG_ADDR


def test_a_window_too_small_is_refused():
    with pytest.raises(ValueError, match="past the window's end"):
        acpi.build_tables(acpi.AcpiConfig(ncpus=254, tables_end=layout.ACPI_TABLES_ADDR + 0x400))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ncpus=0), "ncpus=0"),
        (dict(ncpus=255), "ncpus=255"),
        (dict(ncpus=1, serial=(4,)), "serial="),
        (dict(ncpus=1, serial=(0, 0)), "serial="),
        (dict(ncpus=1, pvpanic_port=0x10000), "pvpanic_port="),
        (dict(ncpus=1, rsdp_addr=0xE0008), "rsdp_addr="),
        (dict(ncpus=1, rsdp_addr=0xD0000), "rsdp_addr="),
        (dict(ncpus=1, tables_addr=0xE0020), "tables_addr="),
        (dict(ncpus=1, tables_addr=0xE0000), "overlaps"),
        (dict(ncpus=1, reset=(0x64, 0x100)), "reset="),
        (dict(ncpus=1, pci=True, mcfg=(0xB0080000, 256 << 20)), "mcfg="),
        (dict(ncpus=1, pci=True, mcfg=(0xB0000000, 512 << 20)), "mcfg="),
        (dict(ncpus=1, mcfg=(0xB0000000, 256 << 20)), "mcfg needs pci=True"),
        (dict(ncpus=1, pci=True, prt=((32, 0, 16),)), "prt entry"),
        (dict(ncpus=1, prt=((1, 0, 16),)), "prt needs pci=True"),
    ],
)
def test_bad_configurations_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        acpi.AcpiConfig(**kwargs)


def test_build_returns_pieces_like_mptable():
    pieces = acpi.build(acpi.AcpiConfig(ncpus=2))
    assert pieces[0] == (layout.ACPI_RSDP_ADDR, acpi.build_tables(acpi.AcpiConfig(ncpus=2)).rsdp[1])
    assert all(isinstance(a, int) and isinstance(d, bytes) for a, d in pieces)
    assert len(pieces) == 7  # RSDP, FACS, DSDT, FADT, MADT, RSDT, XSDT


# --- the AML encoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [0, 1, 62, 63, 64, 4093, 4094, 4095, 0xFFFFC, 0xFFFFD, 0xFFFFFFB])
def test_pkg_length_counts_itself(content):
    enc = aml.pkg_length(content)
    reader = AmlReader.__new__(AmlReader)
    reader.d = enc + bytes(content)
    end, after = reader.pkg(0)
    assert after == len(enc) and end == len(enc) + content
    assert len(enc) == (1 if content <= 62 else 2 if content <= 4093 else 3 if content <= 0xFFFFC else 4)


def test_pkg_length_limits():
    with pytest.raises(ValueError, match="longer than PkgLength"):
        aml.pkg_length(aml.PKG_LENGTH_MAX)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "00"),
        (1, "01"),
        (2, "0a02"),
        (0xFF, "0aff"),
        (0x100, "0b0001"),
        (0xFFFF, "0bffff"),
        (0x10000, "0c00000100"),
        (0xFFFFFFFF, "0cffffffff"),
        (1 << 32, "0e0000000001000000"),
    ],
)
def test_integer_encodings(value, encoded):
    assert aml.integer(value).hex() == encoded
    reader = AmlReader.__new__(AmlReader)
    reader.d = aml.integer(value)
    assert reader.data(0) == (value, len(reader.d))


def test_names_strings_eisa_ids():
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    assert aml.name_string("^^X") == b"^^X___"
    assert aml.string("QEMU0001") == b"\x0dQEMU0001\x00"
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    assert aml.eisa_id("PNP0501") == 0x0105D041
    for bad in ("com1", "1ABC", "ABCDE", ""):
        with pytest.raises(ValueError, match="name segment"):
            aml.name_seg(bad)
    with pytest.raises(ValueError):
        aml.eisa_id("PNP050")
    with pytest.raises(ValueError):
        aml.string("é")
    with pytest.raises(TypeError):
        aml.value(True)


def test_encoded_terms_read_back():
    blob = aml.scope(
        "\\_SB",
        aml.device("DEV0", aml.name("_HID", "ABCD0001"), aml.method("_STA", 0, aml.return_(0x0F))),
        aml.name("BIG", aml.package(*range(100))),
        aml.name("BUF", aml.buffer(bytes(300))),
    )
    ns = AmlReader(blob).ns
    assert ns["\\_SB_.DEV0"] == "Device"
    assert ns["\\_SB_.DEV0._HID"] == "ABCD0001"
    assert ns["\\_SB_.DEV0._STA"] == ("Method", 0, 15)
    assert ns["\\_SB_.BIG_"] == list(range(100))
    assert ns["\\_SB_.BUF_"] == bytes(300)


def test_resource_descriptor_checks():
    assert aml.io(0x3F8, 0x3F8, 0, 8) == bytes.fromhex("4701f803f8030008")
    assert aml.irq_no_flags(4) == bytes.fromhex("221000")
    with pytest.raises(ValueError, match="ISA IRQ"):
        aml.irq_no_flags(16)
    with pytest.raises(ValueError, match="below min"):
        aml.io(0x10, 0x8, 1, 1)


# --- iasl, when installed ---------------------------------------------------------------------------------------

IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
@pytest.mark.parametrize("ncpus", [1, layout.MP_MAX_CPUS])
def test_iasl_disassembles_every_table(tmp_path, ncpus):
    built = acpi.build_tables(acpi.AcpiConfig(ncpus=ncpus, **FULL))
    for name, (_, data) in built.tables.items():
        path = tmp_path / f"{name.lower()}.dat"
        path.write_bytes(data)
        run = subprocess.run([IASL, "-d", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        assert "Warning" not in out and "Error" not in out and "Incorrect checksum" not in out, out
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (\\_S5, Package (0x04)" in dsl
    assert 'EisaId ("PNP0501")' in dsl and 'Name (_HID, "QEMU0001")' in dsl
    assert "IRQNoFlags ()\n                    {4}" in dsl
    # Compiled back, the DSDT means the same (iasl shortens \_SB to _SB in the root scope).
    run = subprocess.run([IASL, "-p", "again", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    again = (tmp_path / "again.aml").read_bytes()
    assert AmlReader(again[36:]).ns == AmlReader(built.tables["DSDT"][1][36:]).ns
    madt = (tmp_path / "apic.dsl").read_text()
    assert madt.count("[Processor Local APIC]") == ncpus
    assert madt.count("[Interrupt Source Override]") == 5


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_the_q35_tables(tmp_path):
    built = acpi.build_tables(acpi.AcpiConfig(ncpus=2, **Q35_FULL))
    for name, (_, data) in built.tables.items():
        (tmp_path / f"{name.lower()}.dat").write_bytes(data)
        run = subprocess.run([IASL, "-d", f"{name.lower()}.dat"], capture_output=True, text=True, cwd=tmp_path)
        out = run.stdout + run.stderr
        assert run.returncode == 0 and "Warning" not in out and "Error" not in out, out
    mcfg = (tmp_path / "mcfg.dsl").read_text()
    assert "Base Address : 00000000B0000000" in mcfg and "End Bus Number : FF" in mcfg
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'EisaId ("PNP0A08")' in dsl and 'Name (_CID, EisaId ("PNP0A03")' in dsl
    assert "Name (_PRT, Package (0x80)" in dsl and "DWordMemory (ResourceProducer" in dsl
    run = subprocess.run([IASL, "-p", "again", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    again = (tmp_path / "again.aml").read_bytes()
    assert AmlReader(again[36:]).ns == AmlReader(built.tables["DSDT"][1][36:]).ns

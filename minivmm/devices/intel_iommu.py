"""Intel VT-d (``-device intel-iommu``, q35 only): the DMA remapping unit
QEMU's q35 has at 0xfed90000, in legacy (not scalable) mode, with
second-level translation of PCI DMA and interrupt remapping of MSIs.

What a guest finds (registers at layout.IOMMU_ADDR, 4 KiB, 32/64-bit):
VER 0x10 (1.0); CAP and ECAP with QEMU's values for its defaults and
``intremap``/``eim=off`` (48-bit MGAW, SAGAW 39 and 48 bits, 2 MiB and 1 GiB
second-level pages, one fault recording register at 0x220; queued
invalidation, pass-through, IOTLB registers at 0xf0, and with intremap
interrupt remapping); GCMD/GSTS with TE, SRTP, QIE, SIRTP, IRE, CFI (WBF and
SFL accepted, nothing to do); RTADDR, CCMD and IOTLB (invalidations are
acknowledged at once: nothing is cached, every DMA walks the tables the guest
has now); FSTS, FECTL/FEDATA/FEADDR (fault events are MSIs); IQH/IQT/IQA
and ICS/IECTL (the invalidation queue: context, IOTLB, interrupt-entry-cache
and wait descriptors, a wait writing its status and raising its completion
event); IRTA.

DMA: ``translate`` walks root table -> context entry (legacy, TT 0 or 2)
-> 3- or 4-level second-level tables, with the rights each level grants.
Interrupts: ``remap_msi`` turns a remappable-format MSI into the compatibility
one through the IRTE the handle names (checking presence, size, source id);
compatibility-format MSIs pass unchanged, as in QEMU (GSTS.CFIS is kept but
blocks nothing).
Every table, descriptor and status address the guest gives is read through
guest RAM with bounds checks: a bad one is a recorded fault (FRCD, FSTS) or
an invalidation queue error (FSTS.IQE), never an exception in the VMM.
Not emulated: scalable mode and first-level tables, device-TLBs, posted
interrupts, eim=on (x2APIC destinations), the advanced fault log, PMRs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from minivmm.arch.x86 import layout
from minivmm.devices.state import LockedState
from minivmm.memory import GuestMemoryError
from minivmm.vmstate import VMSD, Field

# --- capabilities (QEMU's vtd_cap_init for its defaults) -------------------------------------------------
VERSION = 0x10
AW_BITS = 48  # QEMU's default address width since 9.2: 3- and 4-level tables
CAP_ND = 6  # 16-bit domain ids
CAP_SAGAW = (0x2 | 0x4) << 8  # 39-bit (3-level) and 48-bit (4-level) guest address widths
CAP_MGAW = (AW_BITS - 1) << 16
FRCD_OFFSET = 0x220  # the one fault recording register
CAP_FRO = (FRCD_OFFSET >> 4) << 24
CAP_SSLPS = (1 << 34) | (1 << 35)  # 2 MiB and 1 GiB second-level pages
CAP_PSI = 1 << 39
CAP_MAMV = 18 << 48
CAP_DRAIN = (1 << 54) | (1 << 55)
CAP_ESRTPS = 1 << 63  # SRTP also invalidates every cache (there is none to invalidate here)
CAP = CAP_ND | CAP_SAGAW | CAP_MGAW | CAP_FRO | CAP_SSLPS | CAP_PSI | CAP_MAMV | CAP_DRAIN | CAP_ESRTPS
IOTLB_OFFSET = 0xF0
ECAP_QI, ECAP_IR, ECAP_EIM, ECAP_PT = 1 << 1, 1 << 3, 1 << 4, 1 << 6
ECAP_IRO = (IOTLB_OFFSET >> 4) << 8
ECAP_MHMV = 15 << 20
ECAP = ECAP_QI | ECAP_PT | ECAP_IRO
ECAP_INTREMAP = ECAP_IR | ECAP_MHMV

# --- GCMD / GSTS ------------------------------------------------------------------------------------------
TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI = (1 << b for b in (31, 30, 29, 28, 27, 26, 25, 24, 23))
LASTING = TE | QIE | IRE | CFI  # enables: GSTS follows GCMD's bit; the others are one-shot commands

# --- other register bits ----------------------------------------------------------------------------------
CCMD_ICC, CCMD_CIRG_SHIFT, CCMD_CAIG_SHIFT = 1 << 63, 61, 59
IOTLB_IVT, IOTLB_IIRG_SHIFT, IOTLB_IAIG_SHIFT = 1 << 63, 60, 57
FSTS_PFO, FSTS_PPF, FSTS_IQE, FSTS_ICE, FSTS_ITE = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 6
FSTS_ERRORS = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE
EVENT_IM, EVENT_IP = 1 << 31, 1 << 30  # FECTL and IECTL: interrupt mask, interrupt pending
ICS_IWC = 1
FRCD_F, FRCD_T = 1 << 63, 1 << 62  # in the record's high quadword
IQA_QS = 0x7

# --- fault reasons (VT-d 7.1.3) ---------------------------------------------------------------------------
FR_ROOT_NOT_PRESENT, FR_CONTEXT_NOT_PRESENT, FR_CONTEXT_INVALID = 0x1, 0x2, 0x3
FR_ADDRESS_BEYOND_AW, FR_WRITE, FR_READ, FR_TABLE_ACCESS = 0x4, 0x5, 0x6, 0x7
FR_ROOT_ACCESS, FR_CONTEXT_ACCESS, FR_PTE_RESERVED = 0x8, 0x9, 0xC
FR_IR_FIRST = 0x20  # interrupt-remapping reasons from here: their record holds the index, not a page
FR_IR_INDEX, FR_IR_NOT_PRESENT, FR_IR_ACCESS, FR_IR_RESERVED = 0x21, 0x22, 0x23, 0x24
FR_IR_SID = 0x26

# --- translation structures -------------------------------------------------------------------------------
PAGE = layout.PAGE_SIZE
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE - 1)  # a table or page address in an entry
CONTEXT_FPD = 1 << 1
TT_MULTI_LEVEL, TT_PASS_THROUGH = 0, 2
AW_LEVELS = {1: 3, 2: 4}  # context entry AW -> levels (39- and 48-bit)
PTE_R, PTE_W, PTE_SP = 1 << 0, 1 << 1, 1 << 7
PTE_RESERVED = (0xF << 48) | (1 << 11)  # above the 48-bit host address width, SNP (no ECAP.SC)
MSI_ADDRESS_BASE = layout.LAPIC_ADDR
MSI_REMAPPABLE, MSI_SHV = 1 << 4, 1 << 3
IRTE_PRESENT, IRTE_FPD, IRTE_POSTED = 1 << 0, 1 << 1, 1 << 15
SVT_MASKS = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)  # source-id qualifier: which function bits to compare


class DmaFault(GuestMemoryError):
    """A DMA the IOMMU did not translate: the device does not transfer (the fault is recorded)."""


@dataclass(frozen=True)
class Reg:
    """One register: its field in VtdState, size in bytes, writable and write-1-to-clear bits."""

    offset: int
    size: int
    field: str
    wmask: int
    w1c: int = 0


REGS = (
    Reg(0x20, 8, "rtaddr", ADDR_MASK | (0xFFF << 52)),
    Reg(0x28, 8, "ccmd", 0xE0000003FFFFFFFF),
    Reg(0x34, 4, "fsts", 0, FSTS_ERRORS),
    Reg(0x38, 4, "fectl", EVENT_IM),
    Reg(0x3C, 4, "fedata", 0xFFFF),
    Reg(0x40, 4, "feaddr", 0xFFFFFFFC),
    Reg(0x44, 4, "feuaddr", 0xFFFFFFFF),
    Reg(0x88, 8, "iqt", 0x7FFF0),
    Reg(0x90, 8, "iqa", ~(PAGE - 1) & (1 << 64) - 1 | IQA_QS),
    Reg(0x9C, 4, "ics", 0, ICS_IWC),
    Reg(0xA0, 4, "iectl", EVENT_IM),
    Reg(0xA4, 4, "iedata", 0xFFFF),
    Reg(0xA8, 4, "ieaddr", 0xFFFFFFFC),
    Reg(0xAC, 4, "ieuaddr", 0xFFFFFFFF),
    Reg(0xB8, 8, "irta", ~(PAGE - 1) & (1 << 64) - 1 | 0xF),
    Reg(IOTLB_OFFSET, 8, "iva", ~(PAGE - 1) & (1 << 64) - 1 | 0x7F),
    Reg(IOTLB_OFFSET + 8, 8, "iotlb", 0xB003FFFF00000000),
    Reg(FRCD_OFFSET, 8, "frcd_lo", 0),
    Reg(FRCD_OFFSET + 8, 8, "frcd_hi", 0, FRCD_F),
)
READ_ONLY: dict[int, tuple[int, Callable[[IntelIommu], int]]] = {  # offset -> (size, its value)
    0x00: (4, lambda u: VERSION),
    0x08: (8, lambda u: CAP),
    0x10: (8, lambda u: u.ecap),
    0x1C: (4, lambda u: u.s.gsts),
    0x80: (8, lambda u: u.s.iqh),
}
GCMD = 0x18
_BYTES: dict[int, tuple[Reg, int]] = {r.offset + i: (r, i) for r in REGS for i in range(r.size)}


@dataclass
class VtdState:
    gsts: int = 0
    root: int = 0  # the root table SRTP latched from RTADDR
    irt: int = 0  # the IRTA SIRTP latched (table address and size)
    rtaddr: int = 0
    ccmd: int = 0
    fsts: int = 0
    fectl: int = EVENT_IM
    fedata: int = 0
    feaddr: int = 0
    feuaddr: int = 0
    iqh: int = 0
    iqt: int = 0
    iqa: int = 0
    ics: int = 0
    iectl: int = EVENT_IM
    iedata: int = 0
    ieaddr: int = 0
    ieuaddr: int = 0
    irta: int = 0
    iva: int = 0
    iotlb: int = 0
    frcd_lo: int = 0
    frcd_hi: int = 0


_U64 = (1 << 64) - 1


# Bits only the unit sets: the fault summary, pending events, the granularity an invalidation used.
_DEVICE_BITS = {
    "fsts": FSTS_PPF,
    "fectl": EVENT_IP,
    "iectl": EVENT_IP,
    "ccmd": 3 << CCMD_CAIG_SHIFT,
    "iotlb": 3 << IOTLB_IAIG_SHIFT,
}


def _state_fields() -> tuple[Field, ...]:
    """Each register with the bits the guest or the unit can set in it."""
    regs = tuple(
        Field(r.field, "u32" if r.size == 4 else "u64", mask=r.wmask | r.w1c | _DEVICE_BITS.get(r.field, 0))
        for r in REGS
        if r.field not in ("frcd_lo", "frcd_hi")
    )
    return (
        Field("gsts", "u32", mask=TE | SRTP | QIE | IRE | SIRTP | CFI),
        Field("root", "u64", mask=_U64 & ~(PAGE - 1)),
        Field("irt", "u64", mask=_U64 & ~(PAGE - 1) | 0xF),
        *regs,
        Field("iqh", "u64", mask=0x7FFF0),
        Field("frcd_lo", "u64", mask=_U64 & ~(PAGE - 1) | 0xFFFF << 48),
        Field("frcd_hi", "u64", mask=FRCD_F | FRCD_T | (0xFF << 32) | 0xFFFF),
    )


# A section an older minivmm (no IOMMU) never wrote: optional, as QEMU's device sections are per device.
VMSTATE = VMSD("intel-iommu", 1, 1, _state_fields(), post_load=lambda v: VtdState(**v), optional=True)


class IntelIommu(LockedState):
    """The remapping unit. ``memory`` is guest RAM (read, write raising GuestMemoryError);
    ``send_msi(address, data)`` delivers the IOMMU's own events; ``routes_changed()`` tells the
    interrupt sources whose MSIs are cached in KVM routes (the IOAPIC) to translate them again."""

    name = "intel-iommu"
    vmstate = VMSTATE

    def __init__(
        self,
        memory,
        send_msi: Callable[[int, int], None],
        intremap: bool,
        routes_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.memory, self.send_msi, self.intremap, self.routes_changed = memory, send_msi, intremap, routes_changed
        self.ecap = ECAP | (ECAP_INTREMAP if intremap else 0)
        self.lock = threading.Lock()
        self.s = VtdState()

    # --- lifecycle: the routes follow a state set all at once, outside the lock -----------------------
    def reset(self) -> None:
        super().reset()
        self.routes_changed()

    def load_state(self, state: VtdState) -> None:
        super().load_state(state)
        self.routes_changed()

    # --- registers ------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = 0
        with self.lock:
            for i in range(size):
                value |= self._read_byte(offset + i) << (8 * i)
        return value

    def _read_byte(self, at: int) -> int:
        hit = _BYTES.get(at)
        if hit is not None:
            reg, i = hit
            return (getattr(self.s, reg.field) >> (8 * i)) & 0xFF
        for base, (size, value) in READ_ONLY.items():
            if base <= at < base + size:
                return (value(self) >> (8 * (at - base))) & 0xFF
        return 0  # GCMD is write-only; reserved space reads 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Bytes go to their registers by wmask and w1c; then each register touched acts."""
        value &= (1 << (8 * size)) - 1
        touched: dict[str, Reg] = {}
        gcmd = None
        with self.lock:
            for i in range(size):
                at, byte = offset + i, (value >> (8 * i)) & 0xFF
                if GCMD <= at < GCMD + 4:
                    gcmd = (gcmd or 0) | byte << (8 * (at - GCMD))
                    continue
                hit = _BYTES.get(at)
                if hit is None:
                    continue
                reg, lane = hit
                old = getattr(self.s, reg.field)
                shift = 8 * lane
                w, c = (reg.wmask >> shift) & 0xFF, (reg.w1c >> shift) & 0xFF
                new_byte = ((old >> shift) & 0xFF & ~w | byte & w) & ~(byte & c)
                setattr(self.s, reg.field, old & ~(0xFF << shift) | new_byte << shift)
                touched[reg.field] = reg
            refresh = self._act(touched, gcmd)
        if refresh:
            self.routes_changed()

    def _act(self, touched: dict[str, Reg], gcmd: int | None) -> bool:
        """What the registers just written do; True when interrupt routes must be translated again."""
        s, refresh = self.s, False
        if gcmd is not None:
            refresh = self._command(gcmd)
        if "ccmd" in touched and s.ccmd & CCMD_ICC:  # context-cache invalidation: nothing cached
            cirg = (s.ccmd >> CCMD_CIRG_SHIFT) & 3
            s.ccmd = s.ccmd & ~(CCMD_ICC | 3 << CCMD_CAIG_SHIFT) | cirg << CCMD_CAIG_SHIFT
        if "iotlb" in touched and s.iotlb & IOTLB_IVT:  # IOTLB invalidation: likewise
            iirg = (s.iotlb >> IOTLB_IIRG_SHIFT) & 3
            s.iotlb = s.iotlb & ~(IOTLB_IVT | 3 << IOTLB_IAIG_SHIFT) | iirg << IOTLB_IAIG_SHIFT
        if "frcd_hi" in touched:
            s.fsts = s.fsts & ~FSTS_PPF | (FSTS_PPF if s.frcd_hi & FRCD_F else 0)
        if ("fsts" in touched or "frcd_hi" in touched) and not s.fsts & (FSTS_ERRORS | FSTS_PPF):
            s.fectl &= ~EVENT_IP
        if "fectl" in touched:
            self._event("fectl", "feaddr", "feuaddr", "fedata", pending_only=True)
        if "ics" in touched and not s.ics & ICS_IWC:
            s.iectl &= ~EVENT_IP
        if "iectl" in touched:
            self._event("iectl", "ieaddr", "ieuaddr", "iedata", pending_only=True)
        if "iqt" in touched and s.gsts & QIE:
            refresh |= self._run_queue()
        return refresh

    def _command(self, value: int) -> bool:
        """GCMD: enables follow their bits, one-shot commands (SRTP, SIRTP) latch their pointer."""
        s, refresh = self.s, False
        changed = (s.gsts ^ value) & LASTING
        if changed & QIE:
            if value & QIE:
                s.iqh = 0
                s.gsts |= QIE
            elif s.iqh == s.iqt:  # a queue still holding work stays enabled, as QEMU
                s.gsts &= ~QIE
                s.iqh = 0
            changed &= ~QIE
        s.gsts ^= changed  # TE, IRE, CFI
        if value & SRTP:
            s.root = s.rtaddr
            s.gsts |= SRTP
        if value & SIRTP:
            s.irt = s.irta
            s.gsts |= SIRTP
            refresh = True
        if not self.intremap:
            s.gsts &= ~(IRE | CFI | SIRTP)  # no IR unit: those commands do nothing
        return refresh or bool(changed & (IRE | CFI))

    # --- events ---------------------------------------------------------------------------------------
    def _event(self, ctl: str, addr: str, uaddr: str, data: str, pending_only: bool = False) -> None:
        """Raise (or, on an unmask, deliver the pending) fault or completion event, lock held."""
        s = self.s
        control = getattr(s, ctl)
        if pending_only and not control & EVENT_IP:
            return
        if control & EVENT_IM:
            setattr(s, ctl, control | EVENT_IP)
            return
        setattr(s, ctl, control & ~EVENT_IP)
        self.send_msi(getattr(s, addr) | getattr(s, uaddr) << 32, getattr(s, data))

    def _fault(self, reason: int, sid: int, info: int, read: bool) -> None:
        """Record a primary fault in the one FRCD (or overflow) and raise the fault event, lock held."""
        s = self.s
        if s.frcd_hi & FRCD_F:
            s.fsts |= FSTS_PFO
        else:
            s.frcd_lo = info & _U64 & ~(PAGE - 1) if reason < FR_IR_FIRST else (info & 0xFFFF) << 48  # page; IR: index
            s.frcd_hi = FRCD_F | (FRCD_T if read else 0) | reason << 32 | (sid & 0xFFFF)
            s.fsts = s.fsts & ~(0xFF << 8) | FSTS_PPF  # FRI: record 0
        self._event("fectl", "feaddr", "feuaddr", "fedata")

    def _queue_error(self) -> None:
        self.s.fsts |= FSTS_IQE
        self._event("fectl", "feaddr", "feuaddr", "fedata")

    # --- queued invalidation --------------------------------------------------------------------------
    def _run_queue(self) -> bool:
        """Process descriptors from IQH to IQT; an error stops at the bad one (IQH names it)."""
        s, refresh = self.s, False
        if s.fsts & FSTS_IQE:
            return False  # until software clears IQE
        entries = 256 << (s.iqa & IQA_QS)
        base, tail = s.iqa & ~(PAGE - 1), s.iqt >> 4
        if tail >= entries:
            self._queue_error()
            return False
        head = (s.iqh >> 4) % entries
        while head != tail:
            try:
                raw = self.memory.read(base + 16 * head, 16)
            except GuestMemoryError:
                self._queue_error()
                break
            lo, hi = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
            done = self._descriptor(lo, hi)
            if done is None:
                self._queue_error()
                break
            refresh |= done
            head = (head + 1) % entries
            s.iqh = head << 4
        return refresh

    def _descriptor(self, lo: int, hi: int) -> bool | None:
        """One descriptor: True if interrupt routes must be redone, False if done, None if invalid."""
        kind = lo & 0xF
        if kind in (1, 2):  # context-cache, IOTLB invalidation: nothing cached
            return False
        if kind == 4:  # interrupt entry cache: the KVM routes are the cache
            return True
        if kind != 5:  # device-TLB (no ECAP.DT) and the scalable-mode kinds
            return None
        if lo & (1 << 5):  # status write
            if hi & 3:
                return None
            try:
                self.memory.write(hi, (lo >> 32).to_bytes(4, "little"))
            except GuestMemoryError:
                return None
        if lo & (1 << 4) and not self.s.ics & ICS_IWC:  # interrupt flag: the completion event
            self.s.ics |= ICS_IWC
            self._event("iectl", "ieaddr", "ieuaddr", "iedata")
        return False

    # --- DMA ------------------------------------------------------------------------------------------
    def translate(self, sid: int, iova: int, write: bool) -> int:
        """The guest-physical address of bus address ``iova`` for requester ``sid`` (bus << 8 | devfn);
        DmaFault (recorded unless the context entry disables fault processing) when not mapped."""
        with self.lock:
            if not self.s.gsts & TE:
                return iova
            fpd = False
            try:
                address, fpd = self._walk(sid, iova, write)
                return address
            except _Fault as f:
                if not fpd and not f.fpd:
                    self._fault(f.reason, sid, iova, not write)
                raise DmaFault(f"intel-iommu: DMA to {iova:#x} from {sid:#06x}: fault reason {f.reason:#x}") from None

    def _read_entry(self, address: int, size: int, reason: int, fpd: bool = False) -> int:
        try:
            return int.from_bytes(self.memory.read(address, size), "little")
        except GuestMemoryError:
            raise _Fault(reason, fpd) from None

    def _walk(self, sid: int, iova: int, write: bool) -> tuple[int, bool]:
        root = self.s.root & ADDR_MASK
        entry = self._read_entry(root + 16 * (sid >> 8), 8, FR_ROOT_ACCESS)
        if not entry & 1:
            raise _Fault(FR_ROOT_NOT_PRESENT)
        context = self._read_entry((entry & ADDR_MASK) + 16 * (sid & 0xFF), 16, FR_CONTEXT_ACCESS)
        lo, hi = context & _U64, context >> 64
        if not lo & 1:
            raise _Fault(FR_CONTEXT_NOT_PRESENT)
        fpd = bool(lo & CONTEXT_FPD)
        kind = (lo >> 2) & 3
        if kind == TT_PASS_THROUGH:
            return iova, fpd
        levels = AW_LEVELS.get(hi & 7)
        if kind != TT_MULTI_LEVEL or levels is None:
            raise _Fault(FR_CONTEXT_INVALID, fpd)
        if iova >> (12 + 9 * levels):
            raise _Fault(FR_ADDRESS_BEYOND_AW, fpd)
        table, right = lo & ADDR_MASK, PTE_W if write else PTE_R
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            pte = self._read_entry(table + 8 * ((iova >> shift) & 0x1FF), 8, FR_TABLE_ACCESS, fpd)
            if not pte & right:
                raise _Fault(FR_WRITE if write else FR_READ, fpd)
            leaf = level == 1 or pte & PTE_SP
            if pte & PTE_RESERVED or (pte & PTE_SP and level > 3):
                raise _Fault(FR_PTE_RESERVED, fpd)
            if leaf:
                return (pte & ADDR_MASK & ~((1 << shift) - 1)) | (iova & ((1 << shift) - 1)), fpd
            table = pte & ADDR_MASK
        raise AssertionError("unreachable")

    # --- interrupt remapping --------------------------------------------------------------------------
    def remap_msi(self, address: int, data: int, sid: int | None) -> tuple[int, int] | None:
        """The compatibility-format MSI to deliver for ``address``/``data``, or None when blocked (a
        fault is recorded). ``sid``: the requester to verify against the IRTE's source id; None for
        the IOAPIC's routes, which QEMU does not verify either."""
        with self.lock:
            s = self.s
            if not self.intremap or not s.gsts & IRE:
                return address, data
            if not address & MSI_REMAPPABLE:  # compatibility format: passed on, as QEMU does (CFI or not)
                return address, data
            index = ((address >> 5) & 0x7FFF) | ((address >> 2) & 1) << 15
            if address & MSI_SHV:
                index = (index + (data & 0xFFFF)) & 0xFFFF
            try:
                return self._irte(index, sid)
            except _Fault as f:
                if not f.fpd:
                    self._fault(f.reason, sid or 0, index, False)  # an interrupt is a write
                return None

    def _irte(self, index: int, sid: int | None) -> tuple[int, int]:
        table, size = self.s.irt & ~(PAGE - 1) & _U64, 2 << (self.s.irt & 0xF)
        if index >= size:
            raise _Fault(FR_IR_INDEX)
        irte = self._read_entry(table + 16 * index, 16, FR_IR_ACCESS)
        lo, hi = irte & _U64, irte >> 64
        fpd = bool(lo & IRTE_FPD)
        if not lo & IRTE_PRESENT:
            raise _Fault(FR_IR_NOT_PRESENT, fpd)
        if lo & IRTE_POSTED or hi >> 20:
            raise _Fault(FR_IR_RESERVED, fpd)
        if sid is not None:
            source, qualifier, kind = hi & 0xFFFF, (hi >> 16) & 3, (hi >> 18) & 3
            if kind == 1 and (source ^ sid) & SVT_MASKS[qualifier]:
                raise _Fault(FR_IR_SID, fpd)
            if kind == 2 and not (source >> 8) <= (sid >> 8) <= (source & 0xFF):
                raise _Fault(FR_IR_SID, fpd)
            if kind == 3:
                raise _Fault(FR_IR_RESERVED, fpd)
        dest = (lo >> 40) & 0xFF  # xAPIC mode (no EIM): destination id bits 15:8
        redirection_hint, dest_mode = (lo >> 3) & 1, (lo >> 2) & 1
        trigger, delivery, vector = (lo >> 4) & 1, (lo >> 5) & 7, (lo >> 16) & 0xFF
        address = MSI_ADDRESS_BASE | dest << 12 | redirection_hint << 3 | dest_mode << 2
        return address, vector | delivery << 8 | trigger << 15


class _Fault(Exception):
    def __init__(self, reason: int, fpd: bool = False) -> None:
        self.reason, self.fpd = reason, fpd

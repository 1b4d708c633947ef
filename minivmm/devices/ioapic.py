"""The I/O APIC (82093AA, version 0x20) in userspace, for ``kernel-irqchip=split``.

With a split irqchip KVM keeps only the local APICs; this device owns the 24
redirection entries. Each pin's entry is turned into an MSI (address and data,
as the IOAPIC would put on the bus) and handed to KVM as the route of GSI
``pin``; raising the pin is a KVM_IRQ_LINE on that GSI. KVM reads the routes to
know which vectors are level-triggered IOAPIC ones: their EOIs come back as
KVM_EXIT_IOAPIC_EOI, which clears the entry's remote IRR and, if the line is
still asserted, delivers it again (how a level-triggered line works).

Registers, at IOAPIC_ADDR: IOREGSEL (0x00), IOWIN (0x10) and the EOI register
(0x40). Behind IOWIN: ID (0), version (1), arbitration (2), and the
redirection table from 0x10, two 32-bit halves per pin. Polarity is kept but
not applied: a source's level 1 is "asserted", as in KVM's and QEMU's IOAPICs.

With an IOMMU's interrupt remapping (``remap``), bits 48-63 of an entry are
the remappable format's handle (bit 48 the format, 49-63 the index, bit 11
its bit 15): they go to MSI address bits 4-19 as QEMU's IOAPIC puts them, and
each unmasked entry's MSI is translated before it becomes a KVM route; a
blocked one gets no route. The IOMMU asks for ``refresh_routes`` when its
table or enables change (an interrupt-entry-cache invalidation).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.arch.x86 import layout
from minivmm.devices.state import LockedState
from minivmm.vmstate import VMSD, Field

PINS = 24
VERSION = 0x20 | ((PINS - 1) << 16)
IOREGSEL, IOWIN, EOI = 0x00, 0x10, 0x40
REG_ID, REG_VERSION, REG_ARB, REG_TABLE = 0x00, 0x01, 0x02, 0x10

VECTOR = 0xFF
DELIVERY_MODE = 0x700
DEST_MODE_LOGICAL = 1 << 11
DELIVERY_STATUS = 1 << 12  # read-only
POLARITY_LOW = 1 << 13
REMOTE_IRR = 1 << 14  # read-only
TRIGGER_LEVEL = 1 << 15
MASKED = 1 << 16
WRITABLE = VECTOR | DELIVERY_MODE | DEST_MODE_LOGICAL | POLARITY_LOW | TRIGGER_LEVEL | MASKED | (0xFFFF << 48)
ENTRY_BITS = WRITABLE | REMOTE_IRR

MSI_ADDRESS_BASE = layout.LAPIC_ADDR


def msi_of(entry: int) -> tuple[int, int]:
    """The MSI (address, data) an IOAPIC sends for a redirection entry: bits 48-63 (destination,
    or a remappable handle) become address bits 4-19, the destination mode bit 2."""
    logical = 1 if entry & DEST_MODE_LOGICAL else 0
    address = MSI_ADDRESS_BASE | (((entry >> 48) & 0xFFFF) << 4) | (logical << 2)
    data = (entry & (VECTOR | DELIVERY_MODE)) | ((1 << 15) if entry & TRIGGER_LEVEL else 0)
    return address, data


@dataclass
class IoApicState:
    id: int = 0
    ioregsel: int = 0
    irr: int = 0  # the pins' levels, as sources last set them
    entries: list[int] = field(default_factory=lambda: [MASKED] * PINS)


VMSTATE = VMSD(
    "ioapic",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("id", "u8", max=0x0F),
        Field("ioregsel", "u8"),
        Field("irr", "u32", mask=(1 << PINS) - 1),
        Field("entries", "u64", is_list=True, mask=ENTRY_BITS),  # exactly PINS: see check
    ),
    check=lambda v: None if len(v["entries"]) == PINS else ("entries", f"expected {PINS} entries"),
    post_load=lambda v: IoApicState(**v),
)


class IoApic(LockedState):
    """The redirection table; ``inject(gsi)`` raises a GSI (KVM_IRQ_LINE), ``set_routes`` gives KVM the MSIs."""

    name = "ioapic"
    vmstate = VMSTATE

    def __init__(self, inject: Callable[[int], None], set_routes: Callable[[dict[int, tuple[int, int]]], None]) -> None:
        self.inject, self.set_routes = inject, set_routes
        self.remap: Callable[[int, int], tuple[int, int] | None] | None = None  # an IOMMU's interrupt remapping
        self.lock = threading.Lock()
        self.s = IoApicState()
        self.routes: dict[int, tuple[int, int]] = {}
        self._translated: dict[int, tuple[int, tuple[int, int] | None]] = {}  # pin -> (entry, its MSI)
        self._update_routes(retranslate=True)

    def _state_changed(self) -> None:
        self._update_routes(retranslate=True)

    # --- the pins ---------------------------------------------------------------------------------
    def set_irq(self, pin: int, level: int) -> None:
        """A source's line: an edge entry fires on the rising edge, a level entry while high."""
        with self.lock:
            bit = 1 << pin
            was = self.s.irr & bit
            if level:
                self.s.irr |= bit
            else:
                self.s.irr &= ~bit
            entry = self.s.entries[pin]
            if level and (entry & TRIGGER_LEVEL or not was):
                self._service(pin)

    def eoi(self, vector: int) -> None:
        """The guest ended a level-triggered interrupt: lines still high fire again."""
        with self.lock:
            for pin, entry in enumerate(self.s.entries):
                if entry & TRIGGER_LEVEL and entry & REMOTE_IRR and entry & VECTOR == vector:
                    self.s.entries[pin] = entry & ~REMOTE_IRR
                    if self.s.irr & (1 << pin):
                        self._service(pin)

    def _service(self, pin: int) -> None:
        entry = self.s.entries[pin]
        if entry & MASKED or entry & REMOTE_IRR:
            return
        if entry & TRIGGER_LEVEL:
            self.s.entries[pin] = entry | REMOTE_IRR
        self.inject(pin)

    def refresh_routes(self) -> None:
        """Translate the routes again (the IOMMU's interrupt remapping table or enables changed)."""
        with self.lock:
            self._update_routes(retranslate=True)

    def _update_routes(self, retranslate: bool = False) -> None:
        """Each entry's MSI, through the IOMMU's remapping when it has one: translated again only for
        an entry the guest changed, unless the IOMMU's tables did (so a bad entry faults once, not on
        every write to another pin)."""
        routes = {}
        for pin, entry in enumerate(self.s.entries):
            key = entry & ~REMOTE_IRR
            seen = self._translated.get(pin)
            if retranslate or seen is None or seen[0] != key:
                msi = msi_of(entry)
                if self.remap is not None and not entry & MASKED:
                    msi = self.remap(*msi)
                seen = self._translated[pin] = (key, msi)
            if seen[1] is not None:
                routes[pin] = seen[1]
        if routes != self.routes:
            self.set_routes(routes)
            self.routes = routes

    # --- registers --------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset == IOREGSEL:
                return self.s.ioregsel
            if offset == IOWIN:
                return self._read_register(self.s.ioregsel)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset == IOREGSEL:
                self.s.ioregsel = value & 0xFF
            elif offset == IOWIN:
                self._write_register(self.s.ioregsel, value & 0xFFFFFFFF)
        if offset == EOI:
            self.eoi(value & VECTOR)

    def _read_register(self, reg: int) -> int:
        if reg in (REG_ID, REG_ARB):
            return self.s.id << 24
        if reg == REG_VERSION:
            return VERSION
        pin, high = divmod(reg - REG_TABLE, 2)
        if 0 <= pin < PINS:
            return (self.s.entries[pin] >> (32 * high)) & 0xFFFFFFFF
        return 0

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_ID:
            self.s.id = (value >> 24) & 0x0F
            return
        pin, high = divmod(reg - REG_TABLE, 2)
        if not 0 <= pin < PINS:
            return
        entry = self.s.entries[pin]
        half = 0xFFFFFFFF << (32 * high)
        new = (entry & ~half & WRITABLE) | ((value << (32 * high)) & half & WRITABLE)
        if new & TRIGGER_LEVEL:
            new |= entry & REMOTE_IRR  # read-only: kept until the EOI
        self.s.entries[pin] = new
        self._update_routes()
        if self.s.irr & (1 << pin) and new & TRIGGER_LEVEL:
            self._service(pin)  # unmasking an asserted level line delivers it

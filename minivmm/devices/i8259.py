"""The two cascaded 8259A PICs in userspace, for ``kernel-irqchip=split``.

The master answers at 0x20-0x21 (device offsets 0-1), the slave at 0xa0-0xa1
(offsets 2-3) on the master's IRQ 2, and the edge/level control registers
(ELCR) at 0x4d0-0x4d1 (offsets 4-5). The master's INT output goes to the
boot CPU's LINT0 as ExtINT: ``on_output`` tells the machine when it rises,
and the boot vCPU asks ``acknowledge()`` for the vector (the INTA cycle)
when KVM says the guest can take it.

Programming is the 8086-mode subset PCs use: ICW1-ICW4 (ICW4's auto-EOI and
special fully nested mode), OCW1 (mask), OCW2 (specific, non-specific and
rotating EOIs, priority), OCW3 (read IRR/ISR, poll, special mask).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.devices.state import LockedState
from minivmm.vmstate import VMSD, Field

MASTER, SLAVE = 0, 1
CASCADE_IRQ = 2
ELCR_MASK = (0xF8, 0xDE)  # IRQs 0-2 (timer, keyboard, cascade) and 8, 13 are always edge
OFFSET_ELCR = 4


@dataclass
class Chip:
    last_irr: int = 0  # the input levels, for edge detection
    irr: int = 0
    imr: int = 0
    isr: int = 0
    priority_add: int = 0  # the lowest-priority IRQ + 1 (rotation)
    irq_base: int = 0
    read_isr: bool = False  # OCW3: the command port reads ISR rather than IRR
    poll: bool = False
    special_mask: bool = False
    init_state: int = 0  # 0: programmed; 1-3: the next ICW expected
    auto_eoi: bool = False
    rotate_on_auto_eoi: bool = False
    special_fully_nested: bool = False
    init4: bool = False
    single: bool = False
    elcr: int = 0

    def priority(self, mask: int) -> int:
        """The priority (0 highest) of the highest set bit of ``mask``, or 8 for none."""
        if not mask:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def pending(self, is_master: bool) -> int:
        """The IRQ this chip would raise now, or -1."""
        p = self.priority(self.irr & ~self.imr)
        if p == 8:
            return -1
        in_service = self.isr & ~self.imr if self.special_mask else self.isr
        if is_master and self.special_fully_nested:
            in_service &= ~(1 << CASCADE_IRQ)
        return (p + self.priority_add) & 7 if p < self.priority(in_service) else -1

    def set_input(self, irq: int, level: int) -> None:
        bit = 1 << irq
        if self.elcr & bit:  # level-triggered: the request follows the line
            self.irr = self.irr | bit if level else self.irr & ~bit
        elif level and not self.last_irr & bit:
            self.irr |= bit
        self.last_irr = self.last_irr | bit if level else self.last_irr & ~bit

    def intack(self, irq: int) -> None:
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self.elcr & bit:
            self.irr &= ~bit


_CHIP = VMSD(
    "i8259-chip",
    1,
    1,
    (
        *(Field(n, "u8") for n in ("last_irr", "irr", "imr", "isr")),
        Field("priority_add", "u8", max=7),
        Field("irq_base", "u8", mask=0xF8),
        *(Field(n, "bool") for n in ("read_isr", "poll", "special_mask")),
        Field("init_state", "u8", max=3),
        *(Field(n, "bool") for n in ("auto_eoi", "rotate_on_auto_eoi", "special_fully_nested", "init4", "single")),
        Field("elcr", "u8"),
    ),
    post_load=lambda v: Chip(**v),
)


@dataclass
class PicState:
    chips: list[Chip] = field(default_factory=lambda: [Chip(), Chip()])


VMSTATE = VMSD(
    "i8259",
    1,
    1,
    (Field("chips", _CHIP, is_list=True, max=2),),
    check=lambda v: None if len(v["chips"]) == 2 else ("chips", "expected a master and a slave"),
    post_load=lambda v: PicState(chips=v["chips"]),
)


class Pic(LockedState):
    name = "i8259"
    vmstate = VMSTATE

    def __init__(self, on_output: Callable[[bool], None]) -> None:
        self.on_output = on_output
        self.lock = threading.Lock()
        self.s = PicState()
        self.output = False

    def set_irq(self, irq: int, level: int) -> None:
        """ISA IRQ 0-15 at ``level``."""
        with self.lock:
            self.s.chips[irq >> 3].set_input(irq & 7, level)
            self._update()

    def _state_changed(self) -> None:
        self._update()

    def _update(self) -> None:
        master, slave = self.s.chips
        master.set_input(CASCADE_IRQ, 1 if slave.pending(False) >= 0 else 0)
        output = master.pending(True) >= 0
        if output != self.output:
            self.output = output
            self.on_output(output)

    def acknowledge(self) -> int | None:
        """The INTA cycle: the vector to deliver (a spurious IRQ 7 when the request went away), or None."""
        with self.lock:
            if not self.output:
                return None
            master, slave = self.s.chips
            irq = master.pending(True)
            if irq < 0:  # gone since the output rose: the 8259 answers IRQ 7
                vector = master.irq_base + 7
            else:
                master.intack(irq)
                vector = master.irq_base + irq
                if irq == CASCADE_IRQ:
                    irq2 = slave.pending(False)
                    if irq2 >= 0:
                        slave.intack(irq2)
                    vector = slave.irq_base + (irq2 if irq2 >= 0 else 7)
            self._update()
            return vector

    # --- ports ------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= OFFSET_ELCR:
                return self.s.chips[offset & 1].elcr if offset < OFFSET_ELCR + 2 else 0xFF
            chip = self.s.chips[offset >> 1]
            if chip.poll:
                chip.poll = False
                irq = chip.pending(offset < 2)
                if irq < 0:
                    return 0
                chip.intack(irq)
                self._update()
                return irq | 0x80
            if offset & 1:
                return chip.imr
            return chip.isr if chip.read_isr else chip.irr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self.lock:
            if offset >= OFFSET_ELCR:
                if offset < OFFSET_ELCR + 2:
                    self.s.chips[offset & 1].elcr = value & ELCR_MASK[offset & 1]
                return
            index = offset >> 1
            chip = self.s.chips[index]
            if offset & 1:
                self._write_data(chip, value)
            elif value & 0x10:  # ICW1: all starts over but the ELCR (and level-triggered requests)
                self.s.chips[index] = Chip(
                    irr=chip.irr & chip.elcr,
                    elcr=chip.elcr,
                    init_state=1,
                    init4=bool(value & 1),
                    single=bool(value & 2),
                )
            elif value & 0x08:  # OCW3
                if value & 0x04:
                    chip.poll = True
                if value & 0x02:
                    chip.read_isr = bool(value & 1)
                if value & 0x40:
                    chip.special_mask = bool(value & 0x20)
            else:
                self._ocw2(chip, value)
            self._update()

    @staticmethod
    def _write_data(chip: Chip, value: int) -> None:
        if chip.init_state == 0:  # OCW1
            chip.imr = value
        elif chip.init_state == 1:  # ICW2: the vector base
            chip.irq_base = value & 0xF8
            chip.init_state = 2 if not chip.single else (3 if chip.init4 else 0)
        elif chip.init_state == 2:  # ICW3: cascade wiring, fixed on a PC
            chip.init_state = 3 if chip.init4 else 0
        else:  # ICW4
            chip.special_fully_nested = bool(value & 0x10)
            chip.auto_eoi = bool(value & 0x02)
            chip.init_state = 0

    @staticmethod
    def _ocw2(chip: Chip, value: int) -> None:
        cmd = value >> 5
        if cmd in (0, 4):  # rotate in auto-EOI mode: clear / set
            chip.rotate_on_auto_eoi = cmd == 4
        elif cmd in (1, 5):  # non-specific EOI, and rotating
            p = chip.priority(chip.isr)
            if p != 8:
                irq = (p + chip.priority_add) & 7
                chip.isr &= ~(1 << irq)
                if cmd == 5:
                    chip.priority_add = (irq + 1) & 7
        elif cmd in (3, 7):  # specific EOI, and rotating
            irq = value & 7
            chip.isr &= ~(1 << irq)
            if cmd == 7:
                chip.priority_add = (irq + 1) & 7
        elif cmd == 6:  # set priority
            chip.priority_add = (value + 1) & 7

"""A 16550A UART (COM1 at 0x3f8, IRQ 4), the console of every guest.

Transmission is instantaneous: a byte written to THR goes straight to the
chardev and THR is empty again, so LSR reads 0x60 (THRE|TEMT) when idle.
Received bytes wait in a 16-byte FIFO (1 byte in 16450 mode); the chardev is
only read while there is room, so input is never dropped. Interrupts follow
QEMU's priority order; each rise of the IRQ level is an edge on IRQ 4 (the
machine wires it through an irqfd). With
the FIFO enabled and fewer bytes than the trigger level, the character
time-out interrupt is raised at once (there is no bit clock to wait for).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.devices.device import StableRead
from minivmm.devices.state import LockedState
from minivmm.vmstate import VMSD, Field, as_dict

RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 1, 2, 4
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 16
LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT = 1, 2, 4, 8, 16, 32, 64
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 1, 2, 4, 8
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTAS = MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD
FIFO_SIZE = 16
TRIGGER_LEVELS = (1, 4, 8, 14)


@dataclass
class SerialState:
    """Everything a 16550A holds; saved and restored as one record."""

    ier: int = 0
    lcr: int = 0
    mcr: int = MCR_OUT2
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = MSR_DCD | MSR_DSR | MSR_CTS
    scr: int = 0
    fcr: int = 0
    divisor: int = 12  # 9600 baud
    thr_ipending: bool = False
    rx: deque = field(default_factory=deque)
    irq_level: int = 0


def _check(values: dict) -> tuple[str, str] | None:
    """The receive FIFO never holds more than the mode allows (16450 mode: one byte)."""
    room = FIFO_SIZE if values["fcr"] & FCR_ENABLE else 1
    if len(values["rx"]) > room:
        return "rx", f"{len(values['rx'])} bytes waiting, more than the {room} the FIFO mode holds"
    return None


def _state_from(values: dict) -> SerialState:
    return SerialState(**{**values, "rx": deque(values["rx"])})


# Version 2 added irq_level; state from version 1 gets it recomputed on load.
VMSTATE = VMSD(
    "serial",
    version_id=2,
    minimum_version_id=1,
    fields=(
        Field("divisor", "u16"),
        Field("ier", "u8", mask=0x0F),  # what write() keeps of each value
        Field("lcr", "u8"),
        Field("mcr", "u8", mask=0x1F),
        Field("lsr", "u8"),
        Field("msr", "u8"),
        Field("scr", "u8"),
        Field("fcr", "u8", mask=0xC9),
        Field("thr_ipending", "bool"),
        Field("rx", "bytes", max=FIFO_SIZE),
        Field("irq_level", "u8", since=2, default=-1, max=1),
    ),
    pre_save=lambda s: {**as_dict(s), "rx": bytes(s.rx)},
    post_load=_state_from,
    check=_check,
)


class Serial(LockedState):
    vmstate = VMSTATE

    def __init__(
        self,
        output: Callable[[bytes], None],
        set_irq: Callable[[int], None],
        *,
        name: str = "serial0",
        room_available: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.output = output
        self.set_irq = set_irq
        self.room_available = room_available  # the chardev may read again
        self.s = SerialState()
        self.lock = threading.Lock()

    def load_state(self, state: SerialState) -> None:
        """Take saved registers; the irqchip holds the line level, so only our view is set."""
        super().load_state(state)
        with self.lock:
            if state.irq_level < 0:  # state from before version 2
                state.irq_level = 0 if self._iir() & IIR_NO_INT else 1
        self.room_available()

    # --- the guest's side -------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            value = self._read(offset)
            self._update_irq()
        if offset == RBR_THR_DLL and not self.s.lcr & LCR_DLAB:
            self.room_available()
        return value

    def _read(self, offset: int) -> int:
        s = self.s
        if offset == RBR_THR_DLL:
            if s.lcr & LCR_DLAB:
                return s.divisor & 0xFF
            value = s.rx.popleft() if s.rx else 0
            if not s.rx:
                s.lsr &= ~LSR_DR
            return value
        if offset == IER_DLM:
            return (s.divisor >> 8) if s.lcr & LCR_DLAB else s.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                s.thr_ipending = False
            return iir
        if offset == LCR:
            return s.lcr
        if offset == MCR:
            return s.mcr
        if offset == LSR:
            value = s.lsr
            s.lsr &= ~(LSR_OE | LSR_BI)
            return value
        if offset == MSR:
            if s.mcr & MCR_LOOP:
                m = s.mcr
                return (
                    (MSR_CTS if m & MCR_RTS else 0)
                    | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0)
                    | (MSR_DCD if m & MCR_OUT2 else 0)
                )
            value = s.msr
            s.msr &= ~MSR_DELTAS
            return value
        return s.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        out = None
        with self.lock:
            s = self.s
            if offset == RBR_THR_DLL:
                if s.lcr & LCR_DLAB:
                    s.divisor = (s.divisor & 0xFF00) | value
                elif s.mcr & MCR_LOOP:
                    self._receive_byte(value)
                    s.thr_ipending = True
                else:
                    out = bytes((value,))
                    s.thr_ipending = True
            elif offset == IER_DLM:
                if s.lcr & LCR_DLAB:
                    s.divisor = (s.divisor & 0xFF) | (value << 8)
                else:
                    if value & IER_THRI and not s.ier & IER_THRI and s.lsr & LSR_THRE:
                        s.thr_ipending = True
                    s.ier = value & 0x0F
            elif offset == IIR_FCR:
                if value & FCR_CLEAR_RX:
                    s.rx.clear()
                    s.lsr &= ~LSR_DR
                if (value ^ s.fcr) & FCR_ENABLE:
                    s.rx.clear()
                    s.lsr &= ~LSR_DR
                s.fcr = value & 0xC9
            elif offset == LCR:
                s.lcr = value
            elif offset == MCR:
                s.mcr = value & 0x1F
            elif offset == SCR:
                s.scr = value
            self._update_irq()
        if out is not None:
            self.output(out)  # outside the lock: the chardev may block briefly

    def stable_reads(self) -> list[StableRead]:
        """An idle UART's line status (THR empty, nothing received, no error) stays 0x60 while nothing
        arrives: a byte written goes out at once, and only loopback (MCR bit 4) would bring one back in."""
        with self.lock:
            if self.s.lsr == LSR_THRE | LSR_TEMT and not self.s.mcr & MCR_LOOP:
                return [StableRead(LSR, 1, self.s.lsr, MCR, MCR_LOOP)]
        return []

    # --- the chardev's side ---------------------------------------------------
    def capacity(self) -> int:
        return FIFO_SIZE if self.s.fcr & FCR_ENABLE else 1

    def can_receive(self) -> int:
        with self.lock:
            return 0 if self.s.mcr & MCR_LOOP else max(0, self.capacity() - len(self.s.rx))

    def receive(self, data: bytes) -> None:
        with self.lock:
            for byte in data:
                self._receive_byte(byte)
            self._update_irq()

    def _receive_byte(self, byte: int) -> None:
        s = self.s
        if len(s.rx) >= self.capacity():
            s.lsr |= LSR_OE
            return
        s.rx.append(byte)
        s.lsr |= LSR_DR

    # --- interrupts ------------------------------------------------------------
    def _iir(self) -> int:
        s = self.s
        fifo = IIR_FIFO_ENABLED if s.fcr & FCR_ENABLE else 0
        if s.ier & IER_RLSI and s.lsr & LSR_ERRORS:
            return IIR_RLSI | fifo
        if s.ier & IER_RDI and s.lsr & LSR_DR:
            if fifo and len(s.rx) < TRIGGER_LEVELS[s.fcr >> 6]:
                return IIR_CTI | fifo
            return IIR_RDI | fifo
        if s.ier & IER_THRI and s.thr_ipending:
            return IIR_THRI | fifo
        if s.ier & IER_MSI and s.msr & MSR_DELTAS:
            return IIR_MSI | fifo
        return IIR_NO_INT | fifo

    def _update_irq(self) -> None:
        level = 0 if self._iir() & IIR_NO_INT else 1
        if level != self.s.irq_level:
            self.s.irq_level = level
            self.set_irq(level)

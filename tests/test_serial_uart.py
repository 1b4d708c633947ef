"""The 16550A's register behaviour, as drivers (Linux's 8250 among them) probe it."""

from minivmm.devices import serial as u


class Uart:
    def __init__(self):
        self.out = bytearray()
        self.irq = []
        self.dev = u.Serial(self.out.extend, self.irq.append)

    def rd(self, reg):
        return self.dev.read(reg, 1)

    def wr(self, reg, value):
        self.dev.write(reg, 1, value)


def test_idle_line_status_is_0x60_and_transmit_is_immediate():
    t = Uart()
    assert t.rd(u.LSR) == 0x60
    t.wr(u.RBR_THR_DLL, ord("x"))
    assert bytes(t.out) == b"x" and t.rd(u.LSR) == 0x60


def test_divisor_latch_and_scratch():
    t = Uart()
    t.wr(u.LCR, u.LCR_DLAB | 3)
    t.wr(u.RBR_THR_DLL, 0x01)
    t.wr(u.IER_DLM, 0x00)
    assert (t.rd(u.RBR_THR_DLL), t.rd(u.IER_DLM)) == (1, 0)
    t.wr(u.LCR, 3)
    t.wr(u.SCR, 0x5A)
    assert t.rd(u.SCR) == 0x5A and not t.out


def test_receive_fifo_data_ready_and_rx_interrupt():
    t = Uart()
    t.wr(u.IER_DLM, u.IER_RDI)
    assert t.rd(u.IIR_FCR) & 0x0F == u.IIR_NO_INT
    assert t.dev.can_receive() == 1  # 16450 mode: one holding register
    t.wr(u.IIR_FCR, u.FCR_ENABLE)  # FIFO on, trigger level 1
    assert t.dev.can_receive() == 16
    t.dev.receive(b"hi")
    assert t.irq[-1] == 1 and t.rd(u.LSR) & u.LSR_DR
    assert t.rd(u.IIR_FCR) == u.IIR_FIFO_ENABLED | u.IIR_RDI
    assert bytes([t.rd(u.RBR_THR_DLL), t.rd(u.RBR_THR_DLL)]) == b"hi"
    assert not t.rd(u.LSR) & u.LSR_DR and t.irq[-1] == 0


def test_below_trigger_level_raises_character_timeout():
    t = Uart()
    t.wr(u.IIR_FCR, u.FCR_ENABLE | 0xC0)  # trigger level 14
    t.wr(u.IER_DLM, u.IER_RDI)
    t.dev.receive(b"a")
    assert t.rd(u.IIR_FCR) & 0x0F == u.IIR_CTI


def test_thr_empty_interrupt_is_cleared_by_reading_iir():
    t = Uart()
    t.wr(u.IER_DLM, u.IER_THRI)
    assert t.irq == [1] and t.rd(u.IIR_FCR) & 0x0F == u.IIR_THRI
    assert t.rd(u.IIR_FCR) & 0x0F == u.IIR_NO_INT and t.irq == [1, 0]
    t.wr(u.RBR_THR_DLL, ord("a"))  # writing THR makes it empty again: interrupt
    assert t.irq == [1, 0, 1]


def test_loopback_as_linux_autoconfig_checks_it():
    t = Uart()
    t.wr(u.MCR, u.MCR_LOOP | 0x0A)  # loop + RTS + OUT2
    assert t.rd(u.MSR) & 0xF0 == 0x90  # CTS and DCD follow RTS and OUT2
    t.wr(u.IIR_FCR, u.FCR_ENABLE)
    t.wr(u.RBR_THR_DLL, 0x55)
    assert t.rd(u.RBR_THR_DLL) == 0x55 and not t.out  # looped back, not transmitted
    assert t.dev.can_receive() == 0  # no outside input while looping back


def test_overrun_when_the_holding_register_is_full():
    t = Uart()
    t.wr(u.MCR, u.MCR_LOOP)
    t.wr(u.RBR_THR_DLL, 1)
    t.wr(u.RBR_THR_DLL, 2)
    lsr = t.rd(u.LSR)
    assert lsr & u.LSR_OE and lsr & u.LSR_DR
    assert not t.rd(u.LSR) & u.LSR_OE  # reading LSR clears the overrun

"""The i8042 keyboard controller, as far as small guests and Linux use it:
self-tests, the command byte, and the CPU reset line (0xfe to port 0x64, or
output-port bit 0 cleared), which is how ``reboot=k`` resets the machine.
No keyboard or mouse is attached.

A real i8042 has a one-byte output buffer; replies wait here in a queue of
at most QUEUE_SIZE bytes (QEMU's PS/2 queue is bounded too), and a reply
that finds it full is dropped, so a guest that issues commands without
reading cannot grow it. The controller answers at 0x60 (offset 0) and 0x64
(offset 4); port 0x61 between them is the PIT's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.devices.state import LockedState
from minivmm.vmstate import VMSD, Field, as_dict

STATUS_OBF, STATUS_SYS, STATUS_CMD = 0x01, 0x04, 0x08
CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_AUX_DISABLE, CMD_AUX_ENABLE, CMD_AUX_TEST = 0xA7, 0xA8, 0xA9
CMD_SELF_TEST, CMD_KBD_TEST, CMD_KBD_DISABLE, CMD_KBD_ENABLE = 0xAA, 0xAB, 0xAD, 0xAE
CMD_READ_OUTPORT, CMD_WRITE_OUTPORT, CMD_PULSE_RESET = 0xD0, 0xD1, 0xFE
CTR_KBD_DISABLED, CTR_SYS = 0x10, 0x04
OUTPORT_RESET_DEASSERTED, OUTPORT_A20 = 0x01, 0x02
DATA, COMMAND = 0, 4  # offsets of ports 0x60 and 0x64
QUEUE_SIZE = 16


@dataclass
class I8042State:
    status: int = STATUS_SYS
    ctr: int = CTR_SYS | CTR_KBD_DISABLED
    outport: int = OUTPORT_RESET_DEASSERTED | OUTPORT_A20
    pending: int = 0  # the command waiting for its data byte
    queue: deque = field(default_factory=deque)


VMSTATE = VMSD(
    "i8042",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("status", "u8"),
        Field("ctr", "u8"),
        Field("outport", "u8"),
        Field("pending", "u8", choices=frozenset({0, CMD_WRITE_CTR, CMD_WRITE_OUTPORT})),
        Field("queue", "bytes", max=QUEUE_SIZE),
    ),
    pre_save=lambda s: {**as_dict(s), "queue": bytes(s.queue)},
    post_load=lambda v: I8042State(**{**v, "queue": deque(v["queue"])}),
)


class I8042(LockedState):
    name = "i8042"
    vmstate = VMSTATE

    def __init__(self, reset_machine: Callable[[], None]) -> None:
        self.reset_machine = reset_machine
        self.s = I8042State()
        self.lock = threading.Lock()

    def _reply(self, byte: int) -> None:
        if len(self.s.queue) < QUEUE_SIZE:
            self.s.queue.append(byte)

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            s = self.s
            if offset == COMMAND:  # status
                return s.status | (STATUS_OBF if s.queue else 0)
            if offset != DATA:
                return 0xFF
            return s.queue.popleft() if s.queue else 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        do_reset = False
        if offset not in (DATA, COMMAND):
            return
        with self.lock:
            s = self.s
            if offset == COMMAND:
                s.status |= STATUS_CMD
                s.pending = 0
                if value == CMD_READ_CTR:
                    self._reply(s.ctr)
                elif value in (CMD_WRITE_CTR, CMD_WRITE_OUTPORT):
                    s.pending = value
                elif value == CMD_SELF_TEST:
                    self._reply(0x55)
                elif value in (CMD_KBD_TEST, CMD_AUX_TEST):
                    self._reply(0x00)
                elif value == CMD_KBD_DISABLE:
                    s.ctr |= CTR_KBD_DISABLED
                elif value == CMD_KBD_ENABLE:
                    s.ctr &= ~CTR_KBD_DISABLED
                elif value == CMD_READ_OUTPORT:
                    self._reply(s.outport)
                elif value & 0xF0 == 0xF0 and not value & 1:  # pulse output lines: bit 0 is reset
                    do_reset = True
            else:
                s.status &= ~STATUS_CMD
                if s.pending == CMD_WRITE_CTR:
                    s.ctr = value
                elif s.pending == CMD_WRITE_OUTPORT:
                    s.outport = value
                    do_reset = not value & OUTPORT_RESET_DEASSERTED
                # anything else is a keyboard command, and no keyboard is attached
                s.pending = 0
        if do_reset:
            self.reset_machine()

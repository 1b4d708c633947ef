"""Register state shared between vCPU threads and the main loop."""

from __future__ import annotations

import copy
import threading
from typing import Any

from minivmm.devices.device import Device


class LockedState(Device):
    """A device whose registers are one dataclass, ``s``, guarded by ``lock``.

    vCPU threads (port I/O) and the main loop (chardev input, migration) both
    touch it. A saved state is a deep copy, so FIFOs and CMOS bytes in a
    snapshot do not change as the guest runs on.
    """

    s: Any
    lock: threading.Lock

    def reset(self) -> None:
        """Back to the power-on registers: a fresh ``s`` of its dataclass."""
        with self.lock:
            self.s = type(self.s)()
            self._state_changed()

    def save_state(self) -> Any:
        with self.lock:
            return copy.deepcopy(self.s)

    def load_state(self, state: Any) -> None:
        with self.lock:
            self.s = state
            self._state_changed()

    def _state_changed(self) -> None:
        """What follows from registers set all at once (a reset, a load), lock held: a device
        with outputs, routes or timers derived from its registers brings them in line here."""

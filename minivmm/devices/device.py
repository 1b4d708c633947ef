"""What every device gives the machine: a lifecycle the builder and the
migration code rely on, declared rather than guessed.

- ``read``/``write``: guest accesses at (offset, size) in the device's range;
  they must take any value a guest can produce and never raise.
- ``reset``: back to the power-on state (system_reset, a guest reboot).
- the persist part, optional: ``vmstate`` (the state description, or None
  for a device with nothing to keep), ``save_state`` and ``load_state``.
- ``latch``, optional: for a device whose writes only store the value and
  count it (the post-code port), those registers, so the C run loop does
  the writes without returning to Python.
- ``stable_reads``, optional: registers whose value cannot change while the
  VMM is away (a cpr-exec's keeper answers them, cpr/keeper.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minivmm.kvm.runloop import Latch
from minivmm.vmstate import VMSD


@dataclass(frozen=True)
class StableRead:
    """A read of ``size`` bytes at ``offset`` that gives ``value`` as long as no write to ``spoil_offset``
    has a bit of ``spoil_mask`` set (nothing else the guest can do changes it, and nothing arrives)."""

    offset: int
    size: int
    value: int
    spoil_offset: int
    spoil_mask: int


class Device:
    name: str = "device"
    vmstate: VMSD | None = None  # a device with state declares its description here
    latch: Latch | None = None  # a device whose writes are a kvm.runloop.Latch's store and count

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        """Nothing to do for a device without state."""

    def stable_reads(self) -> list[StableRead]:
        """Reads a keeper may answer while the VMM is away (the device is stopped: nothing arrives)."""
        return []

    def save_state(self) -> Any:
        raise NotImplementedError(f"{self.name} has no state to save")

    def load_state(self, state: Any) -> None:
        raise NotImplementedError(f"{self.name} has no state to load")

"""The machine core: one KVM VM with its RAM, devices, vCPUs and run state.

- machine.py: Machine, the four parts below held together (start, run, reset, close)
- builder.py: building it from a MachineConfig, in the order KVM needs
- ram.py: guest RAM, the MMIO hole, the -bios ROM and the memory slots
- devices.py: the device tables (the board, -device models) and the buses
- vcpus.py: creating the vCPUs and pausing/resuming their threads
- control.py: QEMU's run states, events and shutdown/reset/panic requests
"""

from .control import ShutdownRequest
from .errors import MachineError
from .machine import Machine

__all__ = ["Machine", "MachineError", "ShutdownRequest"]

"""VM-wide KVM state: the three irqchips and the PIT (when KVM emulates them)
and the clock, saved and restored as QEMU's kvm devices do.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from minivmm.kvm import constants as c
from minivmm.kvm import structs as s
from minivmm.kvm.system import Vm
from minivmm.vmstate import VMSD, Field

IRQCHIP_VMSTATE = VMSD("kvm-irqchip", 1, 1, (Field("chip", "bytes", size=ctypes.sizeof(s.kvm_irqchip)),))
PIT_VMSTATE = VMSD("kvm-pit", 1, 1, (Field("pit", "bytes", size=ctypes.sizeof(s.kvm_pit_state2)),))
CLOCK_VMSTATE = VMSD("kvmclock", 1, 1, (Field("clock", "u64"), Field("flags", "u32"), Field("realtime", "u64")))


@dataclass
class VmState:
    irqchips: list[bytes]  # none with kernel-irqchip=split
    pit: bytes | None  # none without KVM's PIT
    clock: dict


def save(vm: Vm, irqchips: bool, pit: bool) -> VmState:
    clock = vm.get_clock()
    return VmState(
        irqchips=[bytes(vm.get_irqchip(i)) for i in range(3)] if irqchips else [],
        pit=bytes(vm.get_pit2()) if pit else None,
        clock={"clock": clock.clock, "flags": clock.flags, "realtime": clock.realtime},
    )


def restore(vm: Vm, state: VmState, clock_flags_supported: int) -> None:
    if state.pit is not None:
        vm.set_pit2(s.kvm_pit_state2.from_buffer_copy(state.pit))
    # With KVM_CLOCK_REALTIME the kernel advances the clock by the real time
    # that passed since the save, so the guest's wall clock does not lag.
    flags = state.clock["flags"] & clock_flags_supported & c.KVM_CLOCK_REALTIME
    vm.set_clock(s.kvm_clock_data(clock=state.clock["clock"], flags=flags, realtime=state.clock["realtime"]))
    for chip in state.irqchips:
        vm.set_irqchip(s.kvm_irqchip.from_buffer_copy(chip))

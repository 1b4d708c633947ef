"""Saving and restoring a vCPU's whole state, in the order KVM needs.

Order (BOOT.md): save MP_STATE, REGS, SREGS, XSAVE (or FPU), XCRS, DEBUGREGS,
LAPIC, MSRs, VCPU_EVENTS last; restore CPUID first (done at creation), then
MP_STATE, REGS, SREGS (sets the APIC base), XSAVE, XCRS, DEBUGREGS, LAPIC
(before MSRs: the TSC-deadline MSR needs the LAPIC), MSRs, VCPU_EVENTS.
A machine reset restores the snapshot each vCPU had when it was created.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from minivmm.kvm import structs as s
from minivmm.kvm.system import Vcpu


@dataclass
class VcpuState:
    mp_state: int
    regs: s.kvm_regs
    sregs: s.kvm_sregs
    fpu: s.kvm_fpu | None
    xsave: ctypes.Structure | None
    xcrs: s.kvm_xcrs | None
    debugregs: s.kvm_debugregs
    lapic: s.kvm_lapic_state
    msrs: dict[int, int]
    events: s.kvm_vcpu_events


@dataclass(frozen=True)
class StateCaps:
    """What this host can save; decided once per machine."""

    xsave_size: int  # 0: no XSAVE, use KVM_GET_FPU
    xcrs: bool
    msr_indices: tuple[int, ...]


def save(vcpu: Vcpu, caps: StateCaps) -> VcpuState:
    mp_state = vcpu.get_mp_state()
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    xsave = vcpu.get_xsave(caps.xsave_size) if caps.xsave_size else None
    fpu = None if xsave is not None else vcpu.get_fpu()
    xcrs = vcpu.get_xcrs() if caps.xcrs else None
    debugregs = vcpu.get_debugregs()
    lapic = vcpu.get_lapic()
    msrs = vcpu.get_msrs(list(caps.msr_indices))
    events = vcpu.get_vcpu_events()
    return VcpuState(mp_state, regs, sregs, fpu, xsave, xcrs, debugregs, lapic, msrs, events)


def restore(vcpu: Vcpu, state: VcpuState) -> None:
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(state.regs)
    vcpu.set_sregs(state.sregs)
    if state.xsave is not None:
        vcpu.set_xsave(state.xsave)
    else:
        vcpu.set_fpu(state.fpu)
    if state.xcrs is not None:
        vcpu.set_xcrs(state.xcrs)
    vcpu.set_debugregs(state.debugregs)
    vcpu.set_lapic(state.lapic)
    vcpu.set_msrs(state.msrs)
    vcpu.set_vcpu_events(state.events)

"""Saving and restoring a vCPU's whole state, in the order KVM needs.

Order (docs/boot.md): save MP_STATE, REGS, SREGS, XSAVE (or FPU), XCRS, DEBUGREGS,
LAPIC, MSRs, VCPU_EVENTS last; restore CPUID first (done at creation), then
MP_STATE, REGS, SREGS (sets the APIC base), XSAVE, XCRS, DEBUGREGS, LAPIC
(before MSRs: the TSC-deadline MSR needs the LAPIC), MSRs, VCPU_EVENTS.
A machine reset restores the snapshot each vCPU had when it was created.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from minivmm.kvm import structs as s
from minivmm.kvm.system import KvmError, Vcpu
from minivmm.vmstate import VMSD, Field, Subsection


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
    tsc_khz: int = 0
    # The ExtINT vector a userspace PIC handed KVM (KVM_INTERRUPT, split irqchip) that the guest has
    # not taken yet: KVM holds it apart from the events KVM_GET_VCPU_EVENTS reports, so the saver
    # fills it in (machine/irqchip.py) and restore() hands it to the new vCPU again. -1: none.
    extint: int = -1


@dataclass(frozen=True)
class StateCaps:
    """What this host can save and restore; decided once per machine, on its first vCPU."""

    xsave_size: int  # 0: no XSAVE, use KVM_GET_FPU
    xcrs: bool
    msr_indices: tuple[int, ...]
    tsc_khz: int = 0  # this host's guest TSC frequency (KVM_GET_TSC_KHZ)
    tsc_scaling: bool = False  # KVM_CAP_TSC_CONTROL: KVM_SET_TSC_KHZ can give a vCPU another frequency


TSC_TOLERANCE_PPM = 250  # the kernel's own tolerance: closer frequencies are the same clock


def tsc_problem(saved_khz: int, caps: StateCaps) -> str | None:
    """Why a vCPU saved at ``saved_khz`` cannot run here at its own TSC frequency, or None."""
    if not saved_khz or not caps.tsc_khz or caps.tsc_scaling:
        return None
    if abs(saved_khz - caps.tsc_khz) * 1_000_000 <= caps.tsc_khz * TSC_TOLERANCE_PPM:
        return None
    return (
        f"TSC frequency mismatch between the saved VM ({saved_khz} kHz) and this host ({caps.tsc_khz} kHz), "
        "and TSC scaling is unavailable"
    )


def save(vcpu: Vcpu, caps: StateCaps) -> VcpuState:
    """The whole state, vCPU paused. MP_STATE first (KVM settles a pending INIT/SIPI on
    reading it); VCPU_EVENTS last, so the pending exception and interrupt it reports are
    the ones left after everything else was read."""
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
    tsc_khz = vcpu.get_tsc_khz()
    return VcpuState(mp_state, regs, sregs, fpu, xsave, xcrs, debugregs, lapic, msrs, events, tsc_khz)


def restore(vcpu: Vcpu, state: VcpuState, caps: StateCaps | None = None) -> None:
    """Put a saved state back (CPUID was set when the vCPU was created, before any MSR)."""
    if caps is not None and caps.tsc_scaling and state.tsc_khz and state.tsc_khz != caps.tsc_khz:
        vcpu.set_tsc_khz(state.tsc_khz)  # first: the TSC MSR below is read at this frequency
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(state.regs)
    vcpu.set_sregs(state.sregs)  # sets CR0/CR4/EFER and the APIC base, which what follows depends on
    if state.xsave is not None:
        vcpu.set_xsave(state.xsave)  # after SREGS: CR4.OSXSAVE decides which components load
    else:
        vcpu.set_fpu(state.fpu)
    if state.xcrs is not None:
        vcpu.set_xcrs(state.xcrs)
    vcpu.set_debugregs(state.debugregs)
    vcpu.set_lapic(state.lapic)  # before MSRs: the TSC-deadline MSR needs the LAPIC in place
    vcpu.set_msrs(state.msrs)
    vcpu.set_vcpu_events(state.events)  # last: pending events are injected on top of the rest
    if state.extint >= 0:
        vcpu.interrupt(state.extint)


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> tuple[int, ...]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST this vCPU can read (KVM_GET_MSRS stops at the first it cannot)."""
    if len(vcpu.get_msrs(indices)) == len(indices):
        return tuple(indices)  # the usual case: one ioctl
    keep = []
    for index in indices:
        try:
            if vcpu.get_msrs([index]):
                keep.append(index)
        except KvmError:
            pass
    return tuple(keep)


# --- the saved form -----------------------------------------------------------------

MSR_VMSD = VMSD("msr", 1, 1, (Field("index", "u32"), Field("value", "u64")))
MAX_IO_MSRS = 255  # KVM_SET_MSRS takes fewer than 256 at once (E2BIG)
XSAVE_MAX = 64 << 10  # KVM_GET_XSAVE2 sizes are a few KiB (11 KiB with AMX)
# MP states an x86 vCPU can be in (KVM_SET_MP_STATE refuses the others).
MP_STATES = frozenset({0, 1, 2, 3, 4, 9, 10})


def _check(v: dict) -> tuple[str, str] | None:
    """XSAVE or FPU, not neither: restore() sets one of them."""
    n = len(v["xsave"])
    if n and not s.KVM_XSAVE_LEGACY_SIZE <= n <= XSAVE_MAX:
        return "xsave", f"expected 0 or {s.KVM_XSAVE_LEGACY_SIZE} to {XSAVE_MAX} bytes, got {n}"
    if not n and not v["fpu"]:
        return "fpu", "neither XSAVE nor FPU state: one is needed"
    return None


def _pre_save(st: VcpuState) -> dict:
    return {
        "mp_state": st.mp_state,
        "regs": bytes(st.regs),
        "sregs": bytes(st.sregs),
        "fpu": bytes(st.fpu) if st.fpu is not None else b"",
        "xsave": bytes(st.xsave) if st.xsave is not None else b"",
        "xcrs": bytes(st.xcrs) if st.xcrs is not None else b"",
        "debugregs": bytes(st.debugregs),
        "lapic": bytes(st.lapic),
        "msrs": [{"index": i, "value": v} for i, v in st.msrs.items()],
        "events": bytes(st.events),
        "tsc_khz": st.tsc_khz,
    }


def _post_load(v: dict) -> VcpuState:
    xsave = s.xsave_with(len(v["xsave"])).from_buffer_copy(v["xsave"]) if v["xsave"] else None
    return VcpuState(
        mp_state=v["mp_state"],
        regs=s.kvm_regs.from_buffer_copy(v["regs"]),
        sregs=s.kvm_sregs.from_buffer_copy(v["sregs"]),
        fpu=s.kvm_fpu.from_buffer_copy(v["fpu"]) if v["fpu"] else None,
        xsave=xsave,
        xcrs=s.kvm_xcrs.from_buffer_copy(v["xcrs"]) if v["xcrs"] else None,
        debugregs=s.kvm_debugregs.from_buffer_copy(v["debugregs"]),
        lapic=s.kvm_lapic_state.from_buffer_copy(v["lapic"]),
        msrs={m["index"]: m["value"] for m in v["msrs"]},
        events=s.kvm_vcpu_events.from_buffer_copy(v["events"]),
        tsc_khz=v["tsc_khz"],
        extint=v.get("extint", -1),
    )


EXTINT_VMSD = VMSD("vcpu/extint", 1, 1, (Field("extint", "u8"),))


VMSTATE = VMSD(
    "vcpu",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("mp_state", "u32", choices=MP_STATES),
        Field("regs", "bytes", size=ctypes.sizeof(s.kvm_regs)),
        Field("sregs", "bytes", size=ctypes.sizeof(s.kvm_sregs)),
        Field("fpu", "bytes", size=(0, ctypes.sizeof(s.kvm_fpu))),  # empty when XSAVE is saved
        Field("xsave", "bytes", max=XSAVE_MAX),
        Field("xcrs", "bytes", size=(0, ctypes.sizeof(s.kvm_xcrs))),
        Field("debugregs", "bytes", size=ctypes.sizeof(s.kvm_debugregs)),
        Field("lapic", "bytes", size=ctypes.sizeof(s.kvm_lapic_state)),
        Field("msrs", MSR_VMSD, is_list=True, max=MAX_IO_MSRS),
        Field("events", "bytes", size=ctypes.sizeof(s.kvm_vcpu_events)),
        Field("tsc_khz", "u32"),
    ),
    subsections=(Subsection(EXTINT_VMSD, lambda st: st.extint >= 0),),
    pre_save=_pre_save,
    post_load=_post_load,
    check=_check,
)

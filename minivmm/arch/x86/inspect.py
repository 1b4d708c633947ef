"""Human-readable CPU context for error messages (and the monitor)."""

from __future__ import annotations

from minivmm.kvm.system import KvmError, Vcpu
from minivmm.memory import GuestMemory

from .modes import CR0_PE, CR0_PG


def cpu_mode(sregs) -> str:
    if not sregs.cr0 & CR0_PE:
        return "real mode"
    if sregs.cs.l:
        return "long mode"
    return "protected mode" + (" (paging)" if sregs.cr0 & CR0_PG else "")


def instruction_bytes(vcpu: Vcpu, mem: GuestMemory, rip: int, sregs, count: int = 16) -> bytes | None:
    linear = rip if sregs.cs.l else (sregs.cs.base + rip) & 0xFFFFFFFF
    gpa = linear
    if sregs.cr0 & CR0_PG:
        try:
            tr = vcpu.translate(linear)
        except KvmError:
            return None
        if not tr.valid:
            return None
        gpa = tr.physical_address
    for n in (count, 8, 1):
        if mem.is_ram(gpa, n):
            return mem.read(gpa, n)
    return None


def describe(vcpu: Vcpu, mem: GuestMemory) -> str:
    """``RIP=... CS=... (long mode, CPL0) code: 0f 01 d0 ...``"""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except KvmError as e:
        return f"(registers unavailable: {e})"
    mode = cpu_mode(sregs)
    if sregs.cr0 & CR0_PE:
        mode += f", CPL{sregs.cs.selector & 3}"
    text = f"RIP={regs.rip:#x} CS={sregs.cs.selector:#06x} base {sregs.cs.base:#x} ({mode})"
    code = instruction_bytes(vcpu, mem, regs.rip, sregs)
    if code:
        text += " code: " + " ".join(f"{b:02x}" for b in code)
    return text

"""ctypes mirrors of the KVM structures minivmm uses (x86-64).

Field names and layout follow <linux/kvm.h> and <asm/kvm.h> exactly;
tests/test_kvm_abi.py compiles a C program against those headers and checks
every size and offset here. Structures ending in a flexible array are built
by the ``*_with(n)`` helpers.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, Union, c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64
from functools import cache

u8, u16, u32, u64, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32, c_int64

KVM_NR_INTERRUPTS = 256
KVM_APIC_REG_SIZE = 0x400
KVM_IOAPIC_NUM_PINS = 24
KVM_MAX_XCRS = 16
KVM_XSAVE_LEGACY_SIZE = 4096


_GPRS = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"


class kvm_regs(Structure):
    _fields_ = [(name, u64) for name in _GPRS.split()]


class kvm_segment(Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


_SEGMENTS = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]


class kvm_sregs(Structure):
    _fields_ = (
        [(name, kvm_segment) for name in _SEGMENTS]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(name, u64) for name in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
        + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]
    )


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xsave(Structure):
    """The legacy 4 KiB XSAVE area; KVM_GET_XSAVE2 may need more (xsave_with)."""

    _fields_ = [("region", u32 * 1024)]


@cache
def xsave_with(size: int) -> type[Structure]:
    """An XSAVE buffer of ``size`` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2))."""
    words = max(size, KVM_XSAVE_LEGACY_SIZE) // 4
    return type(f"kvm_xsave_{size}", (Structure,), {"_fields_": [("region", u32 * words)]})


class kvm_xcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_msr_entry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


@cache
def msrs_with(n: int) -> type[Structure]:
    return type(f"kvm_msrs_{n}", (Structure,), {"_fields_": [*kvm_msrs._fields_, ("entries", kvm_msr_entry * n)]})


class kvm_msr_list(Structure):
    _fields_ = [("nmsrs", u32)]


@cache
def msr_list_with(n: int) -> type[Structure]:
    return type(f"kvm_msr_list_{n}", (Structure,), {"_fields_": [*kvm_msr_list._fields_, ("indices", u32 * n)]})


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


@cache
def cpuid2_with(n: int) -> type[Structure]:
    return type(
        f"kvm_cpuid2_{n}", (Structure,), {"_fields_": [*kvm_cpuid2._fields_, ("entries", kvm_cpuid_entry2 * n)]}
    )


class kvm_lapic_state(Structure):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class _events_exception(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _events_interrupt(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _events_nmi(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _events_smi(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _events_triple_fault(Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _events_smi),
        ("triple_fault", _events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", u32)]


class kvm_debugregs(Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


_PIC_FIELDS = (
    "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
    "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr elcr_mask"
)


class kvm_pic_state(Structure):
    _fields_ = [(name, u8) for name in _PIC_FIELDS.split()]


class kvm_ioapic_state(Structure):
    # redirtbl entries are a union of u64 bits and a bitfield view; bits suffice.
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_pit_channel_state(Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_pit_config(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_reinject_control(Structure):
    _fields_ = [("pit_reinject", u8), ("reserved", u8 * 31)]


class kvm_clock_data(Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_irq_level(Structure):
    _fields_ = [("irq", u32), ("level", u32)]  # irq shares its slot with s32 status


class kvm_translation(Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class kvm_dirty_log(Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_create_device(Structure):
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


class kvm_device_attr(Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_interrupt(Structure):
    _fields_ = [("irq", u32)]


class kvm_irq_routing_irqchip(Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("pad", u32)]


class _routing_u(Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _routing_u)]


class kvm_irq_routing(Structure):
    _fields_ = [("nr", u32), ("flags", u32)]


def irq_routing_with(n: int) -> type[Structure]:
    return type(
        f"kvm_irq_routing_{n}",
        (Structure,),
        {"_fields_": [*kvm_irq_routing._fields_, ("entries", kvm_irq_routing_entry * n)]},
    )


class kvm_enable_cap(Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_ioeventfd(Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_irqfd(Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_msi(Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_coalesced_mmio_zone(Structure):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]  # pio shares its slot with pad


class kvm_coalesced_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(Structure):
    """The ring's head; its entries fill the rest of the page (coalesced_mmio_ring_with)."""

    _fields_ = [("first", u32), ("last", u32)]


KVM_COALESCED_MMIO_MAX = (4096 - ctypes.sizeof(kvm_coalesced_mmio_ring)) // ctypes.sizeof(kvm_coalesced_mmio)


@cache
def coalesced_mmio_ring_with(n: int) -> type[Structure]:
    fields = [*kvm_coalesced_mmio_ring._fields_, ("coalesced_mmio", kvm_coalesced_mmio * n)]
    return type(f"kvm_coalesced_mmio_ring_{n}", (Structure,), {"_fields_": fields})


# --- struct kvm_run and its exit unions -------------------------------------


class _run_hw(Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_ex(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_io(Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_debug_exit_arch(Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _run_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _run_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_internal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_emulation_failure(Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _run_system_event(Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_msr(Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class _run_eoi(Structure):
    _fields_ = [("vector", u8)]


class _run_exit(Union):
    _fields_ = [
        ("hw", _run_hw),
        ("fail_entry", _run_fail_entry),
        ("ex", _run_ex),
        ("io", _run_io),
        ("debug", _run_debug),
        ("mmio", _run_mmio),
        ("internal", _run_internal),
        ("emulation_failure", _run_emulation_failure),
        ("system_event", _run_system_event),
        ("msr", _run_msr),
        ("eoi", _run_eoi),
        ("padding", c_char * 256),
    ]


class kvm_run(Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _run_exit),  # the anonymous union in C: io, mmio, ... live here
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", c_char * 2048),
    ]


# Offsets the run loop reads with struct.unpack_from instead of ctypes attributes.
RUN_OFFSET_IMMEDIATE_EXIT = kvm_run.immediate_exit.offset
RUN_OFFSET_EXIT_REASON = kvm_run.exit_reason.offset
RUN_OFFSET_EXIT = kvm_run.exit.offset

assert ctypes.sizeof(kvm_run) == 2352

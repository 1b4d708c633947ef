"""Model-specific registers: indices and the values every vCPU boots with."""

IA32_TSC = 0x10
IA32_APIC_BASE = 0x1B
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_MISC_ENABLE = 0x1A0
IA32_MTRR_DEF_TYPE = 0x2FF
IA32_TSC_DEADLINE = 0x6E0
EFER = 0xC0000080
STAR = 0xC0000081
LSTAR = 0xC0000082
CSTAR = 0xC0000083
SYSCALL_MASK = 0xC0000084
KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NX = 1 << 11

APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11


def boot_msrs() -> dict[int, int]:
    """The MSRs set on every vCPU before it first runs (docs/boot.md, building a machine)."""
    return {
        IA32_SYSENTER_CS: 0,
        IA32_SYSENTER_ESP: 0,
        IA32_SYSENTER_EIP: 0,
        STAR: 0,
        CSTAR: 0,
        KERNEL_GS_BASE: 0,
        SYSCALL_MASK: 0,
        LSTAR: 0,
        IA32_TSC: 0,
        IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        IA32_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
    }

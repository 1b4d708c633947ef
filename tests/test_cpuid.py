"""-cpu parsing and the per-vCPU CPUID patching (topology, APIC ids)."""

import pytest

from minivmm.arch.x86 import cpuid
from minivmm.kvm.structs import kvm_cpuid_entry2


def table():
    def e(function, index=0, flags=0, eax=0, ebx=0, ecx=0, edx=0):
        return kvm_cpuid_entry2(function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)

    return [
        e(0, eax=0xD),
        e(1, eax=0xA0671, ecx=(1 << 13) | (1 << 26) | (1 << 28), edx=1 << 28),
        e(7, flags=1, ebx=1 << 5),
        e(0xB, flags=1, ecx=0x100),
        e(0xD, flags=1, eax=7),
        e(0xD, index=1, flags=1, eax=1),
        e(0x80000001, edx=1 << 29),
    ]


def test_parse_and_apply_with_dependencies():
    model = cpuid.CpuModel.parse("host,-xsave,cx16=off,+sse4.2")
    assert model.remove == ["xsave", "cx16"] and model.add == ["sse4.2"]
    warnings = []
    out = model.apply(table(), warn=warnings.append)
    assert not cpuid.has_feature(out, "cx16")
    assert not cpuid.has_feature(out, "avx")  # avx needs xsave
    assert not cpuid.has_feature(out, "avx2")  # and avx2 needs avx
    assert all(e.function != 0xD for e in out)
    assert warnings == ["warning: host doesn't support requested feature: CPUID[eax=01h].ECX.sse4.2 [bit 20]"]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("pentium", "unable to find CPU model 'pentium'"),
        ("host,+warp", "unknown CPU feature 'warp'"),
        ("host,avx=maybe", "doesn't take value 'maybe'"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(cpuid.CpuModelError, match=message):
        cpuid.CpuModel.parse(spec)


def test_per_vcpu_topology():
    out = cpuid.for_vcpu(table(), apic_id=2, ncpus=3)
    leaf1 = next(e for e in out if e.function == 1)
    assert leaf1.ebx >> 24 == 2 and (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ecx >> 31 == 1  # hypervisor bit
    topo = sorted((e.index, e.eax, e.ebx, e.ecx >> 8, e.edx) for e in out if e.function == 0xB)
    assert topo == [(0, 0, 1, 1, 2), (1, 2, 3, 2, 2), (2, 0, 0, 0, 2)]
    single = next(e for e in cpuid.for_vcpu(table(), 0, 1) if e.function == 1)
    assert not single.edx & (1 << 28)  # no HTT with one CPU


def test_named_models_mask_what_kvm_offers_and_set_vendor_and_signature():
    host = table()
    out = cpuid.CpuModel.parse("qemu64,+x2apic,+tsc-deadline").apply(host, warn=lambda m: None)
    leaf0 = next(e for e in out if e.function == 0)
    vendor = b"".join(x.to_bytes(4, "little") for x in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor == b"AuthenticAMD"
    leaf1 = next(e for e in out if e.function == 1)
    assert (leaf1.eax >> 8) & 0xF == 15 and (leaf1.eax >> 16) & 0xF == 6 and (leaf1.eax >> 4) & 0xF == 11  # 107
    assert cpuid.has_feature(out, "cx16") and not cpuid.has_feature(out, "xsave")  # qemu64 has no XSAVE
    assert not cpuid.has_feature(out, "avx2")  # leaf 7 features are not qemu64's
    assert all(e.function != 0xD for e in out)
    intel = cpuid.CpuModel.parse("Opteron_G1,vendor=GenuineIntel").apply(host)
    leaf0 = next(e for e in intel if e.function == 0)
    assert leaf0.ebx.to_bytes(4, "little") == b"Genu"


def test_nested_svm_and_lam_features_are_known_and_warned_about_when_the_host_lacks_them():
    """kvm-unit-tests' lines pass +npt and +lam; QEMU takes them and warns where KVM lacks them."""
    warnings = []
    cpuid.CpuModel.parse("max,+npt,+lam").apply(table(), warn=warnings.append)
    assert sorted(warnings) == [
        "warning: host doesn't support requested feature: CPUID[eax=07h,ecx=01h].EAX.lam [bit 26]",
        "warning: host doesn't support requested feature: CPUID[eax=8000000ah].EDX.npt [bit 0]",
    ]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("qemu64,hv_passthrough", "Hyper-V enlightenments are not supported"),
        ("max,vendor=Intel", "must be 12 characters"),
        ("host,+vmx-exit-nosave-debugctl", r"'vmx-exit-nosave-debugctl': nested VMX capability controls \(vmx-\*\)"),
    ],
)
def test_model_properties_minivmm_cannot_honour_are_named(spec, message):
    with pytest.raises(cpuid.CpuModelError, match=message):
        cpuid.CpuModel.parse(spec)
    assert cpuid.CpuModel.parse("max,host-phys-bits,migratable=no").name == "max"

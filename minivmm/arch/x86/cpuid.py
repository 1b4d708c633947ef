"""Guest CPUID: what KVM supports, edited by ``-cpu host,+feat,-feat`` and
patched per vCPU with its APIC id and the machine's topology.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from minivmm.kvm.structs import kvm_cpuid_entry2

# name -> (leaf, subleaf, register, bit); names as QEMU spells them.
_LEAF1_EDX = (
    "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 pn clflush - ds acpi mmx "
    "fxsr sse sse2 ss ht tm ia64 pbe"
)
_LEAF1_ECX = (
    "pni pclmulqdq dtes64 monitor ds-cpl vmx smx est tm2 ssse3 cid - fma cx16 xtpr pdcm - pcid dca "
    "sse4.1 sse4.2 x2apic movbe popcnt tsc-deadline aes xsave osxsave avx f16c rdrand hypervisor"
)
_LEAF7_EBX = (
    "fsgsbase tsc-adjust sgx bmi1 hle avx2 - smep bmi2 erms invpcid rtm - - mpx - avx512f avx512dq rdseed "
    "adx smap avx512ifma - clflushopt clwb - avx512pf avx512er avx512cd sha-ni avx512bw avx512vl"
)
_LEAF7_ECX = (
    "- avx512vbmi umip pku - waitpkg avx512vbmi2 - gfni vaes vpclmulqdq avx512vnni avx512bitalg - "
    "avx512-vpopcntdq - la57 - - - - - rdpid - - cldemote - movdiri movdir64b"
)
_LEAF7_EDX = "- - avx512-4vnniw avx512-4fmaps fsrm - - - avx512-vp2intersect - md-clear - - - serialize - tsx-ldtrk"
_EXT1_ECX = "lahf-lm cmp-legacy svm extapic cr8legacy abm sse4a misalignsse 3dnowprefetch osvw ibs xop skinit wdt"
_EXT1_EDX = "- - - - - - - - - - - syscall - - - - - - - - nx - mmxext - - fxsr-opt pdpe1gb rdtscp - lm 3dnowext 3dnow"
_XSAVE1_EAX = "xsaveopt xsavec xgetbv1 xsaves"
_LEAF7_1_EAX = "- - - - avx-vnni avx512-bf16 - - - - fzrm fsrs fsrc - - - - - - - - - - - - - lam"
# SVM's own features (what nested SVM offers a guest), QEMU's names
_SVM_EDX = (
    "npt lbrv svm-lock nrip-save tsc-scale vmcb-clean flushbyasid decodeassists - - pause-filter - "
    "pfthreshold avic - v-vmsave-vmload vgif"
)

FEATURES: dict[str, tuple[int, int, str, int]] = {}
for _leaf, _sub, _reg, _names in (
    (1, 0, "edx", _LEAF1_EDX),
    (1, 0, "ecx", _LEAF1_ECX),
    (7, 0, "ebx", _LEAF7_EBX),
    (7, 0, "ecx", _LEAF7_ECX),
    (7, 0, "edx", _LEAF7_EDX),
    (0x80000001, 0, "ecx", _EXT1_ECX),
    (0x80000001, 0, "edx", _EXT1_EDX),
    (0xD, 1, "eax", _XSAVE1_EAX),
    (7, 1, "eax", _LEAF7_1_EAX),
    (0x8000000A, 0, "edx", _SVM_EDX),
):
    for _bit, _name in enumerate(_names.split()):
        if _name != "-":
            FEATURES[_name] = (_leaf, _sub, _reg, _bit)
ALIASES = {"sse3": "pni", "sse4_1": "sse4.1", "sse4_2": "sse4.2", "lahf_lm": "lahf-lm", "tsc_deadline": "tsc-deadline"}

# Removing a feature removes what cannot work without it (QEMU's feature_dependencies).
DEPENDENTS = {
    "xsave": ["osxsave", "avx", "xsaveopt", "xsavec", "xgetbv1", "xsaves"],
    "avx": ["avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx512f"],
    "avx512f": [n for n in FEATURES if n.startswith("avx512") and n != "avx512f"],
    "lm": ["pdpe1gb"],
}
_PPRO = "fpu de pse tsc msr pae mce cx8 apic sep pge cmov pat mmx fxsr sse sse2"
_SKYLAKE_SERVER = (
    f"{_PPRO} mtrr clflush mca pse36 pni pclmulqdq ssse3 fma cx16 pcid sse4.1 sse4.2 x2apic movbe popcnt "
    "tsc-deadline aes xsave avx f16c rdrand fsgsbase tsc-adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm mpx "
    "avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl pku syscall nx pdpe1gb rdtscp lm "
    "lahf-lm abm 3dnowprefetch xsaveopt xsavec xgetbv1"
)


@dataclass(frozen=True)
class NamedModel:
    """One of QEMU's CPU models: its vendor, signature and features, masked onto what KVM offers."""

    vendor: str
    family: int
    model: int
    stepping: int
    features: frozenset[str]


def _named(vendor: str, family: int, model: int, stepping: int, features: str) -> NamedModel:
    return NamedModel(vendor, family, model, stepping, frozenset(features.split()))


# As QEMU defines them (target/i386/cpu.c): the models kvm-unit-tests and CI scripts ask for.
NAMED_MODELS = {
    "qemu64": _named("AuthenticAMD", 15, 107, 1, f"{_PPRO} mtrr clflush mca pse36 pni cx16 lm syscall nx lahf-lm svm"),
    "kvm64": _named("GenuineIntel", 15, 6, 1, f"{_PPRO} mtrr clflush mca pse36 pni cx16 lm syscall nx"),
    "Opteron_G1": _named("AuthenticAMD", 15, 6, 1, f"{_PPRO} mtrr clflush mca pse36 pni lm syscall nx"),
    "Skylake-Server": _named("GenuineIntel", 6, 85, 4, _SKYLAKE_SERVER),
}
# Properties accepted because minivmm already does what they ask (the host's physical address width).
NO_OP_PROPS = {"host-phys-bits": "on", "migratable": None, "check": None, "enforce": None}
CPUID_HYPERVISOR_BIT = 31
KVM_CPUID_SIGNATURE = 0x40000000
_SUBLEAF_INDEXED = {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x24}


class CpuModelError(ValueError):
    pass


@dataclass
class CpuModel:
    """``-cpu MODEL[,+feat|-feat|feat=on|off|vendor=...]``: ``host`` and ``max`` are KVM's
    supported CPUID; a named model is that, limited to the model's own features, with its
    vendor and signature. Then features are removed and added."""

    name: str = "host"
    add: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    vendor: str | None = None

    @classmethod
    def parse(cls, spec: str) -> CpuModel:
        name, *props = spec.split(",")
        if name not in ("host", "max") and name not in NAMED_MODELS:
            known = ", ".join(["host", "max", *NAMED_MODELS])
            raise CpuModelError(f"unable to find CPU model '{name}' (minivmm offers {known})")
        model = cls(name)
        for prop in props:
            if not prop:
                continue
            if prop[0] in "+-":
                feat, on = prop[1:], prop[0] == "+"
            elif "=" in prop:
                feat, value = prop.split("=", 1)
                if feat == "vendor":
                    if len(value.encode()) != 12:
                        raise CpuModelError(f"vendor '{value}' must be 12 characters (as GenuineIntel)")
                    model.vendor = value
                    continue
                if feat in NO_OP_PROPS:
                    continue
                if value not in ("on", "off", "true", "false", "yes", "no"):
                    raise CpuModelError(f"property '{feat}' doesn't take value '{value}' (use on or off)")
                on = value in ("on", "true", "yes")
            else:
                feat, on = prop, True
                if feat in NO_OP_PROPS:
                    continue
            if feat.startswith("hv_") or feat.startswith("hv-"):
                raise CpuModelError(f"'{feat}': Hyper-V enlightenments are not supported by minivmm")
            if feat.startswith("vmx-"):
                raise CpuModelError(f"'{feat}': nested VMX capability controls (vmx-*) are not supported by minivmm")
            feat = ALIASES.get(feat, feat)
            if feat not in FEATURES:
                raise CpuModelError(f"can't apply global {name}-x86_64-cpu.{feat}: unknown CPU feature '{feat}'")
            (model.add if on else model.remove).append(feat)
        return model

    def apply(self, supported: list[kvm_cpuid_entry2], warn=None) -> list[kvm_cpuid_entry2]:
        """The guest's CPUID table: a copy of ``supported`` with the model and the edits applied."""
        entries = [kvm_cpuid_entry2.from_buffer_copy(e) for e in supported]
        named = NAMED_MODELS.get(self.name)
        removed: set[str] = set()
        pending = list(self.remove)
        if named is not None:  # everything the model lacks goes, but the hypervisor bit
            pending += [f for f in FEATURES if f not in named.features and f != "hypervisor"]
        while pending:
            feat = pending.pop()
            if feat not in removed:
                removed.add(feat)
                pending.extend(DEPENDENTS.get(feat, []))
        for feat in removed:
            _set_bit(entries, feat, False)
        if "xsave" in removed:
            entries = [e for e in entries if e.function != 0xD]
        if named is not None:
            _set_signature(entries, named)
        vendor = self.vendor or (named.vendor if named is not None else None)
        if vendor is not None:
            _set_vendor(entries, vendor)
        for feat in self.add:
            if feat in self.remove:
                continue
            if not _set_bit(entries, feat, True, only_if_present=True, supported=supported):
                (warn or _warn)(f"warning: host doesn't support requested feature: {_describe(feat)}")
        return entries


def _set_vendor(entries: list[kvm_cpuid_entry2], vendor: str) -> None:
    """Leaves 0 and 0x80000000 spell the vendor in EBX, EDX, ECX."""
    raw = vendor.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))
    for leaf in (0, 0x80000000):
        e = _find(entries, leaf)
        if e is not None:
            e.ebx, e.edx, e.ecx = ebx, edx, ecx


def _set_signature(entries: list[kvm_cpuid_entry2], named: NamedModel) -> None:
    """Leaf 1 EAX: family, model and stepping, in the extended fields where they overflow."""
    e = _find(entries, 1)
    if e is None:
        return
    family, ext_family = min(named.family, 15), max(0, named.family - 15)
    model, ext_model = named.model & 0xF, named.model >> 4
    e.eax = (ext_family << 20) | (ext_model << 16) | (family << 8) | (model << 4) | named.stepping


def _describe(feat: str) -> str:
    """QEMU 11's wording: CPUID[eax=07h,ecx=01h].EAX.lam [bit 26]."""
    leaf, sub, reg, bit = FEATURES[feat]
    where = f"eax={leaf:02x}h" + (f",ecx={sub:02x}h" if sub else "")
    return f"CPUID[{where}].{reg.upper()}.{feat} [bit {bit}]"


def _warn(msg: str) -> None:
    print(f"minivmm: {msg}", file=sys.stderr)


def _find(entries: list[kvm_cpuid_entry2], leaf: int, sub: int = 0) -> kvm_cpuid_entry2 | None:
    for e in entries:
        if e.function == leaf and (e.index == sub or leaf not in _SUBLEAF_INDEXED):
            return e
    return None


def _set_bit(entries, feat, on, only_if_present=False, supported=None) -> bool:
    leaf, sub, reg, bit = FEATURES[feat]
    if only_if_present:
        host = _find(supported, leaf, sub)
        if host is None or not (getattr(host, reg) >> bit) & 1:
            return False
    e = _find(entries, leaf, sub)
    if e is None:
        return not on
    value = getattr(e, reg)
    setattr(e, reg, value | (1 << bit) if on else value & ~(1 << bit))
    return True


def has_feature(entries: list[kvm_cpuid_entry2], feat: str) -> bool:
    leaf, sub, reg, bit = FEATURES[feat]
    e = _find(entries, leaf, sub)
    return e is not None and bool((getattr(e, reg) >> bit) & 1)


def _topology_leaf(leaf: int, sub: int, apic_id: int, core_bits: int, ncpus: int) -> kvm_cpuid_entry2:
    """Leaf 0xB/0x1F: level 0 is SMT (one thread per core), level 1 the cores."""
    e = kvm_cpuid_entry2(function=leaf, index=sub, flags=1, edx=apic_id)
    if sub == 0:
        e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | sub
    elif sub == 1:
        e.eax, e.ebx, e.ecx = core_bits, ncpus, (2 << 8) | sub
    else:
        e.ecx = sub
    return e


def for_vcpu(entries: list[kvm_cpuid_entry2], apic_id: int, ncpus: int) -> list[kvm_cpuid_entry2]:
    """Per-vCPU CPUID: APIC ids in leaves 1, 0xB and 0x1F; N cores in one socket."""
    core_bits = max(0, (ncpus - 1).bit_length())
    logical = 1 << core_bits
    out = []
    for src in entries:
        e = kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function in (0xB, 0x1F):
            continue
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (min(logical, 255) << 16) | (apic_id << 24)
            e.ecx |= 1 << CPUID_HYPERVISOR_BIT
            e.edx = e.edx | (1 << 28) if ncpus > 1 else e.edx & ~(1 << 28)
        elif e.function == 4 and e.eax & 0x1F:
            sharing = logical - 1 if (e.eax >> 5) & 7 == 3 else 0  # L3 is shared by all cores
            e.eax = (e.eax & 0x3FFF) | (sharing << 14) | ((logical - 1) << 26)
        out.append(e)
    max_leaf = _find(entries, 0).eax if _find(entries, 0) else 0
    for leaf in (0xB, 0x1F):
        if max_leaf >= leaf:
            out.extend(_topology_leaf(leaf, sub, apic_id, core_bits, ncpus) for sub in range(3))
    return out

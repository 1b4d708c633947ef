"""A machine's whole non-RAM state as one vmstate blob.

Sections, in load order: configuration (the machine type, checked first, as
QEMU checks it: a q35 stream never loads into a pc machine), globalstate
(the run state), each vCPU (docs/boot.md's order inside), KVM's PIT, the
clock and KVM's irqchips (those KVM emulates), then every device with state
(minivmm's PIC, IOAPIC and PIT among them with kernel-irqchip=split).
Loading decodes and checks everything before applying anything, so a bad
blob leaves the machine untouched; a section this machine has no place for,
or one it lacks, is an error naming it (QEMU's wording).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from minivmm import runstate as rs
from minivmm.arch.x86 import vcpu_state, vm_state
from minivmm.kvm import constants as c
from minivmm.kvm import structs as s
from minivmm.kvm.system import KvmError
from minivmm.vmstate import VMSD, Field, StateWriter, VMStateError, decode, read_blob


def _resumable() -> frozenset[str]:
    """The run states a target takes from inmigrate (running: by starting), as a source at
    ``migrate`` can be in; finish-migrate and colo are steps of a migration, never its result."""
    names = {v for k, v in vars(rs).items() if k.isupper() and isinstance(v, str)}
    out = {rs.RUNNING}
    for name in names - {rs.INMIGRATE, rs.FINISH_MIGRATE, rs.COLO}:
        try:
            rs.check_transition(rs.INMIGRATE, name)
            out.add(name)
        except rs.RunStateError:
            pass
    return frozenset(out)


RESUMABLE = _resumable()
GLOBALSTATE = VMSD("globalstate", 1, 1, (Field("runstate", "str", max=64, choices=RESUMABLE),))
# QEMU's "configuration" section: the machine type. A minivmm before q35 did not write it: its
# streams are from pc machines.
CONFIGURATION = VMSD("configuration", 1, 1, (Field("name", "str", max=64),), optional=True)
STREAMS_BEFORE_MACHINE_TYPES = "pc"


@dataclass
class Loaded:
    runstate: str
    vcpus: list
    vm: vm_state.VmState
    devices: list  # (device, state)


def _devices(machine) -> list:
    """Devices with state, in a fixed order, with their per-kind instance numbers."""
    out, seen = [], {}
    for device in machine.devices.persistent():
        instance = seen.get(device.vmstate.name, 0)
        seen[device.vmstate.name] = instance + 1
        out.append((device.vmstate, instance, device))
    return out


def save(machine, runstate: str) -> bytes:
    """The blob for a machine whose vCPUs are paused; ``runstate`` is what the target should resume to."""
    w = StateWriter()
    w.add(CONFIGURATION, {"name": machine.config.machine.name})
    w.add(GLOBALSTATE, {"runstate": runstate})
    for t in machine.vcpus:
        st = vcpu_state.save(t.vcpu, machine.vcpus.caps)
        st.extint = machine.irqchip.held_extint(t)
        w.add(vcpu_state.VMSTATE, st, t.index)
    chips = machine.irqchip.kvm_chips
    vm = vm_state.save(machine.vm, chips, machine.irqchip.kvm_pit)
    if vm.pit is not None:
        w.add(vm_state.PIT_VMSTATE, {"pit": vm.pit})
    w.add(vm_state.CLOCK_VMSTATE, vm.clock)
    for i, chip in enumerate(vm.irqchips):
        w.add(vm_state.IRQCHIP_VMSTATE, {"chip": chip}, i)
    for vmsd, instance, device in _devices(machine):
        w.add(vmsd, device.save_state(), instance)
    return w.blob()


def decode_all(machine, blob: bytes) -> Loaded:
    sections = {(sec.name, sec.instance): sec for sec in read_blob(blob)}
    _check_machine_type(machine, sections)
    expected: dict[tuple[str, int], VMSD] = {("configuration", 0): CONFIGURATION, ("globalstate", 0): GLOBALSTATE}
    expected.update({("vcpu", t.index): vcpu_state.VMSTATE for t in machine.vcpus})
    chips = range(3) if machine.irqchip.kvm_chips else range(0)
    if machine.irqchip.kvm_pit:
        expected[("kvm-pit", 0)] = vm_state.PIT_VMSTATE
    expected[("kvmclock", 0)] = vm_state.CLOCK_VMSTATE
    expected.update({("kvm-irqchip", i): vm_state.IRQCHIP_VMSTATE for i in chips})
    devices = _devices(machine)
    expected.update({(vmsd.name, instance): vmsd for vmsd, instance, _ in devices})
    for key in sections:
        if key not in expected:
            raise VMStateError(
                f"Unknown savevm section or instance '{key[0]}' {key[1]}. Make sure that your current VM setup "
                "matches your saved VM setup, including any hotplugged devices"
            )
    values = {}
    for key, vmsd in expected.items():
        sec = sections.get(key)
        if sec is None:
            if vmsd.optional:
                continue  # written by a minivmm that did not have this device: it keeps its power-on state
            raise VMStateError(f"{key[0]}[{key[1]}]: missing from the stream: the saved machine was set up differently")
        values[key] = decode(vmsd, sec.payload, sec.version, sec.path)
    for t in machine.vcpus:
        st = values[("vcpu", t.index)]
        _check_vcpu(machine.vcpus.caps, st, f"vcpu[{t.index}]")
        if st.extint >= 0 and (t.index or not machine.irqchip.split):
            raise VMStateError(
                f"vcpu[{t.index}]/extint: a held ExtINT vector, which only the boot vCPU of a "
                "machine with kernel-irqchip=split (minivmm's PIC) can have"
            )
    for i in chips:
        chip_id = s.kvm_irqchip.from_buffer_copy(values[("kvm-irqchip", i)]["chip"]).chip_id
        if chip_id != i:
            raise VMStateError(f"kvm-irqchip[{i}]/chip: holds chip {chip_id}, not {i}")
    return Loaded(
        runstate=values[("globalstate", 0)]["runstate"],
        vcpus=[values[("vcpu", t.index)] for t in machine.vcpus],
        vm=vm_state.VmState(
            irqchips=[values[("kvm-irqchip", i)]["chip"] for i in chips],
            pit=values[("kvm-pit", 0)]["pit"] if ("kvm-pit", 0) in expected else None,
            clock=values[("kvmclock", 0)],
        ),
        devices=[(device, values[(v.name, i)]) for v, i, device in devices if (v.name, i) in values],
    )


def _check_machine_type(machine, sections: dict) -> None:
    """The stream's machine type is this machine's, before anything else is looked at (QEMU's wording)."""
    sec = sections.get(("configuration", 0))
    received = STREAMS_BEFORE_MACHINE_TYPES
    if sec is not None:
        received = decode(CONFIGURATION, sec.payload, sec.version, sec.path)["name"]
    local = machine.config.machine.name
    if received != local:
        raise VMStateError(f"configuration/name: Machine type received is '{received}' and local is '{local}'")


def _check_vcpu(caps: vcpu_state.StateCaps, st: vcpu_state.VcpuState, path: str) -> None:
    """What this host's vCPUs take: its XSAVE size (or FPU), XCRs if it has them, its MSRs."""
    if caps.xsave_size:
        got = ctypes.sizeof(st.xsave) if st.xsave is not None else 0
        if got != caps.xsave_size:
            raise VMStateError(f"{path}/xsave: expected {caps.xsave_size} bytes, got {got}")
    elif st.xsave is not None:
        raise VMStateError(f"{path}/xsave: this host saves FPU state, not XSAVE")
    if caps.xcrs != (st.xcrs is not None):
        want, got = (ctypes.sizeof(s.kvm_xcrs), 0) if caps.xcrs else (0, ctypes.sizeof(s.kvm_xcrs))
        raise VMStateError(f"{path}/xcrs: expected {want} bytes, got {got}")
    problem = vcpu_state.tsc_problem(st.tsc_khz, caps)
    if problem is not None:
        raise VMStateError(f"{path}/tsc_khz: {problem}")
    known = set(caps.msr_indices)
    for index in st.msrs:
        if index not in known:
            raise VMStateError(f"{path}/msrs: MSR {index:#x} is not one this host saves")


def apply(machine, loaded: Loaded) -> None:
    """Put decoded state into a machine whose vCPUs are paused; KVM refusing a piece names it."""
    for t, state in zip(machine.vcpus, loaded.vcpus):
        try:
            vcpu_state.restore(t.vcpu, state, machine.vcpus.caps)
        except KvmError as e:
            raise VMStateError(f"vcpu[{t.index}]: KVM refused the state: {e}") from None
    try:
        vm_state.restore(machine.vm, loaded.vm, machine.kvm.check_extension(c.KVM_CAP_ADJUST_CLOCK))
    except KvmError as e:
        raise VMStateError(f"kvm-pit, kvmclock or kvm-irqchip: KVM refused the state: {e}") from None
    apply_devices(machine, loaded)


def apply_devices(machine, loaded: Loaded) -> None:
    """The userspace devices' part of ``apply`` (a cpr-exec keeper's take-over runs it first)."""
    for device, state in loaded.devices:
        device.load_state(state)

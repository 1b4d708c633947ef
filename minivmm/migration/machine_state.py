"""A machine's whole non-RAM state as one vmstate blob.

Sections, in load order: globalstate (the run state), each vCPU (docs/boot.md's
order inside), the PIT, the clock and the irqchips, then every device with
state. Loading decodes and checks everything before applying anything, so a
bad blob leaves the machine untouched; a section this machine has no place
for, or one it lacks, is an error naming it (QEMU's wording).
"""

from __future__ import annotations

from dataclasses import dataclass

from minivmm.arch.x86 import vcpu_state, vm_state
from minivmm.kvm import constants as c
from minivmm.vmstate import VMSD, Field, StateWriter, VMStateError, decode, read_blob

GLOBALSTATE = VMSD("globalstate", 1, 1, (Field("runstate", "str"),))


@dataclass
class Loaded:
    runstate: str
    vcpus: list
    vm: vm_state.VmState
    devices: list  # (device, state)


def _devices(machine) -> list:
    """Devices with state, in a fixed order, with their per-kind instance numbers."""
    out, seen = [], {}
    for device in machine.pio.devices() + machine.mmio.devices():
        vmsd = getattr(device, "vmstate", None)
        if vmsd is not None:
            instance = seen.get(vmsd.name, 0)
            seen[vmsd.name] = instance + 1
            out.append((vmsd, instance, device))
    return out


def save(machine, runstate: str) -> bytes:
    """The blob for a machine whose vCPUs are paused; ``runstate`` is what the target should resume to."""
    w = StateWriter()
    w.add(GLOBALSTATE, {"runstate": runstate})
    for t in machine.vcpus:
        w.add(vcpu_state.VMSTATE, vcpu_state.save(t.vcpu, machine.state_caps), t.index)
    vm = vm_state.save(machine.vm)
    w.add(vm_state.PIT_VMSTATE, {"pit": vm.pit})
    w.add(vm_state.CLOCK_VMSTATE, vm.clock)
    for i, chip in enumerate(vm.irqchips):
        w.add(vm_state.IRQCHIP_VMSTATE, {"chip": chip}, i)
    for vmsd, instance, device in _devices(machine):
        w.add(vmsd, device.save_state(), instance)
    return w.blob()


def decode_all(machine, blob: bytes) -> Loaded:
    sections = {(sec.name, sec.instance): sec for sec in read_blob(blob)}
    expected: dict[tuple[str, int], VMSD] = {("globalstate", 0): GLOBALSTATE}
    expected.update({("vcpu", t.index): vcpu_state.VMSTATE for t in machine.vcpus})
    expected[("kvm-pit", 0)] = vm_state.PIT_VMSTATE
    expected[("kvmclock", 0)] = vm_state.CLOCK_VMSTATE
    expected.update({("kvm-irqchip", i): vm_state.IRQCHIP_VMSTATE for i in range(3)})
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
            raise VMStateError(f"{key[0]}[{key[1]}]: missing from the stream: the saved machine was set up differently")
        values[key] = decode(vmsd, sec.payload, sec.version, sec.path)
    xsave = machine.state_caps.xsave_size
    for t in machine.vcpus:
        got = values[("vcpu", t.index)].xsave
        if xsave and (got is None or len(bytes(got)) != xsave):
            raise VMStateError(f"vcpu[{t.index}]/xsave: expected {xsave} bytes, got {len(bytes(got)) if got else 0}")
    return Loaded(
        runstate=values[("globalstate", 0)]["runstate"],
        vcpus=[values[("vcpu", t.index)] for t in machine.vcpus],
        vm=vm_state.VmState(
            irqchips=[values[("kvm-irqchip", i)]["chip"] for i in range(3)],
            pit=values[("kvm-pit", 0)]["pit"],
            clock=values[("kvmclock", 0)],
        ),
        devices=[(device, values[(vmsd.name, instance)]) for vmsd, instance, device in devices],
    )


def apply(machine, loaded: Loaded) -> None:
    """Put decoded state into a machine whose vCPUs are paused."""
    for t, state in zip(machine.vcpus, loaded.vcpus):
        vcpu_state.restore(t.vcpu, state)
    vm_state.restore(machine.vm, loaded.vm, machine.kvm.check_extension(c.KVM_CAP_ADJUST_CLOCK))
    for device, state in loaded.devices:
        device.load_state(state)


def load(machine, blob: bytes) -> str:
    """Decode, check and apply a blob; the run state the source was in."""
    loaded = decode_all(machine, blob)
    apply(machine, loaded)
    return loaded.runstate

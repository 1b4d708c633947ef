"""Building a machine from its MachineConfig, in the order KVM needs.

1. the VM, its TSS and identity-map pages, the interrupt controllers
   (irqchip.py), all before any vCPU (their power-on state is kept for resets);
2. guest RAM and its memory slots (ram.py);
3. the devices (devices.py), with their irqfds bound unless an incoming
   CPR's source still holds them;
4. every vCPU (vcpus.py), before the first KVM_RUN, then the coalesced
   ring the devices read (mapped through a vCPU);
5. the boot images loaded and the boot CPU set up, unless the state comes
   from an incoming migration (then nothing is written to RAM).
"""

from __future__ import annotations

from minivmm import runstate
from minivmm.arch.x86 import boot, cpuid, layout, modes
from minivmm.kvm import constants as c
from minivmm.kvm.structs import kvm_fpu, kvm_regs
from minivmm.kvm.system import Vcpu
from minivmm.log import message

from . import irqchip
from .devices import DeviceManager
from .errors import MachineError
from .ram import RamBuilder, add_memslots, ram_size


def build(m) -> None:
    """Fill in ``m`` (a minivmm.machine.Machine) from ``m.config``."""
    cfg = m.config
    kvm_max = m.kvm.check_extension(c.KVM_CAP_MAX_VCPUS) or m.kvm.check_extension(c.KVM_CAP_NR_VCPUS)
    max_vcpus = min(kvm_max, layout.MP_MAX_CPUS)
    if not 1 <= cfg.smp <= max_vcpus:
        raise MachineError(
            f"-smp {cfg.smp}",
            f"the number of CPUs must be between 1 and {max_vcpus} (KVM allows {kvm_max}; "
            f"the MP table's 8-bit APIC ids allow {layout.MP_MAX_CPUS})",
        )
    m.vm = m.kvm.create_vm()
    m.vm.set_tss_addr(layout.TSS_ADDR)
    m.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
    m.irqchip = irqchip.create(m.vm, cfg.kernel_irqchip, cfg.pit, cfg.pit_reinject)

    m.ram_ranges = cfg.machine.ram_ranges(ram_size(cfg))
    firmware = m.image.firmware if m.image.kind == "bios" else None
    RamBuilder(cfg, m.fds).build(m.memory, m.ram_ranges, firmware)
    m.memslots = add_memslots(m.vm, m.memory)

    m.devices = DeviceManager(m.kvm, m.vm, m.memory, m.loop, m.fds, m.control, m.irqchip)
    m.devices.build(cfg, m.ram_ranges)
    if not m.fds.inherited:
        m.devices.bind_irqfds()

    buses = (m.devices.pio, m.devices.mmio)
    m.vcpus.create(m.kvm, m.vm, cfg.smp, cfg.cpu, buses, m.control.on_vcpu_exit, m.describe, message, cfg.run_loop)
    m.irqchip.attach(m.vcpus.threads)
    m.devices.coalesce(m.vcpus[0].vcpu)

    if cfg.incoming:
        m.control.set_state(runstate.INMIGRATE)  # RAM and state come from the stream: load nothing
    else:
        load_boot(m)


def load_boot(m) -> None:
    """The boot images into RAM and the boot CPU into the state they ask for (also on every reset)."""
    leaf1 = next(e for e in m.vcpus.cpuid if e.function == 1)
    try:
        entry = boot.load(
            m.image,
            m.memory,
            m.ram_ranges,
            ncpus=m.config.smp,
            cpu_signature=leaf1.eax,
            cpu_features=leaf1.edx,
            gib_pages=cpuid.has_feature(m.vcpus.cpuid, "pdpe1gb"),
            reserved=m.config.machine.reserved(),
        )
    except boot.BootError as e:
        raise MachineError("", str(e)) from None
    if m.image.kind != "bios":  # firmware builds its own tables (and its ROM covers 0xe0000)
        from minivmm.arch.x86 import acpi  # not before a boot: an incoming update pays for every import

        for gpa, blob in acpi.build(m.devices.acpi_config(m.config.smp)):
            m.memory.write(gpa, blob)
    _enter(m, m.vcpus[0].vcpu, entry)


def _enter(m, vcpu: Vcpu, entry: boot.Entry) -> None:
    if entry.mode == "reset":
        return
    sregs = vcpu.get_sregs()
    if entry.mode == "protected":
        gdt = modes.protected_mode(sregs)
    elif entry.mode == "pvh":
        gdt = modes.pvh_mode(sregs)
    else:
        gdt = modes.long_mode(sregs, layout.PML4_ADDR)
    m.memory.write(layout.GDT_ADDR, gdt)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm_regs(rip=entry.rip, rax=entry.rax, rbx=entry.rbx, rsp=entry.rsp, rsi=entry.rsi, rflags=2))
    vcpu.set_fpu(kvm_fpu(fcw=0x37F, mxcsr=0x1F80))


FACS_WAKING_VECTOR, FACS_X_WAKING_VECTOR = 12, 24  # offsets in the FACS


def waking_vector(m) -> int:
    """The real-mode address the guest left in the FACS for its S3 resume (0: none)."""
    if m.image.kind == "bios":
        return 0
    from minivmm.arch.x86 import acpi

    facs = acpi.build_tables(m.devices.acpi_config(m.config.smp)).tables["FACS"][0]
    vector = int.from_bytes(m.memory.read(facs + FACS_X_WAKING_VECTOR, 8), "little")
    vector = vector or int.from_bytes(m.memory.read(facs + FACS_WAKING_VECTOR, 4), "little")
    return vector if vector < 1 << 20 else 0  # a real-mode address, as firmware jumps to it


def enter_real_mode(m, vcpu: Vcpu, address: int) -> None:
    """The boot CPU, as after reset but at ``address`` (CS = address >> 4)."""
    sregs = vcpu.get_sregs()
    sregs.cs.selector, sregs.cs.base = address >> 4, address >> 4 << 4
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm_regs(rip=address & 0xF, rflags=2))

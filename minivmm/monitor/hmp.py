"""The human monitor, reached through QMP's ``human-monitor-command``: QEMU's
``info`` commands people read (status, registers, mtree, cpus...) and a few
actions that map onto QMP commands.
"""

from __future__ import annotations

from collections.abc import Callable

from minivmm import __version__, runstate
from minivmm.arch.x86 import layout
from minivmm.kvm.structs import kvm_segment

# In-kernel devices (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2): never on our buses.
_KERNEL_PIO = [
    (0x20, 2, "kvm-pic"),
    (0x40, 4, "kvm-pit"),
    (0x61, 1, "pcspk"),
    (0xA0, 2, "kvm-pic"),
    (0x4D0, 2, "kvm-elcr"),
]
_KERNEL_MMIO = [(layout.IOAPIC_ADDR, 0x1000, "kvm-ioapic"), (layout.LAPIC_ADDR, 0x1000, "kvm-apic-msi")]


# HMP command -> (QMP command, help line), in QEMU's "name|alias  -- text" form.
ACTIONS = {
    "cont": ("cont", "cont|c  -- resume emulation"),
    "c": ("cont", None),
    "stop": ("stop", "stop|s  -- stop emulation"),
    "s": ("stop", None),
    "system_reset": ("system_reset", "system_reset  -- reset the system"),
    "quit": ("quit", "quit|q  -- quit the emulator"),
    "q": ("quit", None),
}


def run(ctx, line: str, cpu_index: int, qmp: Callable[[str], object]) -> str:
    words = line.split()
    if not words:
        return ""
    name, args = words[0], words[1:]
    if name == "info":
        if not args:
            return "".join(f"info {n}  -- {text}\n" for n, (_, text) in INFO.items())
        if args[0] not in INFO:
            return f"unknown command: 'info {args[0]}'\n"
        return INFO[args[0]][0](ctx.machine, cpu_index)
    if name in ACTIONS:
        qmp(ACTIONS[name][0])
        return ""
    if name in ("help", "?"):
        lines = [text for _, text in ACTIONS.values() if text]
        lines += ["help|? [cmd]  -- show the help", "info [subcommand]  -- show various information about the system"]
        return "".join(f"{text}\n" for text in sorted(lines))
    return f"unknown command: '{name}'\n"


def info_status(machine, cpu_index: int) -> str:
    state = machine.control.state
    text = "VM status: " + ("running" if state == runstate.RUNNING else "paused")
    if state not in (runstate.RUNNING, runstate.PAUSED):
        text += f" ({state})"
    return text + "\n"


def _segment(name: str, seg: kvm_segment) -> str:
    flags = (
        (seg.type << 8)
        | (seg.s << 12)
        | (seg.dpl << 13)
        | (seg.present << 15)
        | (seg.avl << 20)
        | (seg.l << 21)
        | (seg.db << 22)
        | (seg.g << 23)
    )
    return f"{name:<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {flags:08x}\n"


def info_registers(machine, cpu_index: int) -> str:
    """QEMU's x86 register dump, 64-bit layout in long mode, 32-bit otherwise."""
    with machine.vcpu_paused(cpu_index) as vcpu:
        r, s, d = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_debugregs()
        halted = vcpu.get_mp_state() == 3
        events = vcpu.get_vcpu_events()
    fl = r.rflags
    flags = "".join(
        c if fl & bit else "-" for c, bit in zip("DOSZAPC", (1 << 10, 1 << 11, 1 << 7, 1 << 6, 1 << 4, 1 << 2, 1 << 0))
    )
    cpl = s.ss.dpl if s.cr0 & 1 else 0
    if s.efer & (1 << 10):  # long mode active
        names = [
            "RAX",
            "RBX",
            "RCX",
            "RDX",
            "RSI",
            "RDI",
            "RBP",
            "RSP",
            "R8 ",
            "R9 ",
            "R10",
            "R11",
            "R12",
            "R13",
            "R14",
            "R15",
        ]
        values = [
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.rsp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
        ]
        width, ip = 16, f"RIP={r.rip:016x}"
    else:
        names = ["EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP", "ESP"]
        values = [v & 0xFFFFFFFF for v in (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp)]
        width, ip = 8, f"EIP={r.rip & 0xFFFFFFFF:08x}"
    out = []
    for i in range(0, len(names), 4):
        out.append(" ".join(f"{n}={v:0{width}x}" for n, v in zip(names[i : i + 4], values[i : i + 4])) + "\n")
    out.append(
        f"{ip} RFL={fl:08x} [{flags}] CPL={cpl} II={events.interrupt.shadow & 1} A20=1 SMM={events.smi.smm} "
        f"HLT={int(halted)}\n"
    )
    for name in ("es", "cs", "ss", "ds", "fs", "gs"):
        out.append(_segment(name.upper(), getattr(s, name)))
    out.append(_segment("LDT", s.ldt))
    out.append(_segment("TR", s.tr))
    out.append(f"GDT=     {s.gdt.base:016x} {s.gdt.limit:08x}\n")
    out.append(f"IDT=     {s.idt.base:016x} {s.idt.limit:08x}\n")
    out.append(f"CR0={s.cr0:08x} CR2={s.cr2:016x} CR3={s.cr3:016x} CR4={s.cr4:08x}\n")
    out.append(" ".join(f"DR{i}={d.db[i]:016x}" for i in range(4)) + "\n")
    out.append(f"DR6={d.dr6:016x} DR7={d.dr7:016x}\n")
    out.append(f"EFER={s.efer:016x}\n")
    return "".join(out)


def _line(depth: int, start: int, length: int, kind: str, name: str) -> str:
    return f"{'  ' * depth}{start:016x}-{start + length - 1:016x} (prio 0, {kind}): {name}\n"


def info_mtree(machine, cpu_index: int) -> str:
    out = ["address-space: memory\n", _line(1, 0, 1 << 64, "i/o", "system")]
    items = []
    for m in machine.memory.mappings:
        kind = "rom" if m.block.readonly else "ram"
        name = m.block.name
        if m.label is not None:
            name = f"alias {m.label} @{m.block.name} {m.offset:016x}-{m.offset + m.size - 1:016x}"
        items.append((m.gpa, m.size, kind, name))
    items += [(r.base, r.length, "i/o", r.device.name) for r in machine.devices.mmio.ranges]
    items += [(base, size, "i/o", name) for base, size, name in _KERNEL_MMIO]
    out += [_line(2, *item) for item in sorted(items)]
    out += ["\naddress-space: I/O\n", _line(1, 0, 0x10000, "i/o", "io")]
    ports = [(r.base, r.length, "i/o", r.device.name) for r in machine.devices.pio.ranges]
    ports += [(base, size, "i/o", name) for base, size, name in _KERNEL_PIO]
    out += [_line(2, *item) for item in sorted(ports)]
    return "".join(out)


def info_pci(machine, cpu_index: int) -> str:
    """QEMU's layout of ``info pci``."""
    from minivmm.machine.pci import describe

    out = []
    for f in machine.devices.pci.functions:
        d = describe(f)
        ids, cls = d["id"], d["class_info"]
        kind = cls.get("desc", f"Class {cls['class']:04x}")
        out.append(f"  Bus  0, device {d['slot']:3d}, function 0:\n")
        out.append(f"    {kind}: PCI device {ids['vendor']:04x}:{ids['device']:04x}\n")
        out.append(f"      PCI subsystem {ids['subsystem-vendor']:04x}:{ids['subsystem']:04x}\n")
        if "irq_pin" in d:
            out.append(f"      IRQ {d['irq']}, pin {chr(ord('A') + d['irq_pin'] - 1)}\n")
        for r in d["regions"]:
            end = r["address"] + r["size"] - 1
            bits = 64 if r.get("mem_type_64") else 32
            what = (
                f"{bits} bit{' prefetchable' if r.get('prefetch') else ''} memory" if r["type"] == "memory" else "I/O"
            )
            out.append(f"      BAR{r['bar']}: {what} at {r['address']:#x} [{end:#x}].\n")
        out.append('      id ""\n')
    return "".join(out)


def info_cpus(machine, cpu_index: int) -> str:
    return "".join(
        f"{'*' if t.index == cpu_index else ' '} CPU #{t.index}: thread_id={t.thread.native_id or 0}\n"
        for t in machine.vcpus
    )


INFO: dict[str, tuple[Callable[[object, int], str], str]] = {
    "cpus": (info_cpus, "show infos for each CPU"),
    "kvm": (lambda machine, cpu: "kvm support: enabled\n", "show KVM information"),
    "mtree": (info_mtree, "show memory tree"),
    "pci": (info_pci, "show PCI info"),
    "name": (lambda machine, cpu: f"{machine.config.name}\n" if machine.config.name else "", "show the VM name"),
    "registers": (info_registers, "show the cpu registers"),
    "status": (info_status, "show the current VM status (running|paused)"),
    "version": (lambda machine, cpu: f"{__version__} (minivmm {__version__})\n", "show the version of minivmm"),
}

"""The machine: a KVM VM with its RAM, devices and vCPU threads, built from a
MachineConfig, and the run state that the main loop drives.

Build order matters to KVM: TSS and identity-map addresses, irqchip and PIT
before any vCPU; all vCPUs (with CPUID, then MSRs, then LAPIC) before the
first KVM_RUN. Every vCPU's state right after creation is kept: a reset
restores it, reloads the boot images and enters the guest again.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import runstate
from .arch.x86 import cpuid, layout, modes, msr, vcpu_state
from .chardev import Chardev, ChardevError, FileChardev, SocketChardev, StdioChardev, message
from .config import MIN_RAM, ChardevConfig, DeviceConfig, MachineConfig, MemoryBackendConfig
from .devices import pvpanic
from .devices.acpi_pm import AcpiPm
from .devices.bus import Bus, BusError
from .devices.debug_exit import DebugExit
from .devices.i8042 import I8042
from .devices.postcode import PostCode
from .devices.rtc import Rtc
from .devices.serial import Serial
from .kvm import constants as c
from .kvm.structs import kvm_fpu, kvm_regs
from .kvm.system import Kvm, KvmError, Vcpu
from .mainloop import MainLoop
from .memory import GuestMemory, GuestMemoryError, RamBlock
from .migration.cpr import CprState, FdTable
from .migration.manager import MigrationManager
from .migration.ram import Slot
from .vcpu import VcpuExit, VcpuThread, install_kick_handler

COM_PORTS = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x700, 0x400


class MachineError(Exception):
    """A machine cannot be built; ``option`` names the culprit on the command line."""

    def __init__(self, option: str, text: str) -> None:
        super().__init__(f"{option}: {text}" if option else text)
        self.option = option


@dataclass(frozen=True)
class ShutdownRequest:
    reason: str  # QEMU's ShutdownCause: guest-shutdown, guest-reset, host-qmp-quit, host-signal...
    status: int = 0  # the process exit status
    message: str | None = None  # printed on stderr
    force: bool = False  # exit even with -no-shutdown (quit, signals)


def host_memory_limit() -> int:
    """Bytes of RAM plus swap: more than this cannot be backed."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("MemTotal", "SwapTotal"):
                total += int(value.split()[0]) * 1024
    return total


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """(guest-physical base, size) of RAM: split around the 32-bit MMIO hole when large."""
    if size < layout.RAM_SPLIT_THRESHOLD:
        return [(0, size)]
    below = layout.RAM_BELOW_4G_WHEN_SPLIT
    return [(0, below), (layout.FOUR_GIB, size - below)]


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g} {unit}"
    return f"{size} B"


class Machine:
    def __init__(self, config: MachineConfig, loop: MainLoop | None = None, cpr: CprState | None = None) -> None:
        self.config = config
        # Every fd that outlives this process, by (name, id): from the previous
        # minivmm when this is an incoming CPR, filled as resources open otherwise.
        self.cpr_incoming = cpr
        self.cpr_table = cpr.table if cpr is not None else FdTable()
        self._claimed: set[tuple[str, str]] = set()
        self.loop = loop or MainLoop()
        self.runstate = runstate.PRELAUNCH
        self.listeners: list[Callable[[str, dict | None], None]] = []
        self.shutdown_request: ShutdownRequest | None = None
        self.exit_status = 0
        self.autostart = not config.start_paused  # run when an incoming migration completes
        self.named_fds: dict[str, int] = {}  # getfd: fds by name, for options and CPR
        if cpr is not None:
            self.cpr_table.walk(lambda name, id_, fd: self._reclaim_named_fd(name, id_, fd))
        self.memslots: list[Slot] = []
        self.cpr_handed_over = False  # after cpr-transfer the guest's RAM belongs to the new process
        self.start_ns = 0  # when the process began (the CLI sets it): a cpr-exec's timeline
        self.cpr_channel = None  # cpr-transfer's connection to the source, until the hang-up
        self.migration = MigrationManager(self)
        self._request_lock = threading.Lock()
        self.chardevs: list[Chardev] = []
        self.irqfds: dict[int, int] = {}  # GSI -> eventfd for KVM_IRQFD
        self.irqfds_bound = False  # an incoming CPR binds them once the source has let go
        self.vcpus: list[VcpuThread] = []
        self.memory = GuestMemory()
        self.image = self._prepare_boot()
        try:
            self.kvm = Kvm()
        except OSError as e:  # QEMU's wording
            raise MachineError("", f"Could not access KVM kernel module: {e.strerror} (/dev/kvm)") from None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- building ---------------------------------------------------------------
    def _prepare_boot(self):
        """The boot images, read and checked. An incoming migration reads them too but loads
        nothing (RAM comes with the stream): a reset after it boots the machine afresh from them."""
        from .arch.x86 import boot

        cfg = self.config
        try:
            return boot.prepare(cfg.kernel, cfg.append, cfg.initrd, cfg.bios)
        except boot.BootError as e:
            raise MachineError("", str(e)) from None

    def _build(self) -> None:
        cfg = self.config
        kvm_max = self.kvm.check_extension(c.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(c.KVM_CAP_NR_VCPUS)
        max_vcpus = min(kvm_max, layout.MP_MAX_CPUS)
        if not 1 <= cfg.smp <= max_vcpus:
            raise MachineError(
                f"-smp {cfg.smp}",
                f"the number of CPUs must be between 1 and {max_vcpus} (KVM allows {kvm_max}; "
                f"the MP table's 8-bit APIC ids allow {layout.MP_MAX_CPUS})",
            )
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.initial_irqchips = [self.vm.get_irqchip(i) for i in range(3)]
        self.initial_pit = self.vm.get_pit2()
        self.ram_ranges = ram_ranges(self._ram_size())
        self._build_memory()
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self._build_devices()
        if self.cpr_incoming is None:
            self.bind_irqfds()
        self._build_vcpus()
        if self.config.incoming:
            self.set_runstate(runstate.INMIGRATE)  # RAM and state come from the stream: load nothing
        else:
            self._load_boot()

    def _ram_size(self) -> int:
        cfg = self.config
        if cfg.memory_backend is None:
            return cfg.ram_size
        backend = cfg.backends.get(cfg.memory_backend)
        if backend is None:
            raise MachineError(
                f"-machine memory-backend={cfg.memory_backend}",
                f"Device '{cfg.memory_backend}' not found (no -object with that id)",
            )
        if backend.size < MIN_RAM:
            raise MachineError(backend.option, f"guest RAM must be at least {MIN_RAM >> 20} MiB")
        if cfg.ram_size_option is not None and backend.size != cfg.ram_size:
            raise MachineError(
                f"-m {cfg.ram_size_option}",
                f"Memory size does not match the size of the memory backend '{backend.id}' "
                f"(-m is {cfg.ram_size} bytes, the backend {backend.size} bytes)",
            )
        return backend.size

    # --- the CPR fd table ------------------------------------------------------------
    def preserve(self, name: str, id_: str, opener: Callable[[], int]) -> tuple[int, bool]:
        """QEMU's cpr_open_fd: the fd the previous minivmm saved (reused=True), or a new one, saved."""
        self._claimed.add((name, id_))
        fd = self.cpr_table.find(name, id_)
        if fd >= 0:
            return fd, True
        fd = opener()
        self.cpr_table.save(name, id_, fd)
        return fd, False

    def check_saved_fd(self, name: str, id_: str, option: str) -> None:
        """fd=N during an incoming CPR: the number is ignored, the saved fd must exist."""
        if self.cpr_incoming is not None and self.cpr_table.find(name, id_) < 0:
            raise MachineError(option, f"cannot find saved value for fd {id_}")

    def _reclaim_named_fd(self, name: str, id_: str, fd: int) -> None:
        if name == "getfd":
            self.named_fds[id_] = fd
            self._claimed.add((name, id_))

    def add_named_fd(self, name: str, fd: int) -> None:
        """getfd: replaces (and closes) an fd of the same name."""
        self.close_named_fd(name)
        self.named_fds[name] = fd
        self.cpr_table.save("getfd", name, fd)

    def close_named_fd(self, name: str) -> bool:
        fd = self.named_fds.pop(name, None)
        if fd is None:
            return False
        self.cpr_table.delete("getfd", name)
        os.close(fd)
        return True

    def release_unclaimed_fds(self) -> None:
        """After an incoming CPR: fds the new command line did not ask for are closed."""
        for key, fd in list(self.cpr_table.fds.items()):
            if key not in self._claimed:
                self.cpr_table.delete(*key)
                os.close(fd)

    def cpr_blockers(self) -> list[str]:
        """Why this machine cannot do cpr-exec or cpr-transfer (QEMU's wording)."""
        return [
            f"Memory region {b.name} is not compatible with CPR. share=on is required for memory-backend objects, "
            "and aux-ram-share=on is required."
            for b in self.memory.blocks
            if not b.shared or b.fd < 0
        ]

    def _make_block(self, name: str, size: int, backend: MemoryBackendConfig | None, option: str) -> RamBlock:
        kind = "memfd" if backend is None else backend.kind
        shared = self.config.aux_ram_share if backend is None else backend.share
        saved = self.cpr_table.find("ram", name)
        if saved >= 0:  # an incoming CPR: the guest's RAM, as it is
            self._claimed.add(("ram", name))
            have = os.fstat(saved).st_size
            if have < size:
                raise MachineError(option, f"cpr: RAM block '{name}' has {have} bytes, this machine needs {size}")
            try:
                return RamBlock.from_fd(name, size, saved, shared=shared, kind=kind)
            except GuestMemoryError as e:
                raise MachineError(option, str(e)) from None
        block = self._new_block(name, size, backend, option)
        if block.fd >= 0:
            self.cpr_table.save("ram", name, block.fd)
            self._claimed.add(("ram", name))
        return block

    def _new_block(self, name: str, size: int, backend: MemoryBackendConfig | None, option: str) -> RamBlock:
        limit = host_memory_limit()
        if size > limit:
            raise MachineError(
                option,
                f"cannot set up guest memory '{name}': {_size_text(size)} is more than the host has "
                f"({_size_text(limit)} of RAM and swap)",
            )
        try:
            if backend is None:
                prealloc = self.config.mem_prealloc and name == "pc.ram"
                return RamBlock.memfd(name, size, shared=self.config.aux_ram_share, prealloc=prealloc)
            if backend.kind == "memfd":
                return RamBlock.memfd(
                    name, size, shared=backend.share, hugetlb=backend.hugetlb, prealloc=backend.prealloc
                )
            if backend.kind == "file":
                return RamBlock.file(name, size, backend.mem_path, shared=backend.share, prealloc=backend.prealloc)
            return RamBlock.anonymous(name, size, shared=backend.share, prealloc=backend.prealloc)
        except GuestMemoryError as e:
            raise MachineError(option, str(e)) from None

    def _build_memory(self) -> None:
        cfg = self.config
        size = self._ram_size()
        if cfg.memory_backend is not None:
            backend = cfg.backends[cfg.memory_backend]
            ram = self._make_block(backend.id, size, backend, backend.option)
        else:
            ram = self._make_block("pc.ram", size, None, f"-m {cfg.ram_size_option or size >> 20}")
        self.memory.add_block(ram)
        offset = 0
        split = len(self.ram_ranges) > 1
        for (gpa, length), label in zip(self.ram_ranges, ("ram-below-4g", "ram-above-4g")):
            self.memory.map(gpa, length, ram, offset, label if split else None)
            offset += length
        if self.image.kind == "bios":
            fw = self.image.firmware
            rom_size = -(-len(fw) // layout.PAGE_SIZE) * layout.PAGE_SIZE
            rom = self._make_block("pc.bios", rom_size, None, f"-bios {cfg.bios}")
            rom.readonly = True
            if not cfg.incoming:  # incoming, the ROM comes with the stream or stays in its memfd (CPR)
                rom.mem[rom_size - len(fw) :] = fw
            self.memory.add_block(rom)
            self.memory.map(layout.FOUR_GIB - rom_size, rom_size, rom, 0)
            alias = min(rom_size, layout.BIOS_ALIAS_MAX)
            self.memory.map(layout.BIOS_ALIAS_END - alias, alias, rom, rom_size - alias, "isa-bios")
        for slot, m in enumerate(self.memory.mappings):
            flags = c.KVM_MEM_READONLY if m.block.readonly else 0
            self.vm.set_user_memory_region(slot, m.gpa, m.size, m.block.host_addr + m.offset, flags)
            self.memslots.append(Slot(slot, m))

    def _open_chardev(self, cc: ChardevConfig) -> Chardev:
        try:
            if cc.backend == "stdio":
                return StdioChardev(cc.id)
            if cc.backend == "file":
                return FileChardev(cc.id, cc.path, cc.append, self.preserve)
            if cc.backend == "socket":
                if cc.fd is not None:
                    self.check_saved_fd("chardev-socket", cc.id, cc.option)
                return SocketChardev(cc.id, cc.path, cc.wait, message, self.preserve, cc.fd)
            return Chardev(cc.id)
        except ChardevError as e:
            raise MachineError(cc.option, str(e)) from None

    def _build_devices(self) -> None:
        cfg = self.config
        serials = cfg.serials or [ChardevConfig("serial0", "stdio", option="-serial stdio")]
        if len(serials) > len(COM_PORTS):
            raise MachineError(serials[len(COM_PORTS)].option, f"at most {len(COM_PORTS)} serial ports")
        for index, cc in enumerate(serials):
            if cc.backend == "none":
                continue
            chardev = self._open_chardev(cc)
            self.chardevs.append(chardev)
            port, irq = COM_PORTS[index]
            uart = Serial(
                chardev.write,
                self._isa_irq(irq),
                name=f"serial{index}",
                room_available=chardev.frontend_ready,
            )
            chardev.attach(self.loop, uart)
            self.pio.register(port, 8, uart)
        self.postcode = PostCode(trace="postcode" in cfg.trace)
        ram_below = self.ram_ranges[0][1]
        ram_above = sum(size for _, size in self.ram_ranges[1:])
        self.pio.register(layout.PORT_POST, 1, self.postcode)
        self.pio.register(layout.PORT_I8042_DATA, 5, I8042(lambda: self.request_reset("guest-reset")))
        self.pio.register(layout.PORT_CMOS, 2, Rtc(ram_below, ram_above))
        self.pio.register(layout.PORT_ACPI_PM1A_CNT, 2, AcpiPm(lambda: self.request_shutdown("guest-shutdown")))
        for dev in cfg.devices:
            self._add_device(dev)

    def _isa_irq(self, gsi: int) -> Callable[[int], None]:
        """An edge-triggered ISA interrupt line, as Firecracker wires its devices: through
        an irqfd (an eventfd KVM listens on) when KVM has them, else KVM_IRQ_LINE.

        The eventfd is a device fd like VFIO's interrupt eventfds: it is kept in the CPR
        table ("irqfd", "gsiN"), so an update binds the very same eventfd to the new VM.
        A rising edge is all an edge-triggered PIC or IOAPIC input sees of a level, so a
        pulse per rise of the device's level is the same interrupt.
        """
        if not self.kvm.check_extension(c.KVM_CAP_IRQFD):
            return lambda level: self.vm.irq_line(gsi, level)
        fd = self.irqfds.get(gsi)
        if fd is None:
            fd, _ = self.preserve("irqfd", f"gsi{gsi}", lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self.irqfds[gsi] = fd

        def raise_edge(level: int) -> None:
            if level:
                os.eventfd_write(fd, 1)  # while unbound the count waits; binding injects it

        return raise_edge

    def bind_irqfds(self, bind: bool = True) -> None:
        """Bind the irqfds to this VM, or let them go (a CPR source, stopped, before the new VM binds them)."""
        if bind == self.irqfds_bound:
            return
        for gsi, fd in self.irqfds.items():
            self.vm.irqfd(fd, gsi, assign=bind)
        self.irqfds_bound = bind

    def _add_device(self, dev: DeviceConfig) -> None:
        """-device: the ISA devices QEMU users reach for in tests, at their QEMU defaults."""
        defaults = {
            "isa-debug-exit": {"iobase": layout.PORT_DEBUG_EXIT_DEFAULT, "iosize": 2},
            "pvpanic": {"ioport": pvpanic.DEFAULT_IOPORT},
        }
        if dev.driver not in defaults:
            raise MachineError(dev.option, f"'{dev.driver}' is not a valid device model name")
        props = dict(defaults[dev.driver])
        for key, value in dev.props.items():
            if key not in props:
                raise MachineError(dev.option, f"Property '{dev.driver}.{key}' not found")
            try:
                props[key] = int(value, 0)
            except ValueError:
                raise MachineError(dev.option, f"Property '{dev.driver}.{key}' takes a number, not '{value}'") from None
        if dev.driver == "isa-debug-exit":
            base, size = props["iobase"], props["iosize"]
            device = DebugExit(lambda status: self.request_shutdown("guest-shutdown", status), base, size)
        else:
            base, size = props["ioport"], 1
            device = pvpanic.PvPanic(self.request_panic, lambda: self.emit_threadsafe("GUEST_CRASHLOADED"))
        if not (base >= 0 and size >= 1 and base + size <= 0x10000):
            raise MachineError(dev.option, f"port range {base:#x}+{size:#x} is outside 0-0xffff")
        try:
            self.pio.register(base, size, device)
        except BusError as e:
            raise MachineError(dev.option, str(e)) from None

    def _build_vcpus(self) -> None:
        cfg = self.config
        supported = self.kvm.supported_cpuid()
        self.cpuid = cfg.cpu.apply(supported, warn=message)
        leaf1 = next(e for e in self.cpuid if e.function == 1)
        self.cpu_signature, self.cpu_features = leaf1.eax, leaf1.edx
        xsave2 = self.kvm.check_extension(c.KVM_CAP_XSAVE2)
        self.initial_states = []
        for index in range(cfg.smp):
            vcpu = self.vm.create_vcpu(index)
            vcpu.set_cpuid2(cpuid.for_vcpu(self.cpuid, index, cfg.smp))
            vcpu.set_msrs(msr.boot_msrs())
            if index == 0:  # what this host can save, decided once, on the first vCPU
                self.state_caps = vcpu_state.StateCaps(
                    xsave_size=xsave2 or (4096 if self.kvm.check_extension(c.KVM_CAP_XSAVE) else 0),
                    xcrs=bool(self.kvm.check_extension(c.KVM_CAP_XCRS)),
                    msr_indices=vcpu_state.readable_msrs(vcpu, self.kvm.msr_index_list()),
                )
            lapic = vcpu.get_lapic()
            regs = bytearray(lapic.regs)
            regs[APIC_LVT0 : APIC_LVT0 + 4] = APIC_MODE_EXTINT.to_bytes(4, "little")
            regs[APIC_LVT1 : APIC_LVT1 + 4] = APIC_MODE_NMI.to_bytes(4, "little")
            lapic.regs = bytes(regs)
            vcpu.set_lapic(lapic)
            self.initial_states.append(vcpu_state.save(vcpu, self.state_caps))
            self.vcpus.append(VcpuThread(vcpu, self.pio, self.mmio, self._on_vcpu_exit, self._describe))

    def _load_boot(self) -> None:
        from .arch.x86 import boot

        try:
            entry = boot.load(
                self.image,
                self.memory,
                self.ram_ranges,
                ncpus=self.config.smp,
                cpu_signature=self.cpu_signature,
                cpu_features=self.cpu_features,
                gib_pages=cpuid.has_feature(self.cpuid, "pdpe1gb"),
            )
        except boot.BootError as e:
            raise MachineError("", str(e)) from None
        self._enter(self.vcpus[0].vcpu, entry)

    def _enter(self, vcpu: Vcpu, entry) -> None:
        """Put the boot CPU in the state ``entry`` asks for."""
        if entry.mode == "reset":
            return
        sregs = vcpu.get_sregs()
        if entry.mode == "protected":
            gdt = modes.protected_mode(sregs)
        else:
            gdt = modes.long_mode(sregs, layout.PML4_ADDR)
        self.memory.write(layout.GDT_ADDR, gdt)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(kvm_regs(rip=entry.rip, rax=entry.rax, rbx=entry.rbx, rsp=entry.rsp, rflags=2))
        fpu = kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
        vcpu.set_fpu(fpu)

    def _describe(self, thread: VcpuThread) -> str:
        from .arch.x86 import inspect

        return inspect.describe(thread.vcpu, self.memory)

    # --- run state and events (main thread, unless a method says otherwise) ------
    def add_event_listener(self, listener: Callable[[str, dict | None], None]) -> None:
        self.listeners.append(listener)

    def emit(self, event: str, data: dict | None = None) -> None:
        """A QMP event (STOP, RESUME, RESET, SHUTDOWN, ...) for every listener."""
        for listener in list(self.listeners):
            listener(event, data)

    def emit_threadsafe(self, event: str, data: dict | None = None) -> None:
        self.loop.call_soon_threadsafe(self.emit, event, data)

    def set_runstate(self, new: str) -> None:
        runstate.check_transition(self.runstate, new)
        self.runstate = new

    def _pause_vcpus(self) -> None:
        for t in self.vcpus:
            t.request_pause()
        for t in self.vcpus:
            t.wait_paused()

    def _resume_vcpus(self) -> None:
        if self.runstate == runstate.RUNNING:
            for t in self.vcpus:
                t.resume()

    def vm_start(self) -> None:
        """QEMU's vm_start: run the vCPUs and emit RESUME (nothing when already running)."""
        if self.runstate == runstate.RUNNING:
            return
        self.set_runstate(runstate.RUNNING)
        self._resume_vcpus()
        self.emit("RESUME")

    def vm_stop(self, state: str = runstate.PAUSED) -> None:
        """QEMU's vm_stop: stop every vCPU, enter ``state`` and emit STOP, if the VM runs."""
        if not runstate.is_live(self.runstate):
            return
        self.set_runstate(state)
        self._pause_vcpus()
        for t in self.vcpus:
            try:
                t.vcpu.kvmclock_ctrl()  # tell a kvmclock guest it was stopped (no soft lockups)
            except KvmError:
                pass  # the guest does not use kvmclock
        self.emit("STOP")

    def vm_stop_force_state(self, state: str) -> None:
        """QEMU's vm_stop_force_state: stop if running, else just enter ``state``."""
        if runstate.is_live(self.runstate):
            self.vm_stop(state)
        else:
            self.set_runstate(state)

    def named_fd(self, name: str) -> int:
        fd = self.named_fds.get(name)
        if fd is None:
            raise KeyError(f"File descriptor named '{name}' has not been found")
        return fd

    @contextmanager
    def vcpu_paused(self, index: int) -> Iterator[Vcpu]:
        """One vCPU held out of KVM_RUN, so its state can be read or changed."""
        thread = self.vcpus[index]
        thread.request_pause()
        thread.wait_paused()
        try:
            yield thread.vcpu
        finally:
            if self.runstate == runstate.RUNNING:
                thread.resume()

    def start(self) -> None:
        """Start the vCPU threads (once); they run unless the machine starts paused (-S) or incoming."""
        if self.vcpus and self.vcpus[0].thread.is_alive():
            return
        install_kick_handler()
        for t in self.vcpus:
            t.start()
        if not self.config.start_paused and self.runstate == runstate.PRELAUNCH:
            self.vm_start()

    def reset(self, reason: str) -> None:
        """QEMU's qemu_system_reset with the vCPUs paused: power-on vCPU and irqchip
        state, devices reset, boot images reloaded; RESET is emitted."""
        for t, state in zip(self.vcpus, self.initial_states):
            vcpu_state.restore(t.vcpu, state)
        for chip in self.initial_irqchips:
            self.vm.set_irqchip(chip)
        self.vm.set_pit2(self.initial_pit)
        for device in self.pio.devices() + self.mmio.devices():
            if hasattr(device, "reset"):
                device.reset()
        if self.runstate != runstate.INMIGRATE:  # as QEMU's rom_reset: RAM still to come is not written
            self._load_boot()
        self.emit("RESET", {"guest": reason.startswith("guest"), "reason": reason})

    # --- requests: from any thread, carried out on the main loop --------------------
    def _stop_vcpus_now(self) -> None:
        """Keep the guest from running another instruction while a request is pending."""
        for t in self.vcpus:
            t.request_pause()

    def request_shutdown(self, reason: str, status: int = 0, text: str | None = None, force: bool = False) -> None:
        """QEMU's qemu_system_shutdown_request. ``force`` (quit, signals) ignores -no-shutdown."""
        with self._request_lock:
            if self.shutdown_request is not None:
                return
            self.shutdown_request = ShutdownRequest(reason, status, text, force)
        self._stop_vcpus_now()
        self.loop.call_soon_threadsafe(self._handle_shutdown)

    def request_reset(self, reason: str, text: str | None = None) -> None:
        """QEMU's qemu_system_reset_request; with -no-reboot it becomes a shutdown."""
        if self.config.no_reboot:
            self.request_shutdown(reason, 1 if text else 0, text)
            return
        self._stop_vcpus_now()
        self.loop.call_soon_threadsafe(self._handle_reset, reason)

    def request_panic(self) -> None:
        """The guest says it panicked (pvpanic): QEMU's -action panic=... decides."""
        self._stop_vcpus_now()
        self.loop.call_soon_threadsafe(self._handle_panic)

    def _handle_shutdown(self) -> None:
        req = self.shutdown_request
        if req is None:
            return
        if req.message:
            message(req.message)
        self.emit("SHUTDOWN", {"guest": req.reason.startswith("guest"), "reason": req.reason})
        if self.config.no_shutdown and not req.force:
            self.shutdown_request = None
            self.vm_stop(runstate.SHUTDOWN)
            self._resume_vcpus()  # nothing runs unless the state allows it
            return
        self.exit_status = req.status
        self.loop.stop()

    def _handle_reset(self, reason: str) -> None:
        if self.shutdown_request is not None:
            return
        self._pause_vcpus()
        self.reset(reason)
        if self.runstate not in (runstate.RUNNING, runstate.INMIGRATE, runstate.FINISH_MIGRATE):
            self.set_runstate(runstate.PRELAUNCH)
        self._resume_vcpus()

    def _handle_panic(self) -> None:
        action = self.config.panic_action
        if action == "none":
            self.emit("GUEST_PANICKED", {"action": "run"})
            self._resume_vcpus()
            return
        pause = action == "pause" or (action == "shutdown" and self.config.no_shutdown)
        self.emit("GUEST_PANICKED", {"action": "pause" if pause else "poweroff"})
        self.vm_stop(runstate.GUEST_PANICKED)
        if not pause:
            self.request_shutdown("guest-panic", 1 if action == "exit-failure" else 0)

    def _handle_vcpu_failure(self, text: str) -> None:
        message(text)
        if self.config.monitors:
            self.vm_stop(runstate.INTERNAL_ERROR)  # stays for the monitor to inspect, as QEMU does
        else:
            self.request_shutdown("host-error", 1, force=True)

    def _on_vcpu_exit(self, thread: VcpuThread, why: VcpuExit) -> None:
        """A vCPU cannot go on (its thread, now parked)."""
        where = f"vcpu{thread.index}: {why.message}"
        if why.kind == "shutdown":
            self.request_reset("guest-reset", f"{where}; -no-reboot was given, so minivmm exits")
        elif why.kind == "system-event" and why.data == c.KVM_SYSTEM_EVENT_SHUTDOWN:
            self.request_shutdown("guest-shutdown")
        elif why.kind == "system-event" and why.data == c.KVM_SYSTEM_EVENT_RESET:
            self.request_reset("guest-reset")
        elif why.kind == "system-event" and why.data == c.KVM_SYSTEM_EVENT_CRASH:
            self.request_panic()
        else:
            self.loop.call_soon_threadsafe(self._handle_vcpu_failure, where)

    def run(self) -> int:
        """Run until the guest or the host ends the machine; the process exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.start()
            self.loop.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._pause_vcpus()
        return self.exit_status

    def _on_signal(self, signum: int, frame) -> None:
        self.request_shutdown("host-signal", 0, f"terminating on signal {signum}", force=True)

    def close(self) -> None:
        for name in list(self.named_fds):
            self.close_named_fd(name)
        for t in self.vcpus:
            t.quit()
        for chardev in self.chardevs:
            chardev.close()
        for fd in self.irqfds.values():
            os.close(fd)
        self.irqfds.clear()
        self.memory.close()
        for t in self.vcpus:
            t.vcpu.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if getattr(self, "kvm", None) is not None:
            self.kvm.close()
        sys.stdout.flush()

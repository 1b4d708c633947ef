"""Thin wrappers over the /dev/kvm, VM and vCPU file descriptors: ioctls, no policy.

Every ioctl goes through libc's ioctl() by ctypes with errno captured, so an
EINTR from KVM_RUN reaches Python (fcntl.ioctl would retry it) and any
failure raises KvmError naming the ioctl.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from ctypes import byref, c_uint64, sizeof

from . import constants as c
from . import ioctls as io
from . import structs as s

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
get_errno = ctypes.get_errno


class KvmError(OSError):
    """A KVM ioctl failed; ``ioctl`` is its name (e.g. ``KVM_SET_SREGS``)."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl = ioctl
        msg = f"{ioctl} failed: {os.strerror(err)}"
        super().__init__(err, msg + (f" ({detail})" if detail else ""))

    def __str__(self) -> str:
        return self.args[1]


def ioctl(fd: int, request: int, arg: object = None) -> int:
    if not isinstance(fd, int):  # a stand-in: the ioctl is made elsewhere (cpr/keeper.py)
        return fd.ioctl(request, arg)
    ret = _ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(io.NAMES.get(request, hex(request)), get_errno())
    return ret


def _get(fd: int, request: int, struct: type) -> ctypes.Structure:
    value = struct()
    ioctl(fd, request, byref(value))
    return value


class Kvm:
    """The /dev/kvm system fd: capabilities, supported CPUID, MSR lists, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = ioctl(self.fd, io.KVM_GET_API_VERSION)
        if version != c.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError("KVM_GET_API_VERSION", errno.EINVAL, f"API version {version}, need {c.KVM_API_VERSION}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        n = 64
        while True:
            buf = s.cpuid2_with(n)()
            buf.nent = n
            try:
                ioctl(self.fd, io.KVM_GET_SUPPORTED_CPUID, byref(buf))
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [s.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def _index_list(self, request: int) -> list[int]:
        probe = s.msr_list_with(0)()
        try:
            ioctl(self.fd, request, byref(probe))
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        buf = s.msr_list_with(probe.nmsrs)()
        buf.nmsrs = probe.nmsrs
        ioctl(self.fd, request, byref(buf))
        return list(buf.indices[: buf.nmsrs])

    def msr_index_list(self) -> list[int]:
        return self._index_list(io.KVM_GET_MSR_INDEX_LIST)

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, io.KVM_CREATE_VM, 0))


class Vm:
    """A VM fd. Memory slots, the in-kernel irqchip and PIT, the clock."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        os.set_inheritable(fd, False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, gpa, size, host_addr)
        ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, byref(region))

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, io.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, io.KVM_SET_IDENTITY_MAP_ADDR, byref(c_uint64(addr)))

    def create_irqchip(self) -> None:
        ioctl(self.fd, io.KVM_CREATE_IRQCHIP)

    def enable_split_irqchip(self, ioapic_pins: int) -> None:
        """An in-kernel LAPIC only; the PIC, IOAPIC and PIT are the VMM's (before any vCPU).

        GSIs below ``ioapic_pins`` are the IOAPIC's: their MSI routes tell KVM which
        vectors to report as KVM_EXIT_IOAPIC_EOI.
        """
        cap = s.kvm_enable_cap(cap=c.KVM_CAP_SPLIT_IRQCHIP)
        cap.args[0] = ioapic_pins
        ioctl(self.fd, io.KVM_ENABLE_CAP, byref(cap))

    def set_gsi_routing(
        self, irqchip_routes: Iterable[tuple[int, int, int]] = (), msi_routes: Mapping[int, tuple[int, int]] = {}
    ) -> None:
        """Replace the routing table: (GSI, irqchip, pin) entries, and GSI -> (MSI address, MSI data)."""
        chips = list(irqchip_routes)
        table = s.irq_routing_with(len(chips) + len(msi_routes))(nr=len(chips) + len(msi_routes))
        entries = iter(table.entries)
        for (gsi, chip, pin), entry in zip(chips, entries):
            entry.gsi, entry.type = gsi, c.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
        for (gsi, (address, data)), entry in zip(sorted(msi_routes.items()), entries):
            entry.gsi, entry.type = gsi, c.KVM_IRQ_ROUTING_MSI
            entry.u.msi.address_lo, entry.u.msi.address_hi, entry.u.msi.data = address & 0xFFFFFFFF, address >> 32, data
        ioctl(self.fd, io.KVM_SET_GSI_ROUTING, byref(table))

    def create_pit2(self, flags: int = c.KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, io.KVM_CREATE_PIT2, byref(s.kvm_pit_config(flags=flags)))

    def reinject_control(self, pit_reinject: bool) -> None:
        ioctl(self.fd, io.KVM_REINJECT_CONTROL, byref(s.kvm_reinject_control(pit_reinject=int(pit_reinject))))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, io.KVM_IRQ_LINE, byref(s.kvm_irq_level(irq, level)))

    def signal_msi(self, address: int, data: int) -> int:
        """Deliver one MSI (a device's or the IOMMU's own); >0 delivered, 0 blocked by the guest."""
        msi = s.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data & 0xFFFFFFFF)
        return ioctl(self.fd, io.KVM_SIGNAL_MSI, byref(msi))

    def irqfd(self, fd: int, gsi: int, assign: bool = True, resample: int | None = None) -> None:
        """Each write to eventfd ``fd`` becomes an edge on ``gsi``, injected by the kernel; with
        ``resample`` (an eventfd) it raises the level-triggered line instead, and the guest's EOI
        lowers it and signals ``resample`` (a device's INTx, unmasked by that signal).

        An eventfd serves one VM at a time (EBUSY otherwise), so a CPR source lets go
        of it (``assign=False``) before the new VM binds it.
        """
        resampling = assign and resample is not None
        flags = (0 if assign else c.KVM_IRQFD_FLAG_DEASSIGN) | (c.KVM_IRQFD_FLAG_RESAMPLE if resampling else 0)
        arg = s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resample if resampling else 0)
        ioctl(self.fd, io.KVM_IRQFD, byref(arg))

    def register_coalesced(self, addr: int, size: int, pio: bool) -> None:
        """Guest writes to [addr, addr+size) go to the coalesced ring instead of exiting (CoalescedRing)."""
        zone = s.kvm_coalesced_mmio_zone(addr=addr, size=size, pio=int(pio))
        ioctl(self.fd, io.KVM_REGISTER_COALESCED_MMIO, byref(zone))

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        chip = s.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, io.KVM_GET_IRQCHIP, byref(chip))
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        ioctl(self.fd, io.KVM_SET_IRQCHIP, byref(chip))

    def get_pit2(self) -> s.kvm_pit_state2:
        return _get(self.fd, io.KVM_GET_PIT2, s.kvm_pit_state2)

    def set_pit2(self, state: s.kvm_pit_state2) -> None:
        ioctl(self.fd, io.KVM_SET_PIT2, byref(state))

    def get_clock(self) -> s.kvm_clock_data:
        return _get(self.fd, io.KVM_GET_CLOCK, s.kvm_clock_data)

    def set_clock(self, data: s.kvm_clock_data) -> None:
        ioctl(self.fd, io.KVM_SET_CLOCK, byref(data))

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:
        log = s.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, io.KVM_GET_DIRTY_LOG, byref(log))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        return Vcpu(self, vcpu_id, ioctl(self.fd, io.KVM_CREATE_VCPU, vcpu_id))

    def create_device(self, type_: int) -> KvmDevice:
        """An in-kernel device of ``type_`` (KVM_DEV_TYPE_*): its own fd, configured by attributes."""
        dev = s.kvm_create_device(type=type_)
        ioctl(self.fd, io.KVM_CREATE_DEVICE, byref(dev))
        return KvmDevice(dev.fd)


class KvmDevice:
    """A KVM_CREATE_DEVICE fd. The VFIO pseudo-device is one: it learns the VFIO files the VM uses
    (KVM_DEV_VFIO_GROUP_ADD), so KVM can tie them to the VM (coherent DMA, the device's own KVM hooks)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_inheritable(fd, False)

    def set_attr(self, group: int, attr: int, value: int) -> None:
        """KVM_SET_DEVICE_ATTR with a pointer to the 32-bit ``value`` (an fd, for the VFIO device)."""
        arg = ctypes.c_int32(value)
        attribute = s.kvm_device_attr(group=group, attr=attr, addr=ctypes.addressof(arg))
        ioctl(self.fd, io.KVM_SET_DEVICE_ATTR, byref(attribute))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU fd and its mmap'd struct kvm_run."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        os.set_inheritable(fd, False)
        self.run_mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = s.kvm_run.from_buffer(self.run_mmap)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run
            self.run_mmap.close()
            os.close(self.fd)
            self.fd = -1

    def interrupt(self, vector: int) -> None:
        """Queue an external interrupt (the userspace PIC's ExtINT, split irqchip)."""
        ioctl(self.fd, io.KVM_INTERRUPT, byref(s.kvm_interrupt(vector)))

    def get_regs(self) -> s.kvm_regs:
        return _get(self.fd, io.KVM_GET_REGS, s.kvm_regs)

    def set_regs(self, regs: s.kvm_regs) -> None:
        ioctl(self.fd, io.KVM_SET_REGS, byref(regs))

    def get_sregs(self) -> s.kvm_sregs:
        return _get(self.fd, io.KVM_GET_SREGS, s.kvm_sregs)

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        ioctl(self.fd, io.KVM_SET_SREGS, byref(sregs))

    def get_fpu(self) -> s.kvm_fpu:
        return _get(self.fd, io.KVM_GET_FPU, s.kvm_fpu)

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        ioctl(self.fd, io.KVM_SET_FPU, byref(fpu))

    def get_xsave(self, size: int) -> ctypes.Structure:
        """XSAVE area; ``size`` > 4096 (from KVM_CAP_XSAVE2) uses KVM_GET_XSAVE2."""
        buf = s.xsave_with(size)()
        ioctl(self.fd, io.KVM_GET_XSAVE2 if size > s.KVM_XSAVE_LEGACY_SIZE else io.KVM_GET_XSAVE, byref(buf))
        return buf

    def set_xsave(self, buf: ctypes.Structure) -> None:
        ioctl(self.fd, io.KVM_SET_XSAVE, byref(buf))

    def get_xcrs(self) -> s.kvm_xcrs:
        return _get(self.fd, io.KVM_GET_XCRS, s.kvm_xcrs)

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        ioctl(self.fd, io.KVM_SET_XCRS, byref(xcrs))

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = s.msrs_with(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        got = ioctl(self.fd, io.KVM_GET_MSRS, byref(buf))
        return {buf.entries[i].index: buf.entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> None:
        buf = s.msrs_with(len(values))()
        buf.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        done = ioctl(self.fd, io.KVM_SET_MSRS, byref(buf))
        if done != len(values):
            bad = buf.entries[done].index
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} = {values[bad]:#x} rejected")

    def set_cpuid2(self, entries: list[s.kvm_cpuid_entry2]) -> None:
        buf = s.cpuid2_with(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        ioctl(self.fd, io.KVM_SET_CPUID2, byref(buf))

    def get_cpuid2(self, n: int = 256) -> list[s.kvm_cpuid_entry2]:
        buf = s.cpuid2_with(n)()
        buf.nent = n
        ioctl(self.fd, io.KVM_GET_CPUID2, byref(buf))
        return [s.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_lapic(self) -> s.kvm_lapic_state:
        return _get(self.fd, io.KVM_GET_LAPIC, s.kvm_lapic_state)

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        ioctl(self.fd, io.KVM_SET_LAPIC, byref(lapic))

    def get_mp_state(self) -> int:
        return _get(self.fd, io.KVM_GET_MP_STATE, s.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, io.KVM_SET_MP_STATE, byref(s.kvm_mp_state(state)))

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return _get(self.fd, io.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events)

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        ioctl(self.fd, io.KVM_SET_VCPU_EVENTS, byref(events))

    def get_debugregs(self) -> s.kvm_debugregs:
        return _get(self.fd, io.KVM_GET_DEBUGREGS, s.kvm_debugregs)

    def set_debugregs(self, regs: s.kvm_debugregs) -> None:
        ioctl(self.fd, io.KVM_SET_DEBUGREGS, byref(regs))

    def translate(self, linear: int) -> s.kvm_translation:
        tr = s.kvm_translation(linear_address=linear)
        ioctl(self.fd, io.KVM_TRANSLATE, byref(tr))
        return tr

    def get_tsc_khz(self) -> int:
        return ioctl(self.fd, io.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, io.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        ioctl(self.fd, io.KVM_KVMCLOCK_CTRL)


class CoalescedRing:
    """The VM's ring of coalesced writes, which KVM fills instead of exiting to userspace.

    KVM maps it in every vCPU's mmap at the page KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)
    returns; this is a mapping of its own (it outlives nothing and pins no vCPU buffer).
    One consumer at a time: the caller serializes ``pop``.
    """

    def __init__(self, vcpu: Vcpu, page: int) -> None:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        self._mmap = mmap.mmap(vcpu.fd, mmap.PAGESIZE, mmap.MAP_SHARED, prot, offset=page * mmap.PAGESIZE)
        self._ring = s.coalesced_mmio_ring_with(s.KVM_COALESCED_MMIO_MAX).from_buffer(self._mmap)
        self.address, self.size = ctypes.addressof(self._ring), sizeof(self._ring)  # for a copy (cpr/keeper.py)

    @classmethod
    def copy(cls, data: bytes) -> CoalescedRing:
        """A ring as copied out of another address space: ``pop`` gives what it held."""
        ring = cls.__new__(cls)
        ring._mmap = bytearray(data)
        ring._ring = s.coalesced_mmio_ring_with(s.KVM_COALESCED_MMIO_MAX).from_buffer(ring._mmap)
        return ring

    def pop(self) -> Iterator[tuple[bool, int, bytes]]:
        """(pio, address, data) of each queued write, oldest first; each leaves the ring once handled."""
        ring = self._ring
        while ring.first != ring.last:  # KVM fills an entry before it moves last past it
            entry = ring.coalesced_mmio[ring.first]
            yield bool(entry.pio), entry.phys_addr, bytes(entry.data[: entry.len])
            ring.first = (ring.first + 1) % s.KVM_COALESCED_MMIO_MAX

    def close(self) -> None:
        self._ring = None
        if isinstance(self._mmap, mmap.mmap):
            self._mmap.close()


assert sizeof(s.kvm_regs) == 144

"""-device vfio-pci: a host PCI function assigned to the guest through its kernel VFIO device fd.

The function is vfio_function.py's (the configuration shadow, BARs, interrupts as KVM irqfds), with
the device fd as its transport: region info by VFIO_DEVICE_GET_REGION_INFO, accesses by
pread/pwrite at the region's offset in the fd, BARs the kernel lets us map
(VFIO_REGION_INFO_FLAG_MMAP, without a sparse-mmap capability) mmap'd and given to the guest as
memory slots, the interrupt eventfds by VFIO_DEVICE_SET_IRQS, and VFIO_DEVICE_RESET. How the fd was
reached (a container and group, or an iommufd and the device's cdev) is vfio/kernel.py's.

A device found in the CPR table is the previous image's, running: it is not reset, and the
eventfds it signals are the ones in the table, so its interrupts after the load need no
SET_IRQS (``keeps_irqs``).
"""

from __future__ import annotations

import mmap

from minivmm.vfio import constants as vc
from minivmm.vfio.kernel import DeviceFd

from .vfio_function import Region, TransportError, VfioFunction, Wiring


class KernelTransport:
    """A VFIO device fd as a function's transport. The kernel answers every access: an error
    (EIO from a device gone bad) fails that access alone."""

    keeps_irqs = True

    def __init__(self, device: DeviceFd) -> None:
        self.device = device
        self.regions: dict[int, Region] = {}

    def num_regions(self) -> int:
        return self.device.num_regions

    def region(self, index: int) -> Region:
        if index not in self.regions:
            try:
                info = self.device.region_info(index)
            except OSError as e:
                raise TransportError(f"region {index}: {e.strerror}") from None
            self.regions[index] = Region(info.size, info.flags, info.offset)
        return self.regions[index]

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        r = self.region(region)
        try:
            return self.device.read(r.offset + offset, count)
        except OSError as e:
            raise TransportError(f"read of region {region} at {offset:#x}: {e.strerror}") from None

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        r = self.region(region)
        try:
            self.device.write(r.offset + offset, data)
        except OSError as e:
            raise TransportError(f"write of region {region} at {offset:#x}: {e.strerror}") from None

    def map_region(self, index: int, region: Region) -> mmap.mmap | None:
        """The region's pages, when the kernel lets them be mapped whole (a sparse-mmap capability
        means holes, such as the MSI-X table: that BAR stays trapped)."""
        if not region.flags & vc.VFIO_REGION_INFO_FLAG_MMAP or region.flags & vc.VFIO_REGION_INFO_FLAG_CAPS:
            return None
        try:
            return self.device.map(region.offset, region.size)
        except OSError:
            return None  # trapped instead, as QEMU falls back

    def irq_count(self, index: int) -> int:
        try:
            return self.device.irq_count(index)
        except OSError:
            return 0  # an index the device does not have

    def set_irqs(self, index: int, action: int, fds: list[int] | None = None, count: int = 1) -> None:
        try:
            self.device.set_irqs(index, action, fds, count)
        except OSError as e:
            raise TransportError(f"VFIO_DEVICE_SET_IRQS: {e.strerror}") from None

    def reset(self) -> None:
        try:
            self.device.reset()
        except OSError as e:
            raise TransportError(f"VFIO_DEVICE_RESET: {e.strerror}") from None

    def close(self) -> None:
        self.device.close()


class VfioPci(VfioFunction):
    name = "vfio-pci"

    def __init__(self, dev_id: str, device: DeviceFd, wiring: Wiring) -> None:
        """``device`` is attached (its DMA mapped) and its info read; a new one is reset here, as
        QEMU's machine reset at start-up resets it."""
        self.dev_id, self.device = dev_id, device
        transport = KernelTransport(device)
        if not device.kept:
            transport.reset()
        super().__init__(f"vfio-pci '{dev_id}'", transport, wiring, device.name, device.kept)

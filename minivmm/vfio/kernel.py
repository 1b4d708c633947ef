"""The kernel's side of device assignment, as QEMU's hw/vfio drives it: the two ways to a
host PCI device and its DMA, and the device fd itself.

- legacy (``Container``, ``Group``): /dev/vfio/vfio, VFIO_GET_API_VERSION,
  VFIO_CHECK_EXTENSION(TYPE1v2); the device's group from sysfs (iommu_group -> /dev/vfio/N),
  VFIO_GROUP_GET_STATUS (viable), VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU, then
  VFIO_GROUP_GET_DEVICE_FD(name). Guest RAM is mapped with VFIO_IOMMU_MAP_DMA by host address
  at its guest-physical address (the IOVA).
- iommufd (``Iommufd``): /dev/iommu (or an fd given), the device's cdev /dev/vfio/devices/vfioN
  (found through sysfs, or an fd given), VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC,
  VFIO_DEVICE_ATTACH_IOMMUFD_PT; guest RAM with IOMMU_IOAS_MAP_FILE (memfd and offset) where
  the kernel has it (6.13), IOMMU_IOAS_MAP by address otherwise.
- ``DeviceFd``: VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO, pread/pwrite at a region's
  offset, mmap of a region, VFIO_DEVICE_SET_IRQS with an eventfd, VFIO_DEVICE_RESET.

Every fd is opened through the CPR fd table under QEMU's names ("vfio_container_for_group" and
"vfio_group" by group number, "vfio_device" by device name, "iommufd" by object id): an fd found
there is what the previous image set up, and none of the set-up ioctls run again on it. Across a
CPR the DMA mappings move to the new process: a container's by VFIO_DMA_UNMAP_FLAG_VADDR before
and VFIO_DMA_MAP_FLAG_VADDR with the new address after (``release``/``resume``), an iommufd's by
IOMMU_IOAS_CHANGE_PROCESS in the new process (file mappings only).

Errors are VfioError with QEMU's wording; a node the kernel lacks is host.VfioUnavailable.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from ctypes import byref, c_int32, sizeof
from dataclasses import dataclass, field
from typing import Protocol

from . import constants as c
from . import host
from . import ioctls as io
from . import structs as s

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class VfioError(Exception):
    """A step of an assignment failed; the text is QEMU's for that step."""


class FdTable(Protocol):
    """The CPR fd table (cpr/fdtable.py), as the backends and vfio_function use it."""

    def open(self, name: str, id_: str, opener: Callable[[], int]) -> tuple[int, bool]: ...
    def save(self, name: str, id_: str, fd: int) -> None: ...
    def find(self, name: str, id_: str) -> int: ...
    def delete(self, name: str, id_: str) -> None: ...


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """libc's ioctl; OSError with the ioctl's name on failure."""
    ret = _ioctl(fd, request, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{io.NAMES.get(request, hex(request))}: {os.strerror(err)}")
    return ret


def _why(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


@dataclass(frozen=True)
class Window:
    """A stretch of guest RAM a device may DMA into: ``size`` bytes at IOVA ``iova`` (its guest-physical
    address), at host address ``vaddr`` in this process, and ``offset`` into its block's ``fd``."""

    iova: int
    size: int
    vaddr: int
    fd: int
    offset: int
    readonly: bool


# --- sysfs ---------------------------------------------------------------------------------------
def sysfs_device(host_bdf: str | None, sysfsdev: str | None) -> str:
    """The device's sysfs directory: host=DDDD:BB:DD.F (domain 0000 when left out) or sysfsdev=PATH."""
    if sysfsdev:
        return sysfsdev.rstrip("/")
    bdf = host_bdf if host_bdf.count(":") == 2 else f"0000:{host_bdf}"
    return f"/sys/bus/pci/devices/{bdf.lower()}"


def iommu_group(sysfsdev: str) -> int:
    """The device's IOMMU group number, from its iommu_group link (QEMU's wording when there is none)."""
    try:
        target = os.readlink(f"{sysfsdev}/iommu_group")
    except OSError as e:
        raise VfioError(f"no iommu_group found: {_why(e)}") from None
    try:
        return int(os.path.basename(target))
    except ValueError:
        raise VfioError(f"failed to read {target}") from None


def cdev_path(sysfsdev: str) -> str:
    """The device's VFIO cdev (/dev/vfio/devices/vfioN), from sysfs's vfio-dev directory, which exists
    only while the device is bound to vfio-pci on a kernel with CONFIG_VFIO_DEVICE_CDEV."""
    path = f"{sysfsdev}/vfio-dev"
    try:
        names = sorted(n for n in os.listdir(path) if n.startswith("vfio"))
    except OSError as e:
        raise VfioError(f"couldn't open directory {path}: {_why(e)}") from None
    if not names:
        raise VfioError("failed to find vfio-dev/vfioX/dev")
    return f"{c.VFIO_DEVICES_DIR}/{names[0]}"


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise VfioError(f"Could not open '{path}': {_why(e)}") from None


def _given(fd: int) -> int:
    """An fd handed over on the command line (fd=N): checked, and close-on-exec like every fd minivmm
    opens, so no child inherits it (a CPR clears the flag on the table's fds when it execs)."""
    try:
        os.set_inheritable(fd, False)
    except OSError as e:
        raise VfioError(f"Could not parse remote object fd {fd}: {_why(e)}") from None
    return fd


# --- the device fd -------------------------------------------------------------------------------
@dataclass
class DeviceFd:
    """A VFIO device fd, however it was reached."""

    name: str
    fd: int
    kept: bool  # found in the CPR table: set up by the previous image, not to be reset
    num_regions: int = 0
    num_irqs: int = 0
    flags: int = 0

    def info(self) -> None:
        info = s.sized(s.vfio_device_info)
        try:
            ioctl(self.fd, io.VFIO_DEVICE_GET_INFO, byref(info))
        except OSError as e:
            raise VfioError(f"error getting device info: {_why(e)}") from None
        if not info.flags & c.VFIO_DEVICE_FLAGS_PCI:
            raise VfioError(f"{self.name}: not a PCI device (flags {info.flags:#x})")
        self.num_regions, self.num_irqs, self.flags = info.num_regions, info.num_irqs, info.flags

    def region_info(self, index: int) -> s.vfio_region_info:
        info = s.sized(s.vfio_region_info, index=index)
        ioctl(self.fd, io.VFIO_DEVICE_GET_REGION_INFO, byref(info))
        return info

    def read(self, offset: int, count: int) -> bytes:
        data = os.pread(self.fd, count, offset)
        if len(data) != count:
            raise OSError(errno.EIO, f"short read at {offset:#x}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.EIO, f"short write at {offset:#x}")

    def map(self, offset: int, size: int) -> mmap.mmap:
        return mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def irq_count(self, index: int) -> int:
        """How many interrupts index ``index`` has (VFIO_DEVICE_GET_IRQ_INFO; 0 for none)."""
        info = s.sized(s.vfio_irq_info, index=index)
        ioctl(self.fd, io.VFIO_DEVICE_GET_IRQ_INFO, byref(info))
        return info.count

    def set_irqs(self, index: int, action: int, fds: list[int] | None = None, count: int = 1) -> None:
        """VFIO_DEVICE_SET_IRQS from interrupt 0 of ``index``: with ``fds`` (-1 for none) each one's
        eventfd for ``action``; without, ``action`` on ``count`` of them (TRIGGER on 0: the index off)."""
        if fds is None:
            arg = s.sized(s.vfio_irq_set, index=index, count=count)
            arg.flags = c.VFIO_IRQ_SET_DATA_NONE | action
        else:
            arg = s.irq_set_with(4 * len(fds))(index=index, start=0, count=len(fds))
            arg.argsz = sizeof(arg)
            arg.flags = c.VFIO_IRQ_SET_DATA_EVENTFD | action
            ctypes.memmove(arg.data, (c_int32 * len(fds))(*fds), 4 * len(fds))
        ioctl(self.fd, io.VFIO_DEVICE_SET_IRQS, byref(arg))

    def reset(self) -> None:
        if self.flags & c.VFIO_DEVICE_FLAGS_RESET:
            ioctl(self.fd, io.VFIO_DEVICE_RESET)

    def close(self) -> None:
        """This image's hold on the device; the CPR table's fd (the same one) is the table's to close."""
        self.fd = -1


# --- legacy: container and groups ----------------------------------------------------------------
@dataclass
class Group:
    number: int
    fd: int


@dataclass
class Container:
    """/dev/vfio/vfio with a type1v2 IOMMU: one per machine, shared by every group (QEMU's per address space)."""

    fds: FdTable
    fd: int = -1
    kept: bool = False
    groups: dict[int, Group] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)
    released: bool = False  # the mappings' addresses dropped (VADDR) for a CPR

    def attach(self, name: str, sysfsdev: str, ram: list[Window], new_group: Callable[[Group], None]) -> DeviceFd:
        """The device through its group: the group (and the container, first time) set up unless kept.
        ``new_group`` is told of a group this process had not used (QEMU adds it to KVM's VFIO device
        there) before the device is opened: a driver may need the group's KVM when its device opens."""
        number = iommu_group(sysfsdev)
        group = self.groups.get(number)
        if group is None:
            group = self._group(number, ram)
            new_group(group)
        try:
            fd, kept = self.fds.open("vfio_device", name, lambda: self._device_fd(group, name))
        except OSError as e:
            raise VfioError(
                f"error getting device from group {number}: {_why(e)}: Verify all devices in group {number} "
                "are bound to vfio-<bus> or pci-stub and not already in use"
            ) from None
        return DeviceFd(name, fd, kept)

    @staticmethod
    def _device_fd(group: Group, name: str) -> int:
        arg = ctypes.create_string_buffer(name.encode())
        return ioctl(group.fd, io.VFIO_GROUP_GET_DEVICE_FD, arg)

    def _group(self, number: int, ram: list[Window]) -> Group:
        fd, kept = self.fds.open("vfio_group", str(number), lambda: _open(f"/dev/vfio/{number}"))
        group = Group(number, fd)
        if not kept:
            status = s.sized(s.vfio_group_status)
            try:
                ioctl(fd, io.VFIO_GROUP_GET_STATUS, byref(status))
            except OSError as e:
                raise VfioError(f"failed to get group {number} status: {_why(e)}") from None
            if not status.flags & c.VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(
                    f"group {number} is not viable: Please ensure all devices within the iommu_group "
                    "are bound to their vfio bus driver."
                )
        try:
            self._connect(group, kept, ram)
        except VfioError as e:
            raise VfioError(f"failed to setup container for group {number}: {e}") from None
        self.groups[number] = group
        return group

    def _connect(self, group: Group, kept: bool, ram: list[Window]) -> None:
        """The group into the container: the container opened, checked and given its IOMMU the first time;
        across a CPR the kernel has it all, and only the fd is taken (one per group in the table)."""
        key = ("vfio_container_for_group", str(group.number))
        saved = self.fds.find(*key)
        if self.fd >= 0:
            if saved >= 0 and saved != self.fd:  # the same container, sent once per group: keep one fd
                os.close(saved)
            elif not kept:
                try:
                    ioctl(group.fd, io.VFIO_GROUP_SET_CONTAINER, byref(c_int32(self.fd)))
                except OSError as e:
                    raise VfioError(f"Failed to set group container: {_why(e)}") from None
            self.fds.save(*key, self.fd)
            return
        self.open(saved)
        self.fds.save(*key, self.fd)
        if self.kept:
            self.windows = list(ram)  # mapped by the previous image; their addresses come after the load
            return
        try:
            ioctl(group.fd, io.VFIO_GROUP_SET_CONTAINER, byref(c_int32(self.fd)))
        except OSError as e:
            raise VfioError(f"Failed to set group container: {_why(e)}") from None
        try:
            ioctl(self.fd, io.VFIO_SET_IOMMU, c.VFIO_TYPE1v2_IOMMU)
        except OSError as e:
            raise VfioError(f"Failed to set iommu for container: {_why(e)}") from None
        for window in ram:
            self.map(window)

    def open(self, saved: int = -1) -> None:
        """The container: ``saved`` (a CPR's, set up already) or /dev/vfio/vfio, checked for VFIO's API
        and the type1v2 IOMMU (a kernel without the node: host.VfioUnavailable, naming it)."""
        fd, kept = (saved, True) if saved >= 0 else (host.open_node(host.CONTAINER), False)
        try:
            version = ioctl(fd, io.VFIO_GET_API_VERSION)
            if version != c.VFIO_API_VERSION:
                raise VfioError(f"supported vfio version: {c.VFIO_API_VERSION}, reported version: {version}")
            if not ioctl(fd, io.VFIO_CHECK_EXTENSION, c.VFIO_TYPE1v2_IOMMU):
                raise VfioError("No available IOMMU models")
        except (VfioError, OSError):
            if not kept:  # a saved fd is the CPR table's to close
                os.close(fd)
            raise
        self.fd, self.kept = fd, kept

    def map(self, w: Window, vaddr_only: bool = False) -> None:
        """VFIO_IOMMU_MAP_DMA of ``w``; ``vaddr_only``: a mapping the kernel has, given its new address."""
        flags = c.VFIO_DMA_MAP_FLAG_VADDR if vaddr_only else c.VFIO_DMA_MAP_FLAG_READ
        if not vaddr_only and not w.readonly:
            flags |= c.VFIO_DMA_MAP_FLAG_WRITE
        arg = s.sized(s.vfio_iommu_type1_dma_map, flags=flags, vaddr=w.vaddr, iova=w.iova, size=w.size)
        try:
            ioctl(self.fd, io.VFIO_IOMMU_MAP_DMA, byref(arg))
        except OSError as e:
            what = "vfio_legacy_cpr_dma_map" if vaddr_only else "vfio_container_dma_map"
            raise VfioError(f"{what} (iova {w.iova:#x}, size {w.size:#x}, va {w.vaddr:#x}): {_why(e)}") from None
        if not vaddr_only:
            self.windows.append(w)

    def cpr_blocker(self) -> str | None:
        """Why this container cannot move its mappings to a new process (QEMU's wording), or None."""
        for ext, name in ((c.VFIO_UPDATE_VADDR, "VFIO_UPDATE_VADDR"), (c.VFIO_UNMAP_ALL, "VFIO_UNMAP_ALL")):
            if not ioctl(self.fd, io.VFIO_CHECK_EXTENSION, ext):
                return f"VFIO container does not support {name}"
        return None

    def release(self) -> None:
        """A CPR source, stopped: every mapping's address invalidated at once; the device's DMA goes on."""
        arg = s.sized(s.vfio_iommu_type1_dma_unmap, flags=c.VFIO_DMA_UNMAP_FLAG_VADDR | c.VFIO_DMA_UNMAP_FLAG_ALL)
        try:
            ioctl(self.fd, io.VFIO_IOMMU_UNMAP_DMA, byref(arg))
        except OSError as e:
            raise VfioError(f"vfio_dma_unmap_vaddr_all: {_why(e)}") from None
        self.released = True

    def resume(self, ram: list[Window]) -> None:
        """After a load (the new image), or back from a failed CPR (the source): each mapping gets this
        process's address for it."""
        if not (self.kept or self.released):
            return
        for w in ram:
            self.map(w, vaddr_only=True)
        self.windows, self.kept, self.released = list(ram), False, False


# --- iommufd -------------------------------------------------------------------------------------
@dataclass
class Iommufd:
    """An -object iommufd: /dev/iommu (or an fd given) with one IOAS its devices share."""

    fds: FdTable
    id: str
    fd: int = -1
    kept: bool = False
    ioas_id: int = 0
    windows: list[Window] = field(default_factory=list)
    by_address: list[Window] = field(default_factory=list)  # mapped by IOMMU_IOAS_MAP: CHANGE_PROCESS refuses them

    def open(self, given_fd: int | None) -> None:
        def opener() -> int:
            return host.open_node(host.IOMMUFD) if given_fd is None else _given(given_fd)

        self.fd, self.kept = self.fds.open("iommufd", self.id, opener)

    def attach(
        self, name: str, sysfsdev: str | None, given_fd: int | None, ram: list[Window], opened: Callable[[int], None]
    ) -> DeviceFd:
        """The device's cdev bound to this iommufd and attached to the IOAS (the IOAS made and given guest
        RAM with the first device); a device found in the CPR table is bound and attached already.
        ``opened`` is told of the cdev's fd before the bind, as QEMU adds it to KVM's VFIO device there:
        the device takes the VM's KVM when it is bound."""
        device_fd, kept = self.fds.open(
            "vfio_device", name, lambda: _given(given_fd) if given_fd is not None else _open(cdev_path(sysfsdev))
        )
        device = DeviceFd(name, device_fd, kept)
        opened(device_fd)
        if kept:
            return device  # the IOAS id comes with the machine state
        bind = s.sized(s.vfio_device_bind_iommufd, iommufd=self.fd)
        try:
            ioctl(device_fd, io.VFIO_DEVICE_BIND_IOMMUFD, byref(bind))
        except OSError as e:
            raise VfioError(f"error bind device fd={device_fd} to iommufd={self.fd}: {_why(e)}") from None
        if not self.ioas_id:
            alloc = s.sized(s.iommu_ioas_alloc)
            try:
                ioctl(self.fd, io.IOMMU_IOAS_ALLOC, byref(alloc))
            except OSError as e:
                raise VfioError(f"Failed to allocate ioas: {_why(e)}") from None
            self.ioas_id = alloc.out_ioas_id
            for window in ram:
                self.map(window)
        attach = s.sized(s.vfio_device_attach_iommufd_pt, pt_id=self.ioas_id)
        try:
            ioctl(device_fd, io.VFIO_DEVICE_ATTACH_IOMMUFD_PT, byref(attach))
        except OSError as e:
            text = f"[iommufd={self.fd}] error attach {name} ({device_fd}) to id={self.ioas_id}: {_why(e)}"
            raise VfioError(text) from None
        return device

    def map(self, w: Window) -> None:
        """IOMMU_IOAS_MAP_FILE (the block's fd and offset: a CPR keeps it), else IOMMU_IOAS_MAP by address."""
        flags = c.IOMMU_IOAS_MAP_FIXED_IOVA | c.IOMMU_IOAS_MAP_READABLE
        if not w.readonly:
            flags |= c.IOMMU_IOAS_MAP_WRITEABLE
        if w.fd >= 0:
            arg = s.sized(
                s.iommu_ioas_map_file, flags=flags, ioas_id=self.ioas_id, fd=w.fd, start=w.offset, length=w.size
            )
            arg.iova = w.iova
            try:
                ioctl(self.fd, io.IOMMU_IOAS_MAP_FILE, byref(arg))
                self.windows.append(w)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                    raise VfioError(f"IOMMU_IOAS_MAP_FILE failed: {_why(e)}") from None
        arg = s.sized(s.iommu_ioas_map, flags=flags, ioas_id=self.ioas_id, user_va=w.vaddr, length=w.size, iova=w.iova)
        try:
            ioctl(self.fd, io.IOMMU_IOAS_MAP, byref(arg))
        except OSError as e:
            raise VfioError(f"IOMMU_IOAS_MAP failed: {_why(e)}") from None
        self.windows.append(w)
        self.by_address.append(w)

    def change_process(self) -> None:
        """IOMMU_IOAS_CHANGE_PROCESS: the mappings (file ones) are this process's now; a no-op if they were."""
        arg = s.sized(s.iommu_ioas_change_process)
        try:
            ioctl(self.fd, io.IOMMU_IOAS_CHANGE_PROCESS, byref(arg))
        except OSError as e:
            if e.errno == errno.ENOTTY:
                raise VfioError("vfio iommufd backend does not support IOMMU_IOAS_CHANGE_PROCESS") from None
            raise VfioError(f"IOMMU_IOAS_CHANGE_PROCESS fd {self.fd} failed: {_why(e)}") from None

    def cpr_blocker(self) -> str | None:
        """Why the mappings cannot move to a new process, or None: asked of the kernel itself, as QEMU asks
        it (in this process the ioctl changes nothing, and it fails on a mapping made by address)."""
        try:
            self.change_process()
        except VfioError as e:
            return str(e)
        if self.by_address:
            w = self.by_address[0]
            return f"IOMMU_IOAS_CHANGE_PROCESS fd {self.fd} failed: iova {w.iova:#x} is mapped by address"
        return None

    def resume(self) -> None:
        """The new image, after the load: the mappings move to it."""
        if self.kept:
            self.change_process()
            self.kept = False

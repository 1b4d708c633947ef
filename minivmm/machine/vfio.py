"""-device vfio-pci and vfio-user-pci as QEMU spells them: their properties checked, the host
checked for what the kernel must offer, and the kernel side of the machine's assignments.

``check_vfio_pci`` fails with one line naming what this host's kernel lacks when it lacks it.
``VfioHost`` holds what the machine's vfio-pci devices share (QEMU keeps the same per VM): the
legacy container, one IOAS per ``-object iommufd``, the KVM VFIO pseudo-device, and the CPR
steps over all of them. The function itself is devices/vfio_pci.py; vfio-user-pci is
devices/vfio_user_pci.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from minivmm.config import DeviceConfig, IommufdConfig
from minivmm.kvm import constants as kc
from minivmm.kvm.system import KvmDevice, KvmError, Vm
from minivmm.memory import GuestMemory
from minivmm.vfio import constants as vc
from minivmm.vfio import host, kernel

from .errors import MachineError

_BDF = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
VFIO_PCI_PROPS = ("host", "sysfsdev", "fd", "iommufd")
DEVICE_CDEV = host.Requirement(vc.VFIO_DEVICES_DIR, "VFIO device cdevs", "CONFIG_VFIO_DEVICE_CDEV")


@dataclass(frozen=True)
class VfioPciOptions:
    """A checked -device vfio-pci: the device's name (QEMU's: the BDF, or sysfsdev's last part)."""

    name: str
    sysfsdev: str | None  # None with fd= alone
    fd: int | None
    iommufd: IommufdConfig | None
    dev_id: str


def check_vfio_pci(dev: DeviceConfig, iommufds: dict[str, IommufdConfig]) -> VfioPciOptions:
    """QEMU's properties (host=BDF | sysfsdev=PATH, fd=N, iommufd=ID), then the kernel's side:
    /dev/iommu and the device cdevs for the iommufd path, /dev/vfio/vfio for the container."""
    props = dev.props
    for key in props:
        if key not in (*VFIO_PCI_PROPS, "id"):
            raise MachineError(dev.option, f"Property 'vfio-pci.{key}' not found")
    if "host" not in props and "sysfsdev" not in props and "fd" not in props:
        raise MachineError(
            dev.option,
            "No provided host device - Use -device vfio-pci,host=DDDD:BB:DD.F "
            "or -device vfio-pci,sysfsdev=PATH_TO_DEVICE",
        )
    if "host" in props and not _BDF.match(props["host"]):
        raise MachineError(dev.option, f"Property 'vfio-pci.host' doesn't take value '{props['host']}' (DDDD:BB:DD.F)")
    if "fd" in props and not props["fd"].isdigit():
        raise MachineError(dev.option, f"Property 'vfio-pci.fd' expects a file descriptor number, not '{props['fd']}'")
    iommufd = None
    if "iommufd" in props:
        iommufd = iommufds.get(props["iommufd"])
        if iommufd is None:
            raise MachineError(dev.option, f"Property 'vfio-pci.iommufd' can't find value '{props['iommufd']}'")
    needs = [host.CONTAINER] if iommufd is None else []
    if iommufd is not None and iommufd.fd is None:
        needs.append(host.IOMMUFD)
    if iommufd is not None and "fd" not in props:
        needs.append(DEVICE_CDEV)
    for req in needs:
        line = host.missing(req)
        if line:
            raise MachineError(dev.option, line)
    sysfsdev = None
    if "host" in props or "sysfsdev" in props:
        sysfsdev = kernel.sysfs_device(props.get("host"), props.get("sysfsdev"))
        if not os.path.exists(sysfsdev):
            shown = props.get("host") or sysfsdev
            if "host" in props and shown.count(":") == 1:
                shown = f"0000:{shown}"
            raise MachineError(dev.option, f"vfio {shown}: no such host device: No such file or directory")
    name = os.path.basename(sysfsdev) if sysfsdev else f"vfio-fd-{props['fd']}"
    fd = int(props["fd"]) if "fd" in props else None
    return VfioPciOptions(name, sysfsdev, fd, iommufd, props.get("id") or name)


@dataclass
class VfioHost:
    """The kernel objects a machine's vfio-pci devices share, made as the first device needs them."""

    vm: Vm
    memory: GuestMemory
    fds: kernel.FdTable
    container: kernel.Container | None = None
    iommufds: dict[str, kernel.Iommufd] = field(default_factory=dict)
    kvm_device: KvmDevice | None = None
    functions: list = field(default_factory=list)  # devices.vfio_pci.VfioPci

    def ram(self) -> list[kernel.Window]:
        """Guest RAM as DMA windows: each mapping at its guest-physical address (a ROM read-only)."""
        return [
            kernel.Window(m.gpa, m.size, m.block.host_addr + m.offset, m.block.fd, m.offset, m.block.readonly)
            for m in self.memory.mappings
        ]

    def attach(self, opts: VfioPciOptions, option: str) -> kernel.DeviceFd:
        """The device fd, by the path its options choose, with its DMA mapped and its file known to KVM."""
        prefix = f"vfio {opts.name}: "
        try:
            if opts.iommufd is None:
                if opts.sysfsdev is None:
                    raise kernel.VfioError("fd= needs iommufd= (a device fd is a cdev, bound to an iommufd)")
                if self.container is None:
                    self.container = kernel.Container(self.fds)
                device = self.container.attach(
                    opts.name, opts.sysfsdev, self.ram(), lambda g: self._kvm_add(g.fd, f"group ID {g.number}: ")
                )
            else:
                be = self.iommufds.get(opts.iommufd.id)
                if be is None:
                    be = self.iommufds[opts.iommufd.id] = kernel.Iommufd(self.fds, opts.iommufd.id)
                    be.open(opts.iommufd.fd)
                device = be.attach(opts.name, opts.sysfsdev, opts.fd, self.ram(), lambda fd: self._kvm_add(fd, ""))
            device.info()
        except host.VfioUnavailable as e:
            raise MachineError(option, str(e)) from None
        except (kernel.VfioError, OSError) as e:
            raise MachineError(option, prefix + str(e)) from None
        return device

    def _kvm_add(self, fd: int, context: str) -> None:
        """The file added to the VM's KVM VFIO device (made with the first), as QEMU adds every group or cdev."""
        try:
            if self.kvm_device is None:
                self.kvm_device = self.vm.create_device(kc.KVM_DEV_TYPE_VFIO)
        except KvmError as e:
            raise kernel.VfioError(f"{context}Failed to create KVM VFIO device: {os.strerror(e.errno)}") from None
        try:
            self.kvm_device.set_attr(kc.KVM_DEV_VFIO_GROUP, kc.KVM_DEV_VFIO_GROUP_ADD, fd)
        except KvmError as e:
            why = os.strerror(e.errno)
            raise kernel.VfioError(f"{context}Failed to add fd {fd} to KVM VFIO device: {why}") from None

    def cpr_blockers(self) -> list[str]:
        """Why a CPR would lose the devices' DMA (QEMU's wording): a container that cannot take new
        addresses for its mappings, an iommufd that cannot change process or holds mappings by address."""
        found = []
        if self.container is not None and (why := self.container.cpr_blocker()):
            found.append(why)
        found += [why for be in self.iommufds.values() if (why := be.cpr_blocker())]
        return found

    def release(self) -> None:
        """A CPR source, stopped: the container's mappings lose this process's addresses (DMA goes on)."""
        if self.container is not None:
            self.container.release()

    def resume(self) -> None:
        """After a load in the new image, or back from a failed CPR in the source: the container's
        mappings take this process's addresses, each iommufd's mappings move to this process."""
        if self.container is not None:
            self.container.resume(self.ram())
        for be in self.iommufds.values():
            ioas = next((f.ioas_id for f in self.functions if f.iommufd_id == be.id and f.ioas_id), 0)
            be.ioas_id = be.ioas_id or ioas
            be.resume()

    def close(self) -> None:
        if self.kvm_device is not None:
            self.kvm_device.close()
            self.kvm_device = None


def vfio_user_options(dev: DeviceConfig, index: int) -> tuple[str, str]:
    """(id, socket path) of ``-device vfio-user-pci``: the socket as ``socket=PATH``,
    ``socket.type=unix,socket.path=PATH`` or QEMU's JSON ``"socket": {"type": "unix", "path": PATH}``;
    the id names the device's fds in the CPR table (``id=``, else its place among vfio-user-pci devices)."""
    props = dict(dev.props)
    dev_id = props.pop("id", None) or f"vfio-user-pci.{index}"
    sock = props.pop("socket", None)
    spec: dict = {}
    if sock is not None and sock.lstrip().startswith("{"):
        try:
            spec = json.loads(sock)
        except ValueError as e:
            raise MachineError(dev.option, f"Property 'vfio-user-pci.socket': not a JSON object: {e}") from None
        if not isinstance(spec, dict):
            raise MachineError(dev.option, "Property 'vfio-user-pci.socket': not a JSON object")
    elif sock is not None:
        spec = {"type": "unix", "path": sock}
    for key in [k for k in props if k.startswith("socket.")]:
        spec[key.removeprefix("socket.")] = props.pop(key)
    for key in props:
        raise MachineError(dev.option, f"Property 'vfio-user-pci.{key}' not found")
    if not spec.get("path") and not spec.get("type"):
        raise MachineError(dev.option, "No socket specified")
    if spec.get("type", "unix") != "unix":
        raise MachineError(dev.option, f"Unsupported socket type {spec['type']}")
    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise MachineError(dev.option, "Parameter 'socket.path' is missing")
    return dev_id, spec["path"]

"""-device vfio-pci and vfio-user-pci as QEMU spells them: their properties checked, and the
host checked for what the kernel must offer, at machine build time.

vfio-pci is not assigned yet: a command line that names one fails with one line, and the line
names what this host's kernel lacks when it lacks it. vfio-user-pci is devices/vfio_user_pci.py.
"""

from __future__ import annotations

import json
import os
import re

from minivmm.config import DeviceConfig, IommufdConfig
from minivmm.vfio import constants as vc
from minivmm.vfio import host

from .errors import MachineError

_BDF = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
VFIO_PCI_PROPS = ("host", "sysfsdev", "fd", "iommufd")
DEVICE_CDEV = host.Requirement(vc.VFIO_DEVICES_DIR, "VFIO device cdevs", "CONFIG_VFIO_DEVICE_CDEV")
NOT_YET = "minivmm checks the host for it but does not assign devices yet"


def check_vfio_pci(dev: DeviceConfig, iommufds: dict[str, IommufdConfig]) -> None:
    """QEMU's properties (host=BDF | sysfsdev=PATH, fd=N, iommufd=ID), then the kernel's side:
    /dev/iommu and the device cdevs for the iommufd path, /dev/vfio/vfio for the container."""
    props = dev.props
    for key in props:
        if key not in VFIO_PCI_PROPS:
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
    if "host" in props:
        bdf = props["host"] if props["host"].count(":") == 2 else f"0000:{props['host']}"
        if not os.path.exists(f"/sys/bus/pci/devices/{bdf.lower()}"):
            raise MachineError(dev.option, f"vfio {bdf}: no such host device: No such file or directory")
    raise MachineError(dev.option, f"'vfio-pci' is not supported yet: {NOT_YET}")


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

"""-object iommufd and -device vfio-pci / vfio-user-pci on the command line: QEMU's properties,
and one line naming what the kernel lacks. Each run fails while the machine is built, before
any guest runs."""

from __future__ import annotations

import os

import pytest

from conftest import guest
from minivmm.vfio import constants as vc

KERNEL = ["-kernel", guest("hello32.elf")]
NO_CONTAINER = not os.path.exists(vc.VFIO_CONTAINER_PATH)
NO_IOMMUFD = not os.path.exists(vc.IOMMUFD_PATH)


def _one_line(result, *fragments):
    assert (result.status, result.stdout) == (1, ""), result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minivmm: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.skipif(not NO_CONTAINER, reason="this host has /dev/vfio/vfio: the missing-kernel line cannot show")
def test_vfio_pci_without_kernel_vfio_names_what_is_missing(vmm):
    _one_line(
        vmm.run(*KERNEL, "-device", "vfio-pci,host=0000:00:05.0"),
        "-device vfio-pci,host=0000:00:05.0: Could not open '/dev/vfio/vfio': No such file or directory",
        "this kernel has no VFIO container (CONFIG_VFIO and CONFIG_VFIO_CONTAINER",
    )


@pytest.mark.skipif(not NO_IOMMUFD, reason="this host has /dev/iommu: the missing-kernel line cannot show")
def test_vfio_pci_on_iommufd_without_kernel_iommufd_names_what_is_missing(vmm):
    _one_line(
        vmm.run(*KERNEL, "-object", "iommufd,id=iommufd0", "-device", "vfio-pci,host=00:05.0,iommufd=iommufd0"),
        "Could not open '/dev/iommu': No such file or directory",
        "this kernel has no iommufd (CONFIG_IOMMUFD",
    )


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["-device", "vfio-pci"], ["No provided host device - Use -device vfio-pci,host=DDDD:BB:DD.F"]),
        (["-device", "vfio-pci,host=05.0"], ["Property 'vfio-pci.host' doesn't take value '05.0'"]),
        (["-device", "vfio-pci,host=00:05.0,colour=red"], ["Property 'vfio-pci.colour' not found"]),
        (["-device", "vfio-pci,host=00:05.0,fd=x"], ["Property 'vfio-pci.fd' expects a file descriptor number"]),
        (["-device", "vfio-pci,host=00:05.0,iommufd=nope"], ["Property 'vfio-pci.iommufd' can't find value 'nope'"]),
        (["-object", "iommufd"], ["-object iommufd: Parameter 'id' is missing"]),
        (["-object", "iommufd,id=i,fd=abc"], ["Parameter 'fd' expects a file descriptor number, not 'abc'"]),
        (["-object", "iommufd,id=i,colour=red"], ["Property 'iommufd.colour' not found"]),
        (["-device", "vfio-user-pci"], ["-device vfio-user-pci: No socket specified"]),
        (
            ["-device", '{"driver": "vfio-user-pci", "socket": {"type": "inet", "host": "h", "port": "1"}}'],
            ["Unsupported socket type inet"],
        ),
        (["-device", "vfio-user-pci,socket.type=unix"], ["Parameter 'socket.path' is missing"]),
        # the three spellings of the socket reach the same path (nobody serves it here)
        (["-device", "vfio-user-pci,socket=/run/dev.sock"], ["Failed to connect to '/run/dev.sock'"]),
        (
            ["-device", '{"driver": "vfio-user-pci", "socket": {"type": "unix", "path": "/run/dev.sock"}}'],
            ["Failed to connect to '/run/dev.sock'"],
        ),
        (
            ["-device", "vfio-user-pci,socket.type=unix,socket.path=/run/dev.sock"],
            ["Failed to connect to '/run/dev.sock'"],
        ),
        (["-device", "vfio-user-pci,socket=/run/dev.sock,colour=red"], ["Property 'vfio-user-pci.colour' not found"]),
    ],
)
def test_bad_or_not_yet_vfio_options_are_one_line(vmm, args, fragments):
    _one_line(vmm.run(*KERNEL, *args, timeout=30), *fragments)

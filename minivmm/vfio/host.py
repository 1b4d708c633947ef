"""What this host's kernel offers for device assignment, and opening it.

A machine that asks for VFIO or iommufd on a kernel without them fails at
build time with one line naming the missing device node and the kernel
option behind it, instead of an errno from deep inside a setup sequence.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import constants as c


class VfioUnavailable(Exception):
    """The kernel lacks what a device assignment needs; the text says what."""


@dataclass(frozen=True)
class Requirement:
    path: str
    what: str  # what the node is, for the message
    config: str  # the kernel option that provides it


CONTAINER = Requirement(c.VFIO_CONTAINER_PATH, "VFIO container", "CONFIG_VFIO and CONFIG_VFIO_CONTAINER")
IOMMUFD = Requirement(c.IOMMUFD_PATH, "iommufd", "CONFIG_IOMMUFD")


def open_node(req: Requirement) -> int:
    """The node opened read-write and close-on-exec (CPR clears the flag on the fds it keeps)."""
    try:
        return os.open(req.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise VfioUnavailable(_absent(req)) from None
        raise VfioUnavailable(f"Could not open '{req.path}': {os.strerror(e.errno)}") from None


def missing(req: Requirement) -> str | None:
    """The one line a machine build fails with when ``req`` is absent, else None."""
    return None if os.path.exists(req.path) else _absent(req)


def _absent(req: Requirement) -> str:
    return (
        f"Could not open '{req.path}': No such file or directory: "
        f"this kernel has no {req.what} ({req.config}: not built, or the module not loaded)"
    )

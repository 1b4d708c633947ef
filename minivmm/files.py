"""Files a user names (QMP arguments, migration URIs): opened so that they cannot stall minivmm."""

from __future__ import annotations

import errno
import os
import stat


def open_regular(path: str, flags: int, mode: int = 0o600) -> int:
    """An fd for a regular file; a FIFO or a device is refused (a reader or writer that never
    comes would block the main loop or a migration forever). O_NONBLOCK keeps the open itself
    from waiting for a FIFO's other end; the fd is blocking again once it is known to be a file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before the open, which a FIFO fails with ENXIO
            raise OSError(errno.EINVAL, "not a regular file")
    except FileNotFoundError:
        pass  # created by the open
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd

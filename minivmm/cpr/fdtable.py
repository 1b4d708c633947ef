"""The CPR fd table: every fd that outlives the VMM process, by (name, id).

QEMU's migration/cpr.c keeps the same table. Every preserved resource (RAM
memfds, chardev files and sockets, monitor sockets, interrupt eventfds, getfd
fds) is opened through ``open``: the fd a previous minivmm saved, else a new
one, saved. A fresh start and an incoming update therefore run the same
code, and after a load the table is already full for the next update.

This module imports nothing of minivmm: the machine core uses the table, the
rest of the cpr package moves it between processes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field

# Listening sockets stay with the process that execs (cpr-exec); a cpr-transfer target makes its own.
EXEC_ONLY = ("monitor", "chardev-socket")
# fds a client gave with getfd stay with the guest whether or not the new command line names them.
KEEP = ("getfd",)
# A cpr-exec keeper's control block (keeper.py): named here, where a new image looks for it first.
KEEPER = ("cpr-keeper", "0")


def set_cloexec(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC if on else flags & ~fcntl.FD_CLOEXEC)


@dataclass
class FdTable:
    """(name, id) -> fd, with QEMU's operations (cpr_save_fd, cpr_find_fd, cpr_delete_fd, cpr_open_fd)."""

    fds: dict[tuple[str, str], int] = field(default_factory=dict)
    inherited: bool = False  # the fds came from a previous minivmm (an incoming CPR)
    claimed: set[tuple[str, str]] = field(default_factory=set)  # what this process's command line asked for

    def save(self, name: str, id_: str, fd: int) -> None:
        self.fds[(name, id_)] = fd
        self.claimed.add((name, id_))

    def find(self, name: str, id_: str) -> int:
        return self.fds.get((name, id_), -1)

    def claim(self, name: str, id_: str) -> int:
        """find, for a resource of this process's command line (it stays after an incoming CPR)."""
        fd = self.find(name, id_)
        if fd >= 0:
            self.claimed.add((name, id_))
        return fd

    def delete(self, name: str, id_: str) -> None:
        self.fds.pop((name, id_), None)
        self.claimed.discard((name, id_))

    def open(
        self, name: str, id_: str, opener: Callable[[], int], matches: Callable[[int], bool] | None = None
    ) -> tuple[int, bool]:
        """QEMU's cpr_open_fd: (the saved fd, True), or (a new one from ``opener``, saved, False).

        ``matches`` says whether a saved fd is still what the command line describes (the same
        file or socket path): when it is not, the saved fd is closed and a new one opened.
        """
        fd = self.find(name, id_)
        if fd >= 0 and matches is not None and not matches(fd):
            self.delete(name, id_)
            os.close(fd)
        elif fd >= 0:
            self.claimed.add((name, id_))
            return fd, True
        fd = opener()
        self.save(name, id_, fd)
        return fd, False

    def missing(self, name: str, id_: str) -> bool:
        """fd=N during an incoming CPR: the number given is ignored and the saved fd must exist."""
        return self.inherited and self.find(name, id_) < 0

    def close(self, name: str, id_: str) -> bool:
        fd = self.find(name, id_)
        if fd < 0:
            return False
        self.delete(name, id_)
        os.close(fd)
        return True

    def release_unclaimed(self) -> None:
        """After an incoming CPR: close what the new command line did not ask for (getfd fds stay).
        One fd may stand under several names (a VFIO container under each of its groups): it is
        closed once, and not at all while a name the command line asked for still holds it."""
        unclaimed = [k for k in self.fds if k not in self.claimed and k[0] not in KEEP]
        for fd in {self.fds.pop(k) for k in unclaimed} - set(self.fds.values()):
            os.close(fd)

    def for_transfer(self) -> FdTable:
        return FdTable({k: fd for k, fd in self.fds.items() if k[0] not in EXEC_ONLY})

    def walk(self, fn: Callable[[str, str, int], None]) -> None:
        for (name, id_), fd in list(self.fds.items()):
            fn(name, id_, fd)

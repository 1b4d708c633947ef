"""CPR state: the table of file descriptors that outlive the VMM process, and
how it reaches the next one (QEMU's migration/cpr.c).

The table maps (name, id) to an fd: RAM memfds ("ram", block name), chardev
and monitor sockets ("chardev"/"monitor", id), getfd fds ("getfd", name).
Every preserved resource goes through ``open``: find the fd a previous
minivmm saved, or open one and save it, so a fresh start and an incoming CPR
run the same code, and after a load the table is already full for the next
update.

cpr-exec passes the state in a memfd whose number is in MINIVMM_CPR_STATE_FD;
the fds keep their numbers across exec. cpr-transfer sends the state and the
fds over a unix socket with SCM_RIGHTS; the receiver's numbers differ, so
entries are matched by position.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.vmstate import VMSD, Field, StateWriter, VMStateError, decode, read_blob

ENV = "MINIVMM_CPR_STATE_FD"
MAX_FDS = 4096
# Listening sockets do not go to another process: it makes its own (cpr-exec keeps them).
EXEC_ONLY = ("monitor", "chardev-socket")


class CprError(Exception):
    pass


FD_ENTRY = VMSD(
    "fd", 1, 1, (Field("name", "str", max=64), Field("id", "str", max=4096), Field("fd", "u32", max=(1 << 31) - 1))
)
TIMES = VMSD("time", 1, 1, (Field("phase", "str", max=64), Field("at", "u64")))  # CLOCK_MONOTONIC ns
CPR_STATE = VMSD(
    "cpr-state",
    1,
    1,
    (
        Field("mode", "str", choices=frozenset({"cpr-exec", "cpr-transfer"})),
        Field("fds", FD_ENTRY, is_list=True, max=MAX_FDS),
        Field("times", TIMES, is_list=True, max=64),
        Field("teardown_helper", "u32", max=(1 << 22)),  # cpr-exec: the pid holding the old address space, to reap
    ),
)


@dataclass
class FdTable:
    """(name, id) -> fd, with QEMU's operations."""

    fds: dict[tuple[str, str], int] = field(default_factory=dict)

    def save(self, name: str, id_: str, fd: int) -> None:
        self.fds[(name, id_)] = fd

    def find(self, name: str, id_: str) -> int:
        return self.fds.get((name, id_), -1)

    def delete(self, name: str, id_: str) -> None:
        self.fds.pop((name, id_), None)

    def resave(self, name: str, id_: str, fd: int) -> None:
        old = self.fds.get((name, id_))
        if old is not None and old != fd:
            raise CprError(f"cpr: {name} '{id_}' was saved as fd {old}, not {fd}")
        self.fds[(name, id_)] = fd

    def open(self, name: str, id_: str, opener: Callable[[], int]) -> int:
        """The saved fd, or a new one from ``opener``, saved."""
        fd = self.find(name, id_)
        if fd < 0:
            fd = opener()
            self.save(name, id_, fd)
        return fd

    def for_transfer(self) -> FdTable:
        return FdTable({k: fd for k, fd in self.fds.items() if k[0] not in EXEC_ONLY})

    def walk(self, fn: Callable[[str, str, int], None]) -> None:
        for (name, id_), fd in list(self.fds.items()):
            fn(name, id_, fd)


@dataclass
class CprState:
    mode: str  # "cpr-exec" or "cpr-transfer"
    table: FdTable
    times: dict[str, int] = field(default_factory=dict)  # phase -> CLOCK_MONOTONIC ns
    teardown_helper: int = 0

    def blob(self) -> bytes:
        w = StateWriter()
        entries = [{"name": n, "id": i, "fd": fd} for (n, i), fd in self.table.fds.items()]
        times = [{"phase": p, "at": t} for p, t in self.times.items()]
        w.add(CPR_STATE, {"mode": self.mode, "fds": entries, "times": times, "teardown_helper": self.teardown_helper})
        return w.blob()

    @classmethod
    def from_blob(cls, data: bytes, fds: list[int] | None = None) -> CprState:
        """``fds``: the numbers received by SCM_RIGHTS, in table order (cpr-transfer)."""
        try:
            sections = read_blob(data)
            if len(sections) != 1 or sections[0].name != "cpr-state":
                raise VMStateError("cpr: the state holds no cpr-state section")
            values = decode(CPR_STATE, sections[0].payload, sections[0].version, sections[0].path)
        except VMStateError as e:
            raise CprError(f"cpr: bad CPR state: {e}") from None
        entries = values["fds"]
        if fds is not None and len(fds) != len(entries):
            raise CprError(f"cpr: {len(entries)} fds in the table but {len(fds)} received")
        table = FdTable()
        for i, e in enumerate(entries):
            table.save(e["name"], e["id"], fds[i] if fds is not None else e["fd"])
        times = {t["phase"]: t["at"] for t in values["times"]}
        return cls(values["mode"], table, times, values["teardown_helper"])


def now_ns() -> int:
    return time.monotonic_ns()


def set_cloexec(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC if on else flags & ~fcntl.FD_CLOEXEC)


# --- cpr-exec -----------------------------------------------------------------------------


def state_memfd(state: CprState) -> int:
    fd = os.memfd_create("minivmm-cpr-state", os.MFD_CLOEXEC)
    os.write(fd, state.blob())
    return fd


def take_exec_state() -> CprState | None:
    """In a new image: the state the previous one left, if any; the variable is
    removed and every preserved fd is close-on-exec again."""
    text = os.environ.pop(ENV, None)
    if text is None:
        return None
    try:
        fd = int(text)
        data = os.pread(fd, 64 << 20, 0)
        os.close(fd)
    except (ValueError, OSError) as e:
        raise CprError(f"cpr: {ENV}={text}: cannot read the CPR state: {e}") from None
    state = CprState.from_blob(data)

    def cloexec(name: str, id_: str, fd: int) -> None:
        try:
            set_cloexec(fd, True)
        except OSError as e:
            raise CprError(f"cpr: {name} '{id_}': fd {fd} from the previous image is unusable: {e.strerror}") from None

    state.table.walk(cloexec)
    return state


# --- cpr-transfer -----------------------------------------------------------------------------


def send_state(sock: socket.socket, state: CprState) -> None:
    """Length-prefixed state, then the table's fds in table order, a batch per message."""
    data = state.blob()
    sock.sendall(len(data).to_bytes(8, "little") + data)
    fds = list(state.table.fds.values())
    for i in range(0, len(fds), 200):
        batch = fds[i : i + 200]
        sock.sendmsg(
            [len(batch).to_bytes(4, "little")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))]
        )
    sock.sendmsg([(0).to_bytes(4, "little")])


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise CprError(f"cpr: the source hung up during {what}")
        buf += chunk
    return bytes(buf)


def recv_state(sock: socket.socket) -> CprState:
    """The state and its fds; a source that stalls for the stream timeout is given up."""
    from .stream import StreamError, timeout

    try:
        sock.settimeout(timeout())
    except StreamError as e:
        raise CprError(f"cpr: {e}") from None
    try:
        return _recv_state(sock)
    except TimeoutError:
        raise CprError(f"cpr: the source stalled: nothing received for {sock.gettimeout():g} s") from None
    finally:
        sock.settimeout(None)


def _recv_state(sock: socket.socket) -> CprState:
    size = int.from_bytes(_recv_exact(sock, 8, "the CPR state"), "little")
    if size > 64 << 20:
        raise CprError(f"cpr: a CPR state of {size} bytes is too large")
    data = _recv_exact(sock, size, "the CPR state")
    fds: list[int] = []
    while True:
        msg, ancdata, _flags, _addr = sock.recvmsg(4, socket.CMSG_SPACE(200 * 4), socket.MSG_CMSG_CLOEXEC)
        if len(msg) < 4:
            raise CprError("cpr: the source hung up while sending fds")
        count = int.from_bytes(msg, "little")
        got: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                got.extend(arr)
        fds.extend(got)
        if count == 0:
            break
        if len(got) != count or len(fds) > MAX_FDS:
            for fd in fds:
                os.close(fd)
            raise CprError(f"cpr: expected {count} fds in a message, got {len(got)}")
    return CprState.from_blob(data, fds)

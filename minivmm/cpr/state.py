"""The CPR state: the fd table and a few facts, as one vmstate blob, and how
it reaches the next process.

cpr-exec: in a memfd whose number is in MINIVMM_CPR_STATE_FD; the fds keep
their numbers across exec. cpr-transfer: length-prefixed over a unix socket,
then the fds by SCM_RIGHTS in table order; the receiver's numbers differ, so
entries are matched by position.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field

from minivmm.vmstate import VMSD, Field, StateWriter, VMStateError, decode, read_blob

from .fdtable import FdTable, set_cloexec

ENV = "MINIVMM_CPR_STATE_FD"
MAX_FDS = 4096
MAX_STATE = 64 << 20
_FD_BATCH = 200


class CprError(Exception):
    pass


FD_ENTRY = VMSD(
    "fd", 1, 1, (Field("name", "str", max=64), Field("id", "str", max=4096), Field("fd", "u32", max=(1 << 31) - 1))
)
TIMES = VMSD("time", 1, 1, (Field("phase", "str", max=64), Field("at", "u64")))  # CLOCK_MONOTONIC ns
CPR_STATE = VMSD(
    "cpr-state",
    2,
    1,
    (
        Field("mode", "str", choices=frozenset({"cpr-exec", "cpr-transfer"})),
        Field("fds", FD_ENTRY, is_list=True, max=MAX_FDS),
        Field("times", TIMES, is_list=True, max=64),
        Field("teardown_helper", "u32", max=(1 << 22)),  # cpr-exec: the pid holding the old address space, to reap
        # cpr-exec: the pipe the watchdog waits on (cpr/holder.py); -1 when there is none
        Field("watchdog_fd", "i64", since=2, default=-1, min=-1, max=(1 << 31) - 1),
        Field("watchdog_pid", "u32", since=2, default=0, max=(1 << 22)),  # to reap, as the teardown helper
    ),
)


@dataclass
class CprState:
    mode: str  # "cpr-exec" or "cpr-transfer"
    table: FdTable
    times: dict[str, int] = field(default_factory=dict)  # phase -> CLOCK_MONOTONIC ns
    teardown_helper: int = 0
    watchdog_fd: int = -1
    watchdog_pid: int = 0

    def blob(self) -> bytes:
        w = StateWriter()
        entries = [{"name": n, "id": i, "fd": fd} for (n, i), fd in self.table.fds.items()]
        times = [{"phase": p, "at": t} for p, t in self.times.items()]
        values = {"mode": self.mode, "fds": entries, "times": times}
        children = {"teardown_helper": self.teardown_helper, "watchdog_pid": self.watchdog_pid}
        w.add(CPR_STATE, {**values, **children, "watchdog_fd": self.watchdog_fd})
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
        numbers = fds if fds is not None else [e["fd"] for e in entries]
        table = FdTable({(e["name"], e["id"]): fd for e, fd in zip(entries, numbers)}, inherited=True)
        times = {t["phase"]: t["at"] for t in values["times"]}
        return cls(
            values["mode"], table, times, values["teardown_helper"], values["watchdog_fd"], values["watchdog_pid"]
        )

    def report_in(self) -> None:
        """Tell the watchdog of a cpr-exec that this image has the guest (cpr/holder.py)."""
        if self.watchdog_fd >= 0:
            try:
                os.write(self.watchdog_fd, b"1")
                os.close(self.watchdog_fd)
            except OSError:
                pass
            self.watchdog_fd = -1


# --- cpr-exec: a memfd named in the environment ------------------------------------------------


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
        data = os.pread(fd, MAX_STATE, 0)
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
    if state.watchdog_fd >= 0:
        try:
            set_cloexec(state.watchdog_fd, True)
        except OSError:
            state.watchdog_fd = -1
    return state


# --- cpr-transfer: a unix socket -----------------------------------------------------------------


def send_state(sock: socket.socket, state: CprState) -> None:
    """Length-prefixed state, then the table's fds in table order, a batch per message."""
    data = state.blob()
    sock.sendall(len(data).to_bytes(8, "little") + data)
    fds = list(state.table.fds.values())
    for i in range(0, len(fds), _FD_BATCH):
        batch = fds[i : i + _FD_BATCH]
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


def recv_state(sock: socket.socket, timeout: float) -> CprState:
    """The state and its fds; a source silent for ``timeout`` seconds is given up."""
    sock.settimeout(timeout)
    try:
        return _recv_state(sock)
    except TimeoutError:
        raise CprError(f"cpr: the source stalled: nothing received for {timeout:g} s") from None
    finally:
        sock.settimeout(None)


def _recv_state(sock: socket.socket) -> CprState:
    size = int.from_bytes(_recv_exact(sock, 8, "the CPR state"), "little")
    if size > MAX_STATE:
        raise CprError(f"cpr: a CPR state of {size} bytes is too large")
    data = _recv_exact(sock, size, "the CPR state")
    fds: list[int] = []
    try:
        while True:
            msg, ancdata, _flags, _addr = sock.recvmsg(4, socket.CMSG_SPACE(_FD_BATCH * 4), socket.MSG_CMSG_CLOEXEC)
            got: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    got.extend(arr)
            fds.extend(got)
            if len(msg) < 4:
                raise CprError("cpr: the source hung up while sending fds")
            count = int.from_bytes(msg, "little")
            if count == 0:
                return CprState.from_blob(data, fds)
            if len(got) != count or len(fds) > MAX_FDS:
                raise CprError(f"cpr: expected {count} fds in a message, got {len(got)}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise

"""QMP monitors: listening sockets, one client at a time each (as QEMU's
monitor chardevs), the capabilities handshake, dispatch and events.

Everything runs on the main loop and never blocks it: sockets are
non-blocking, a client's pending output is bounded (reading from it stops
while its replies pile up; a client that stops reading events altogether is
dropped), and each read is at most READ_CHUNK bytes, so one flooding client
cannot starve the vCPUs' requests or the other monitors.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from minivmm import __version__
from minivmm.config import MonitorConfig
from minivmm.cpr.fdtable import FdTable
from minivmm.mainloop import MainLoop
from minivmm.sockets import check_listening_fd, unix_listen

from .jsonstream import JsonStream

READ_CHUNK = 64 << 10
OUTPUT_PAUSE_READING = 1 << 20  # stop reading requests while this much output waits
OUTPUT_DROP_CLIENT = 16 << 20  # a client that lets this much pile up is gone
MAX_QUEUED_FDS = 16
_SCM_SPACE = socket.CMSG_SPACE(MAX_QUEUED_FDS * array.array("i").itemsize)


class QmpError(Exception):
    """A command failed: ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class MonitorError(Exception):
    pass


def version_info() -> dict:
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"minivmm {__version__}"}


def timestamp() -> dict:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


@dataclass
class Connection:
    sock: socket.socket
    negotiated: bool = False
    stream: JsonStream = field(default_factory=JsonStream)
    out: bytearray = field(default_factory=bytearray)
    fds: deque = field(default_factory=deque)  # received by SCM_RIGHTS, waiting for getfd
    reading: bool = True


class Monitor:
    """One QMP endpoint (-qmp or -mon): a listener and at most one client."""

    def __init__(self, config: MonitorConfig, loop: MainLoop, dispatch, fds: FdTable) -> None:
        self.config = config
        self.loop = loop
        self.dispatch = dispatch  # (monitor, connection, command, arguments) -> result
        self.conn: Connection | None = None

        def listen() -> int:
            if config.fd is not None:
                return check_listening_fd(config.fd)
            if config.path is not None:
                return unix_listen(config.path).detach()
            return socket.create_server((config.host, config.port)).detach()

        try:
            # Preserved across cpr-exec: clients reconnect to the same socket at once.
            fd, self.reused = fds.open("monitor", config.id, listen)
        except OSError as e:
            if config.fd is not None:
                raise MonitorError(f"fd={config.fd}: {e.strerror}") from None
            where = config.path or f"{config.host}:{config.port}"
            raise MonitorError(f"Failed to bind socket {where}: {e.strerror or e}") from None
        self.listener = socket.socket(fileno=fd)
        self.listener.set_inheritable(False)

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return self.config.path or f"{host}:{port}"

    def start(self) -> None:
        if self.config.wait and not self.reused:
            print(f"minivmm: waiting for connection on: {self.address}", flush=True, file=sys.stderr)
            conn, _ = self.listener.accept()
            self._attach(conn)
        else:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    # --- clients -------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.loop.remove_reader(self.listener.fileno())  # one client at a time; others wait
        self.conn = Connection(sock)
        self.loop.add_reader(sock.fileno(), self._readable)
        self.send(self.conn, {"QMP": {"version": version_info(), "capabilities": []}})

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self.loop.forget(conn.sock.fileno())
        conn.sock.close()
        while conn.fds:
            os.close(conn.fds.popleft())
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            data, ancdata, _flags, _addr = conn.sock.recvmsg(READ_CHUNK, _SCM_SPACE, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            self._disconnect()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    conn.fds.append(fd)
                    if len(conn.fds) > MAX_QUEUED_FDS:
                        os.close(conn.fds.popleft())
        if not data:
            self._disconnect()
            return
        for parsed in conn.stream.feed(data):
            if self.conn is not conn:
                return
            if parsed.error is not None:
                self.send(conn, {"error": {"class": "GenericError", "desc": parsed.error}})
            else:
                self._handle(conn, parsed.value)

    def _handle(self, conn: Connection, request: object) -> None:
        reply: dict = {}
        request_id = request.get("id") if isinstance(request, dict) else None
        command = None
        try:
            command, arguments = _check_request(request)
            if not conn.negotiated and command != "qmp_capabilities":
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            reply["return"] = self.dispatch(self, conn, command, arguments)
        except QmpError as e:
            reply["error"] = {"class": e.error_class, "desc": e.desc}
        except Exception as e:  # the barrier: a bug in a command is its client's error, never the VM's end
            desc = f"internal error in '{command}': {type(e).__name__}: {e}"
            print(f"minivmm: QMP {desc}", file=sys.stderr, flush=True)
            reply["error"] = {"class": "GenericError", "desc": desc}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request_id
        self.send(conn, reply)

    # --- output ----------------------------------------------------------------------
    def send(self, conn: Connection, message: dict) -> None:
        if self.conn is not conn:
            return
        indent = 4 if self.config.pretty else None
        conn.out += json.dumps(message, indent=indent, allow_nan=False).encode() + b"\n"
        self._flush(conn)

    def event(self, name: str, data: dict | None) -> None:
        conn = self.conn
        if conn is None or not conn.negotiated:
            return
        message = {"timestamp": timestamp(), "event": name}
        if data is not None:
            message["data"] = data
        self.send(conn, message)

    def _flush(self, conn: Connection) -> None:
        try:
            while conn.out:
                sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL)
                del conn.out[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._disconnect()
            return
        if len(conn.out) > OUTPUT_DROP_CLIENT:
            self._disconnect()
            return
        fd = conn.sock.fileno()
        if conn.out:
            self.loop.add_writer(fd, lambda: self._flush(conn))
        else:
            self.loop.remove_writer(fd)
        want_reading = len(conn.out) < OUTPUT_PAUSE_READING
        if want_reading != conn.reading:
            conn.reading = want_reading
            if want_reading:
                self.loop.add_reader(fd, self._readable)
            else:
                self.loop.remove_reader(fd)

    def drain(self, timeout: float = 1.0) -> None:
        """Push out what is pending (before the process exits), within ``timeout``."""
        conn = self.conn
        if conn is None:
            return
        deadline = time.monotonic() + timeout
        conn.sock.settimeout(timeout)
        try:
            while conn.out and time.monotonic() < deadline:
                sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL)
                del conn.out[:sent]
        except OSError:
            pass

    def close(self) -> None:
        self.drain()
        self._disconnect()
        self.loop.forget(self.listener.fileno())
        self.listener.close()
        if self.config.path is not None:
            try:
                os.unlink(self.config.path)
            except OSError:
                pass


def _check_request(request: object) -> tuple[str, dict]:
    """QEMU's qmp_dispatch_check_obj: the shape of a command, with its wording."""
    if not isinstance(request, dict):
        raise QmpError("QMP input must be a JSON object")
    command = None
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QmpError("QMP input member 'execute' must be a string")
            command = value
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if command is None:
        raise QmpError("QMP input lacks member 'execute'")
    return command, request.get("arguments", {})

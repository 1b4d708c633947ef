"""Character device back-ends (QEMU's chardevs): where a serial port's bytes
go and where its input comes from.

A front-end (the UART) calls ``write`` from a vCPU thread and must never be
blocked by a slow reader, so socket output is non-blocking and bounded. Input
is read on the main loop only while the front-end has room for it.
"""

from __future__ import annotations

import errno
import os
import socket
import termios
import threading
import tty
from collections.abc import Callable
from typing import Protocol

from .cpr.fdtable import FdTable
from .log import message
from .mainloop import MainLoop
from .sockets import check_listening_fd, unix_listen


class ChardevError(ValueError):
    pass


class Frontend(Protocol):
    def can_receive(self) -> int: ...

    def receive(self, data: bytes) -> None: ...


class Chardev:
    """Base: output is discarded, there is no input (``null``)."""

    kind = "null"

    def __init__(self, chardev_id: str) -> None:
        self.id = chardev_id
        self.loop: MainLoop | None = None
        self.frontend: Frontend | None = None

    def attach(self, loop: MainLoop, frontend: Frontend) -> None:
        self.loop, self.frontend = loop, frontend
        self._poll_input()

    def write(self, data: bytes) -> None:
        pass

    def frontend_ready(self) -> None:
        """The front-end has room again (any thread)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._poll_input)

    def input_fd(self) -> int:
        return -1

    def suspend(self) -> None:
        """Before a cpr-exec: give the terminal back as it was."""

    def resume(self) -> None:
        """After a cpr-exec that failed: take it again."""

    def _poll_input(self) -> None:
        fd = self.input_fd()
        if fd < 0 or self.loop is None or self.frontend is None:
            return
        if self.frontend.can_receive() > 0:
            self.loop.add_reader(fd, self._on_readable)
        else:
            self.loop.remove_reader(fd)

    def _on_readable(self) -> None:
        fd = self.input_fd()
        room = self.frontend.can_receive() if self.frontend else 0
        if room <= 0:
            self.loop.remove_reader(fd)
            return
        try:
            data = os.read(fd, room)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._input_closed()
            return
        self.frontend.receive(data)
        self._poll_input()

    def _input_closed(self) -> None:
        self.loop.forget(self.input_fd())

    def close(self) -> None:
        pass


class FileChardev(Chardev):
    kind = "file"

    def __init__(self, chardev_id: str, path: str, fds: FdTable, append: bool = False) -> None:
        super().__init__(chardev_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            # An inherited fd of the same file keeps its offset: output goes on where the old process stopped.
            self.fd, _ = fds.open("chardev", chardev_id, lambda: os.open(path, flags, 0o644), _same_file(path))
        except OSError as e:
            raise ChardevError(f"Could not open '{path}': {e.strerror}") from None

    def write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # a full disk must not stop the guest

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StdioChardev(Chardev):
    """stdin/stdout; a terminal is put in raw mode but keeps Ctrl-C (QEMU's signal=on)."""

    kind = "stdio"

    def __init__(self, chardev_id: str) -> None:
        super().__init__(chardev_id)
        self.in_fd, self.out_fd = 0, 1
        self._saved_tty = None
        self._eof = False
        self.resume()

    def resume(self) -> None:
        if os.isatty(self.in_fd) and self._saved_tty is None:
            self._saved_tty = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd, termios.TCSANOW)
            attrs = termios.tcgetattr(self.in_fd)
            attrs[3] |= termios.ISIG  # lflag
            attrs[1] |= termios.OPOST | termios.ONLCR  # oflag: keep "\n" -> "\r\n"
            termios.tcsetattr(self.in_fd, termios.TCSANOW, attrs)

    def suspend(self) -> None:
        if self._saved_tty is not None:
            termios.tcsetattr(self.in_fd, termios.TCSANOW, self._saved_tty)
            self._saved_tty = None

    def input_fd(self) -> int:
        return -1 if self._eof else self.in_fd

    def _input_closed(self) -> None:
        super()._input_closed()
        self._eof = True

    def write(self, data: bytes) -> None:
        try:
            os.write(self.out_fd, data)
        except OSError:
            pass

    def close(self) -> None:
        self.suspend()


class SocketChardev(Chardev):
    """A unix socket server with one client at a time (``server=on``).

    Output with no client, or to a client that does not read, is dropped
    rather than stalling the guest.
    """

    kind = "socket"

    def __init__(
        self,
        chardev_id: str,
        path: str | None,
        wait: bool,
        fds: FdTable,
        fd: int | None = None,
    ) -> None:
        super().__init__(chardev_id)
        self.path = path
        try:
            listen_fd, reused = fds.open(
                "chardev-socket",
                chardev_id,
                lambda: check_listening_fd(fd) if fd is not None else unix_listen(path).detach(),
                None if fd is not None else _same_socket(path),  # fd=N: found by id, whatever it is
            )
        except OSError as e:
            raise ChardevError(
                f"fd={fd}: {e.strerror}" if fd is not None else f"Failed to bind socket {path}: {e.strerror or e}"
            ) from None
        self.listener = socket.socket(fileno=listen_fd)
        self.client: socket.socket | None = None
        self.lock = threading.Lock()
        if wait and not reused:
            message(f"waiting for connection on: disconnected:unix:{path},server=on")
            conn, _ = self.listener.accept()
            self._set_client(conn)

    def attach(self, loop: MainLoop, frontend: Frontend) -> None:
        super().attach(loop, frontend)
        if self.client is None:
            loop.add_reader(self.listener.fileno(), self._accept)

    def _set_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with self.lock:
            self.client = conn

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.loop.remove_reader(self.listener.fileno())
        self._set_client(conn)
        self._poll_input()

    def input_fd(self) -> int:
        client = self.client
        return client.fileno() if client is not None else -1

    def _input_closed(self) -> None:
        self._disconnect()

    def _disconnect(self) -> None:
        with self.lock:
            client, self.client = self.client, None
        if client is not None:
            if self.loop is not None:
                self.loop.forget(client.fileno())
                self.loop.add_reader(self.listener.fileno(), self._accept)
            client.close()

    def write(self, data: bytes) -> None:
        with self.lock:
            client = self.client
            if client is None:
                return
            try:
                client.send(data, socket.MSG_NOSIGNAL)
                return
            except BlockingIOError:
                return  # the client is not reading: drop
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    return
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._disconnect)

    def close(self) -> None:
        self._disconnect()
        self.listener.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _same_file(path: str) -> Callable[[int], bool]:
    """Whether an inherited fd is the file ``path`` names (else the new command line wants another)."""

    def matches(fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    return matches


def _same_socket(path: str | None) -> Callable[[int], bool]:
    """Whether an inherited listening socket is bound to ``path``."""

    def matches(fd: int) -> bool:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                return sock.getsockname() == path
        except OSError:
            return False

    return matches

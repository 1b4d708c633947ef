"""Migration channels: QEMU's URI and ``channels`` forms, parsed into one
Address, and opened as a stream to write to or read from.

Forms: ``unix:PATH``, ``tcp:HOST:PORT``, ``file:PATH[,offset=N]``,
``fd:NAME`` (a socket given with getfd), and the JSON
``{"channel-type": "main"|"cpr", "addr": {"transport": "socket"|"file", ...}}``.
``exec:`` is refused: minivmm never hands a command to a shell.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from minivmm.files import open_regular
from minivmm.sockets import unix_listen


class ChannelError(ValueError):
    pass


@dataclass(frozen=True)
class Address:
    transport: str  # "socket" or "file"
    type: str = ""  # socket: "unix", "inet" or "fd"
    path: str | None = None  # unix socket path, or file name
    host: str | None = None
    port: int = 0
    fd_name: str | None = None
    offset: int = 0  # file

    def describe(self) -> str:
        if self.transport == "file":
            return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")
        if self.type == "unix":
            return f"unix:{self.path}"
        if self.type == "inet":
            return f"tcp:{self.host}:{self.port}"
        return f"fd:{self.fd_name}"


@dataclass(frozen=True)
class Channel:
    channel_type: str  # "main" or "cpr"
    addr: Address


# -incoming defer: the main channel comes later, with migrate-incoming.
DEFER = Channel("main", Address("defer"))

NO_EXEC = "exec: migration is not supported: minivmm never runs commands through a shell"
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _port(text: object) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ChannelError(f"port '{text}' is not a number from 0 to 65535")
    return int(text)


def _offset(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ChannelError(f"Parameter 'offset' expects a non-negative integer, not {json.dumps(value)}")
    return value


def check_listen(addr: Address, allow_remote: bool) -> None:
    """A migration stream takes the guest over and has no authentication: listening beyond this
    machine must be asked for, as the user's own decision."""
    if addr.type == "inet" and addr.host not in LOOPBACK and not allow_remote:
        raise ChannelError(
            f"refusing to listen on {addr.host}:{addr.port}: an incoming migration is unauthenticated and "
            "anyone who reaches it controls the guest; listen on 127.0.0.1, or allow it with "
            "-global migration.x-listen-remote=on"
        )


def parse_uri(uri: str) -> Address:
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return Address("socket", "unix", path=rest)
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        if not host or not port:
            raise ChannelError(f"error parsing address '{rest}'")
        return Address("socket", "inet", host=host.strip("[]"), port=_port(port))
    if kind == "file" and rest:
        path, _, opts = rest.partition(",")
        offset = 0
        if opts:
            key, _, value = opts.partition("=")
            if key != "offset":
                raise ChannelError(f"file URI has an invalid option '{opts}' (only offset=N)")
            offset = _offset(value)
        return Address("file", path=path, offset=offset)
    if kind == "fd" and rest:
        return Address("socket", "fd", fd_name=rest)
    if kind == "exec":
        raise ChannelError(NO_EXEC)
    raise ChannelError(f"unknown migration protocol: {uri}")


def parse_address(addr: object) -> Address:
    """The ``addr`` member of a channel (QAPI's MigrationAddress)."""
    if not isinstance(addr, dict):
        raise ChannelError("Invalid parameter type for 'addr', expected: object")
    transport = addr.get("transport")
    if transport == "socket":
        kind = addr.get("type")
        if kind == "unix" and isinstance(addr.get("path"), str):
            return Address("socket", "unix", path=addr["path"])
        if kind == "inet" and isinstance(addr.get("host"), str) and "port" in addr:
            return Address("socket", "inet", host=addr["host"], port=_port(addr["port"]))
        if kind == "fd" and isinstance(addr.get("str"), str):
            return Address("socket", "fd", fd_name=addr["str"])
        raise ChannelError(f"invalid socket address {json.dumps(addr)}")
    if transport == "file":
        if not isinstance(addr.get("filename"), str):
            raise ChannelError("Parameter 'filename' is missing")
        return Address("file", path=addr["filename"], offset=_offset(addr.get("offset", 0)))
    if transport == "exec":
        raise ChannelError(NO_EXEC)
    raise ChannelError(f"Parameter 'transport' does not accept value '{transport}'")


def parse_channel(obj: object) -> Channel:
    if not isinstance(obj, dict):
        raise ChannelError("migration channel must be an object")
    kind = obj.get("channel-type")
    if kind not in ("main", "cpr"):
        raise ChannelError(f"Parameter 'channel-type' does not accept value '{kind}'")
    return Channel(kind, parse_address(obj.get("addr")))


def main_of(channels: list[Channel]) -> Channel | None:
    """The one main channel of a list (QEMU's wording when there are more); None when there is none."""
    mains = [c for c in channels if c.channel_type == "main"]
    if len(mains) > 1:
        raise ChannelError("Channel list has more than one main entry")
    return mains[0] if mains else None


def parse_channel_text(text: str) -> Channel:
    """A command-line channel: ``defer``, a URI, JSON, or keyval (``cpr,addr.transport=socket,...``)."""
    if text == "defer":
        return DEFER
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            return parse_channel(json.loads(stripped))
        except json.JSONDecodeError as e:
            raise ChannelError(f"JSON parse error, {e.msg}") from None
        except (RecursionError, ValueError):
            raise ChannelError("JSON parse error, value too deep or too large") from None
    if text.startswith(("main,", "cpr,")) or text in ("main", "cpr"):
        kind, _, rest = text.partition(",")
        addr: dict[str, str] = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if not key.startswith("addr."):
                raise ChannelError(f"Invalid parameter '{key}'")
            addr[key[len("addr.") :]] = value
        return Channel(kind, parse_address(addr))
    return Channel("main", parse_uri(text))


# --- opening ---------------------------------------------------------------------------


def connect(addr: Address, named_fd) -> socket.socket | object:
    """An outgoing stream: a connected socket, or a file object positioned at the offset."""
    try:
        if addr.transport == "file":
            fd = open_regular(addr.path, os.O_WRONLY | os.O_CREAT)
            os.ftruncate(fd, addr.offset)
            f = os.fdopen(fd, "wb", buffering=0)
            f.seek(addr.offset)
            return f
        if addr.type == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(addr.path)
            except OSError:
                s.close()
                raise
            return s
        if addr.type == "inet":
            return socket.create_connection((addr.host, addr.port), timeout=30)
        fd = named_fd(addr.fd_name)
        return socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise ChannelError(f"Failed to connect to '{addr.describe()}': {e.strerror or e}") from None


class Listener:
    """The incoming side's endpoint: bound at start-up, accepting in the migration thread."""

    def __init__(self, addr: Address, inherited_fd: bool = False) -> None:
        """``inherited_fd``: an ``fd`` address names an already listening socket by number (the cpr channel)."""
        self.addr = addr
        self.sock: socket.socket | None = None
        try:
            if addr.type == "fd" and inherited_fd:
                if not addr.fd_name.isdigit():
                    raise ChannelError(f"fd '{addr.fd_name}' is not a number")
                self.sock = socket.socket(fileno=int(addr.fd_name))
                return
            if addr.transport == "file":
                fd = open_regular(addr.path, os.O_RDONLY)
                self.file = os.fdopen(fd, "rb", buffering=0)
                self.file.seek(addr.offset)
            elif addr.type == "unix":
                self.sock = unix_listen(addr.path, backlog=1)
            elif addr.type == "inet":
                self.sock = socket.create_server((addr.host, addr.port))
            else:
                raise ChannelError("an incoming fd: channel needs a listening socket (use addr.type=fd only for cpr)")
        except OSError as e:
            raise ChannelError(f"Failed to open '{addr.describe()}': {e.strerror or e}") from None

    def accept(self):
        if self.sock is None:
            return self.file
        conn, _ = self.sock.accept()
        self.sock.close()
        if self.addr.type == "unix":
            try:
                os.unlink(self.addr.path)
            except OSError:
                pass
        self.sock = None
        return conn

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

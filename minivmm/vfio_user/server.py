"""A vfio-user server library: one device, one client connection at a time.

The server negotiates the version, answers the device's region, interrupt and
DMA commands, and keeps the connection whatever a client sends: a message it
cannot carry out gets an error reply with an errno (or, with No_reply, only a
line on stderr), never an exception out of the loop. When the client goes,
the server does what the spec asks (unmaps its memory, closes its interrupt
fds, keeps the device state) and waits for the next one: a VMM that restarts
or updates itself reconnects to the same device.

Guest memory reaches the device through ``DmaSpace``: windows the client
mapped with DMA_MAP, read and written through an mmap of the fd that came
with the message, or, without one, through DMA_READ/DMA_WRITE messages to
the client. Device work that touches guest memory runs after the reply to the
command that started it (``defer``), so a client that waits for that reply
is never asked for DMA at the same time.
"""

from __future__ import annotations

import errno
import mmap
import os
import selectors
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from minivmm.vfio import constants as vc

from . import protocol as p
from .protocol import Command, Message, ProtocolError

MAX_DMA_WINDOWS = 1024
MAX_MSG_FDS = 8


@dataclass
class Region:
    size: int
    flags: int = vc.VFIO_REGION_INFO_FLAG_READ | vc.VFIO_REGION_INFO_FLAG_WRITE


@dataclass
class Irq:
    count: int
    flags: int = vc.VFIO_IRQ_INFO_EVENTFD


class Device:
    """What a served device provides. Offsets and sizes reaching it are within the region."""

    flags = vc.VFIO_DEVICE_FLAGS_PCI | vc.VFIO_DEVICE_FLAGS_RESET
    num_regions = vc.VFIO_PCI_NUM_REGIONS
    num_irqs = vc.VFIO_PCI_NUM_IRQS
    regions: dict[int, Region] = {}
    irqs: dict[int, Irq] = {}

    def attach(self, server: Server) -> None:
        """Called once: the server's DMA space, interrupts and ``defer`` are the device's from now on."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        pass

    def reset(self) -> None:
        pass

    def unmasked(self, index: int, sub: int) -> None:
        """The client unmasked an interrupt (an automasked INTx fires again if still asserted)."""


class DmaError(Exception):
    """A device access outside what the client mapped (the device reports it; the server lives on)."""


@dataclass
class DmaWindow:
    address: int
    size: int
    flags: int
    view: mmap.mmap | None = None  # None: reached through DMA_READ/DMA_WRITE messages

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass
class DmaSpace:
    """The client's DMA windows, by address. Every access is checked against them whole."""

    call_client: Callable[[int, bytes], Message]
    max_xfer: int = p.DEFAULT_MAX_XFER
    windows: list[DmaWindow] = field(default_factory=list)

    def map(self, req: p.DmaMap, fd: int | None) -> None:
        if req.size == 0 or req.address + req.size > 1 << 64 or req.offset + req.size > 1 << 63:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: window {req.address:#x}+{req.size:#x} is empty or wraps")
        if req.flags & ~(p.DMA_MAP_READ | p.DMA_MAP_WRITE):
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: unknown flags {req.flags:#x}")
        if any(w.address < req.address + req.size and req.address < w.end for w in self.windows):
            raise ProtocolError(errno.EEXIST, f"DMA_MAP: {req.address:#x}+{req.size:#x} overlaps a mapped window")
        if len(self.windows) >= MAX_DMA_WINDOWS:
            raise ProtocolError(errno.ENOSPC, f"DMA_MAP: at most {MAX_DMA_WINDOWS} windows")
        view = None
        if fd is not None:
            prot = (mmap.PROT_READ if req.flags & p.DMA_MAP_READ else 0) | (
                mmap.PROT_WRITE if req.flags & p.DMA_MAP_WRITE else 0
            )
            if req.offset % mmap.PAGESIZE:
                raise ProtocolError(errno.EINVAL, f"DMA_MAP: fd offset {req.offset:#x} is not page-aligned")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < req.offset + req.size:
                # a window past the end of the file would fault (SIGBUS) on the device's first access
                raise ProtocolError(errno.EINVAL, f"DMA_MAP: the fd has no {req.offset:#x}+{req.size:#x} to map")
            try:
                view = mmap.mmap(fd, req.size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=req.offset)
            except (OSError, ValueError, OverflowError) as e:
                raise ProtocolError(errno.EINVAL, f"DMA_MAP: cannot map the fd: {e}") from None
        self.windows.append(DmaWindow(req.address, req.size, req.flags, view))
        self.windows.sort(key=lambda w: w.address)

    def unmap(self, req: p.DmaUnmap) -> None:
        if req.flags & p.DMA_UNMAP_ALL:
            self.clear()
            return
        for w in self.windows:
            if (w.address, w.size) == (req.address, req.size):
                self.windows.remove(w)
                if w.view is not None:
                    w.view.close()
                return
        raise ProtocolError(errno.ENOENT, f"DMA_UNMAP: no window {req.address:#x}+{req.size:#x}")

    def clear(self) -> None:
        for w in self.windows:
            if w.view is not None:
                w.view.close()
        self.windows.clear()

    def _window(self, address: int, size: int, flag: int) -> DmaWindow:
        for w in self.windows:
            if w.address <= address and address + size <= w.end:
                if not w.flags & flag:
                    raise DmaError(f"{address:#x}+{size:#x} is not {'readable' if flag == 1 else 'writable'}")
                return w
        raise DmaError(f"{address:#x}+{size:#x} is not inside one mapped window")

    def read(self, address: int, size: int) -> bytes:
        w = self._window(address, size, p.DMA_MAP_READ)
        if w.view is not None:
            return w.view[address - w.address : address - w.address + size]
        out = bytearray()
        while len(out) < size:
            n = min(size - len(out), self.max_xfer)
            reply = self.call_client(Command.DMA_READ, p.DmaAccess(address + len(out), n).encode())
            data = p.DmaAccess.decode(reply.payload).data[:n]
            if len(data) < n:
                raise DmaError(f"DMA_READ at {address + len(out):#x}: the client sent {len(data)} of {n} bytes")
            out += data
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        w = self._window(address, len(data), p.DMA_MAP_WRITE)
        if w.view is not None:
            w.view[address - w.address : address - w.address + len(data)] = data
            return
        for at in range(0, len(data), self.max_xfer):
            chunk = data[at : at + self.max_xfer]
            self.call_client(Command.DMA_WRITE, p.DmaAccess(address + at, len(chunk), chunk).encode())


@dataclass
class Interrupts:
    """The eventfds a client gave with SET_IRQS, and the mask state of each interrupt."""

    triggers: dict[tuple[int, int], int] = field(default_factory=dict)
    unmask_fds: dict[tuple[int, int], int] = field(default_factory=dict)  # INTx resample eventfds
    masked: set[tuple[int, int]] = field(default_factory=set)

    def signal(self, index: int, sub: int = 0, automask: bool = False) -> bool:
        """Signal the interrupt's eventfd unless it is masked; whether it was signalled."""
        fd = self.triggers.get((index, sub))
        if fd is None or (index, sub) in self.masked:
            return False
        os.eventfd_write(fd, 1)
        if automask:
            self.masked.add((index, sub))
        return True

    def close(self) -> None:
        for fd in [*self.triggers.values(), *self.unmask_fds.values()]:
            os.close(fd)
        self.triggers.clear()
        self.unmask_fds.clear()
        self.masked.clear()


class Server:
    """Serves ``device`` on the listening unix socket ``listener``, one client at a time."""

    def __init__(self, device: Device, listener: socket.socket, log=sys.stderr) -> None:
        self.device, self.listener, self.log = device, listener, log
        self.conn: socket.socket | None = None
        self.negotiated = False
        self.client_caps: dict = {}
        self.dma = DmaSpace(self._call_client)
        self.irqs = Interrupts()
        self._deferred: list[Callable[[], None]] = []
        self._pending: list[Message] = []  # client commands that came while the server awaited a reply
        self._next_id = 0
        self.connections = 0  # clients served so far: a client kept across a live update is one
        self.running = True
        device.attach(self)

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` once the current command's reply is sent."""
        self._deferred.append(work)

    def say(self, text: str) -> None:
        print(f"minivmm-vfio-user: {text}", file=self.log, flush=True)

    # --- the loop --------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        while self.running:
            conn, _ = self.listener.accept()
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        """One client, until it goes; then its memory and interrupt fds go too (the device state stays)."""
        self.conn, self.negotiated = conn, False
        self.connections += 1
        self.say(f"client {self.connections} connected")
        sel = selectors.DefaultSelector()
        try:
            while self.running:
                sel.register(conn, selectors.EVENT_READ, None)
                for key, fd in self.irqs.unmask_fds.items():
                    sel.register(fd, selectors.EVENT_READ, key)
                ready = [] if self._pending else sel.select()
                message_ready = any(sk.data is None for sk, _ in ready)
                for sk, _ in ready:
                    # A resample eventfd: the guest's EOI unmasks the INTx. A message already there
                    # went before the EOI (a posted write acknowledging the device): it comes first,
                    # and the eventfd, still readable, is seen next time.
                    if sk.data is not None and not message_ready:
                        os.eventfd_read(sk.fd)
                        self._unmask(*sk.data)
                for sk in list(sel.get_map().values()):
                    sel.unregister(sk.fileobj)
                if self._pending:
                    msg = self._pending.pop(0)
                elif any(sk.data is None for sk, _ in ready):
                    msg = p.receive(conn, MAX_MSG_FDS)
                else:
                    continue
                self._dispatch(msg)
        except (p.Disconnected, ConnectionError):
            pass
        finally:
            self.say(f"client {self.connections} gone")
            sel.close()
            conn.close()
            self.conn = None
            self.dma.clear()
            self.irqs.close()
            self._pending.clear()
            self._deferred.clear()

    def _dispatch(self, msg: Message) -> None:
        if msg.header.is_reply:  # a stray reply (nothing is awaited here): drop it and its fds
            self._close_fds(msg.fds)
            return
        try:
            if msg.problem is not None:
                raise msg.problem
            reply = self._handle(msg)
        except ProtocolError as e:
            self._close_fds(msg.fds)
            self.say(f"command {msg.header.command} (id {msg.header.id}): {e}")
            reply = msg.error_reply(e.errno)
        except (p.Disconnected, ConnectionError):
            raise
        except Exception as e:  # a device bug must not end the connection: the client sees EIO
            self._close_fds(msg.fds)
            self.say(f"command {msg.header.command} (id {msg.header.id}): internal error: {e!r}")
            reply = msg.error_reply(errno.EIO)
        self._close_fds(msg.fds)  # what a command came with and did not keep
        if not msg.header.no_reply:
            p.send(self.conn, reply)
        while self._deferred:
            work = self._deferred.pop(0)
            try:
                work()
            except (p.Disconnected, ConnectionError):
                raise
            except Exception as e:  # e.g. the client's bad answer to the device's DMA request
                self.say(f"device work after command {msg.header.command}: {e}")

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        fds.clear()

    def _call_client(self, command: int, payload: bytes) -> Message:
        """A server-to-client command on the one socket: client commands that arrive before its reply
        wait in ``_pending``. An error reply is a DmaError for the device to report."""
        self._next_id = (self._next_id + 1) & 0xFFFF
        p.send(self.conn, Message.command(self._next_id, command, payload))
        while True:
            msg = p.receive(self.conn, MAX_MSG_FDS)
            if msg.header.is_reply and msg.header.id == self._next_id:
                if msg.header.flags & p.FLAG_ERROR:
                    raise DmaError(f"the client refused {Command(command).name}: {os.strerror(msg.header.error)}")
                return msg
            if msg.header.is_reply:
                self._close_fds(msg.fds)
            else:
                self._pending.append(msg)

    # --- commands ---------------------------------------------------------------------------------
    def _handle(self, msg: Message) -> Message:
        cmd, payload = msg.header.command, msg.payload
        if cmd == Command.VERSION:
            return self._version(msg)
        if not self.negotiated:
            raise ProtocolError(errno.EINVAL, "the first command must be VERSION")
        if msg.fds and cmd not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS):
            raise ProtocolError(errno.EINVAL, f"{len(msg.fds)} fds came with a command that takes none")
        dev = self.device
        if cmd == Command.DMA_MAP:
            req = p.DmaMap.decode(payload)
            if len(msg.fds) > 1:
                raise ProtocolError(errno.EINVAL, f"DMA_MAP: {len(msg.fds)} fds, at most one")
            fd = msg.fds[0] if msg.fds else None
            try:
                self.dma.map(req, fd)
            finally:
                self._close_fds(msg.fds)  # the mapping keeps the memory; the fd is not needed
            return msg.reply()
        if cmd == Command.DMA_UNMAP:
            req = p.DmaUnmap.decode(payload)
            self.dma.unmap(req)
            return msg.reply(p.DmaUnmap(p.DmaUnmap.LAYOUT.size, req.flags, req.address, req.size).encode())
        if cmd == Command.DEVICE_GET_INFO:
            p.DeviceInfo.decode(payload)
            return msg.reply(p.DeviceInfo(16, dev.flags, dev.num_regions, dev.num_irqs).encode())
        if cmd == Command.DEVICE_GET_REGION_INFO:
            req = p.RegionInfo.decode(payload)
            if req.index >= dev.num_regions:
                raise ProtocolError(errno.EINVAL, f"GET_REGION_INFO: no region {req.index}")
            region = dev.regions.get(req.index, Region(0, 0))
            return msg.reply(p.RegionInfo(32, region.flags, req.index, 0, region.size, 0).encode())
        if cmd == Command.DEVICE_GET_IRQ_INFO:
            req = p.IrqInfo.decode(payload)
            if req.index >= dev.num_irqs:
                raise ProtocolError(errno.EINVAL, f"GET_IRQ_INFO: no interrupt index {req.index}")
            irq = dev.irqs.get(req.index, Irq(0, 0))
            return msg.reply(p.IrqInfo(16, irq.flags, req.index, irq.count).encode())
        if cmd == Command.DEVICE_SET_IRQS:
            self._set_irqs(p.IrqSet.decode(payload), msg.fds)
            return msg.reply()
        if cmd == Command.REGION_READ:
            req = p.RegionAccess.decode(payload)
            self._check_access(req.region, req.offset, req.count, vc.VFIO_REGION_INFO_FLAG_READ)
            data = dev.region_read(req.region, req.offset, req.count)
            return msg.reply(p.RegionAccess(req.offset, req.region, req.count, data).encode())
        if cmd == Command.REGION_WRITE:
            req = p.RegionAccess.decode(payload)
            if len(req.data) != req.count:
                raise ProtocolError(errno.EINVAL, f"REGION_WRITE: count {req.count} but {len(req.data)} data bytes")
            self._check_access(req.region, req.offset, req.count, vc.VFIO_REGION_INFO_FLAG_WRITE)
            dev.region_write(req.region, req.offset, req.data)
            return msg.reply(p.RegionAccess(req.offset, req.region, req.count).encode())
        if cmd == Command.REGION_WRITE_MULTI:
            req = p.WriteMulti.decode(payload)
            for offset, region, count, _data in req.writes:
                self._check_access(region, offset, count, vc.VFIO_REGION_INFO_FLAG_WRITE)
            for offset, region, _count, data in req.writes:
                dev.region_write(region, offset, data)
            return msg.reply(p.WriteMulti.COUNT.pack(len(req.writes)))
        if cmd == Command.DEVICE_RESET:
            dev.reset()
            return msg.reply()
        raise ProtocolError(errno.ENOSYS, f"command {cmd} is not supported")

    def _version(self, msg: Message) -> Message:
        if self.negotiated:
            raise ProtocolError(errno.EINVAL, "VERSION: already negotiated on this connection")
        req = p.Version.decode(msg.payload)
        if req.major != p.MAJOR:
            raise ProtocolError(errno.ENOTSUP, f"VERSION: major {req.major} (this server speaks {p.MAJOR})")
        caps = req.capabilities
        xfer = caps.get("max_data_xfer_size", p.DEFAULT_MAX_XFER)
        if not isinstance(xfer, int) or isinstance(xfer, bool) or xfer < 8:
            raise ProtocolError(errno.EINVAL, f"VERSION: max_data_xfer_size {xfer!r}")
        self.client_caps = caps
        self.dma.max_xfer = min(xfer, p.DEFAULT_MAX_XFER)
        mine: dict = {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": self.dma.max_xfer,
            "pgsizes": p.PAGE_SIZE,
            "max_dma_maps": MAX_DMA_WINDOWS,
        }
        if caps.get("write_multiple") is True:
            mine["write_multiple"] = True
        self.negotiated = True
        return msg.reply(p.Version(p.MAJOR, min(req.minor, p.MINOR), mine).encode())

    def _check_access(self, index: int, offset: int, count: int, flag: int) -> None:
        region = self.device.regions.get(index)
        if region is None or not region.flags & flag:
            raise ProtocolError(errno.EINVAL, f"region {index} cannot be {'read' if flag == 1 else 'written'}")
        if count == 0 or count > self.dma.max_xfer or offset + count > region.size:
            raise ProtocolError(errno.EINVAL, f"region {index}: {offset:#x}+{count:#x} is outside {region.size:#x}")

    def _set_irqs(self, req: p.IrqSet, fds: list[int]) -> None:
        irq = self.device.irqs.get(req.index)
        data_type = req.flags & vc.VFIO_IRQ_SET_DATA_TYPE_MASK
        action = req.flags & vc.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if irq is None or req.flags & ~(vc.VFIO_IRQ_SET_DATA_TYPE_MASK | vc.VFIO_IRQ_SET_ACTION_TYPE_MASK):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: index {req.index}, flags {req.flags:#x}")
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: flags {req.flags:#x} name not one data type and one action")
        if data_type == vc.VFIO_IRQ_SET_DATA_NONE and req.count == 0 and action == vc.VFIO_IRQ_SET_ACTION_TRIGGER:
            for key in [k for k in self.irqs.triggers if k[0] == req.index]:  # disable the whole index
                os.close(self.irqs.triggers.pop(key))
            return
        if req.start + req.count > irq.count or req.count == 0:
            where = f"{req.start}+{req.count}"
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: {where} is outside index {req.index}'s {irq.count}")
        subs = range(req.start, req.start + req.count)
        if data_type == vc.VFIO_IRQ_SET_DATA_EVENTFD:
            if action == vc.VFIO_IRQ_SET_ACTION_MASK or (fds and len(fds) != req.count):
                raise ProtocolError(errno.EINVAL, f"SET_IRQS: {len(fds)} eventfds for {req.count} interrupts")
            for fd in fds:
                if not _is_eventfd(fd):
                    raise ProtocolError(errno.EINVAL, "SET_IRQS: an fd that came with DATA_EVENTFD is not an eventfd")
            table = self.irqs.triggers if action == vc.VFIO_IRQ_SET_ACTION_TRIGGER else self.irqs.unmask_fds
            for i, sub in enumerate(subs):
                old = table.pop((req.index, sub), None)
                if old is not None:
                    os.close(old)
                if fds:
                    table[(req.index, sub)] = fds[i]
            fds.clear()  # the tables own them now
            return
        chosen = list(subs)
        if data_type == vc.VFIO_IRQ_SET_DATA_BOOL:
            if len(req.data) < req.count:
                raise ProtocolError(errno.EINVAL, f"SET_IRQS: {len(req.data)} booleans for {req.count} interrupts")
            chosen = [sub for i, sub in enumerate(subs) if req.data[i]]
        for sub in chosen:
            if action == vc.VFIO_IRQ_SET_ACTION_MASK:
                self.irqs.masked.add((req.index, sub))
            elif action == vc.VFIO_IRQ_SET_ACTION_UNMASK:
                self._unmask(req.index, sub)
            else:
                self.irqs.signal(req.index, sub)

    def _unmask(self, index: int, sub: int) -> None:
        self.irqs.masked.discard((index, sub))
        self.device.unmasked(index, sub)


def _is_eventfd(fd: int) -> bool:
    """Only an eventfd: writing the count to any other file could block or corrupt it."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def listen(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket file there is replaced)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):  # only a socket is taken for a stale one
            os.unlink(path)
    except OSError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(1)
    return sock

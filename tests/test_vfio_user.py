"""vfio-user without a VM: the codec, and minivmm's sample device server (its own process,
in its own process group, killed at teardown) driven over its unix socket by minivmm's client:
negotiation, regions, BAR registers, DMA into a memfd, interrupts through eventfds, DMA by
message, reconnection, and malformed and fuzzed messages that it must answer and survive."""

from __future__ import annotations

import errno
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from minivmm.vfio import constants as vc
from minivmm.vfio_user import protocol as p
from minivmm.vfio_user import sample
from minivmm.vfio_user.client import Client, ClientError
from minivmm.vfio_user.protocol import Command
from minivmm.vmprocess import kill_group

BAR0, CONFIG = vc.VFIO_PCI_BAR0_REGION_INDEX, vc.VFIO_PCI_CONFIG_REGION_INDEX
INTX, MSI = vc.VFIO_PCI_INTX_IRQ_INDEX, vc.VFIO_PCI_MSI_IRQ_INDEX


# --- codec -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [
        p.DmaMap(32, 3, 0x1000, 0x100000, 0x2000),
        p.DmaUnmap(24, 0, 0x100000, 0x2000),
        p.DeviceInfo(16, 3, 9, 5),
        p.RegionInfo(32, 3, 7, 0, 256, 0),
        p.IrqInfo(16, 7, 0, 1),
        p.IrqSet(22, 0x24, 1, 0, 2, b"\x01\x00"),
        p.RegionAccess(0x24, 0, 4, b"\x01\x00\x00\x00"),
        p.DmaAccess(0x1234, 3, b"abc"),
        p.WriteMulti([(8, 0, 4, b"\x01\x02\x03\x04"), (0x30, 0, 1, b"\x02")]),
        p.Version(0, 0, {"max_msg_fds": 8, "migration": {"pgsize": 4096}}),
    ],
    ids=lambda v: type(v).__name__,
)
def test_payloads_round_trip(payload):
    data = payload.encode()
    assert type(payload).decode(data) == payload
    with pytest.raises(p.ProtocolError):
        type(payload).decode(data[:3])  # every fixed part is longer than 3 bytes


def test_header_layout_and_flags():
    msg = p.Message.command(7, Command.REGION_READ, b"x" * 16, p.FLAG_NO_REPLY)
    raw = msg.encode()
    assert raw[:16] == bytes.fromhex("0700 0900 20000000 10000000 00000000".replace(" ", ""))
    assert p.Header.unpack(raw).no_reply and not p.Header.unpack(raw).is_reply
    err = msg.error_reply(errno.EINVAL)
    assert err.header.is_reply and err.header.flags & p.FLAG_ERROR and err.header.error == errno.EINVAL
    assert err.header.size == 16 and err.header.id == 7


def test_dma_access_is_laid_out_as_qemus_client_reads_it():
    # VFIOUserDMARW: offset u64, count u32, data at byte 12; sizeof pads the fixed part to 16.
    assert p.DmaAccess(0x1000, 4, b"abcd").encode() == (0x1000).to_bytes(8, "little") + b"\4\0\0\0abcd\0\0\0\0"
    assert len(p.DmaAccess(0x1000, 4).encode()) == 16


def test_malformed_payloads_are_protocol_errors():
    with pytest.raises(p.ProtocolError, match="NUL-terminated"):
        p.Version.decode(b"\0\0\0\0{}")
    with pytest.raises(p.ProtocolError, match="malformed capabilities"):
        p.Version.decode(b"\0\0\0\0{\0")
    with pytest.raises(p.ProtocolError, match="not an object"):
        p.Version.decode(b'\0\0\0\0{"capabilities": 3}\0')
    with pytest.raises(p.ProtocolError, match="do not fit"):
        p.WriteMulti.decode((1000).to_bytes(8, "little"))


# --- the sample server in its own process ------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    path, log = str(tmp_path / "dev.sock"), open(tmp_path / "server.log", "w+")  # noqa: SIM115
    # its log goes to a file: a pipe nobody reads would fill and stop the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "minivmm.vfio_user.sample", path],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not listen in 20 s"
            time.sleep(0.02)
        yield path, proc
        assert proc.poll() is None, f"the server ended: {(tmp_path / 'server.log').read_text()}"
    finally:
        kill_group(proc)
        log.close()


@pytest.fixture
def client(server):
    c = Client.connect(server[0])
    c.sock.settimeout(10)
    c.negotiate()
    try:
        yield c
    finally:
        c.close()


def _memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _eventfd_count(fd: int, timeout: float = 2.0) -> int:
    """The eventfd's count (0 when nothing came within ``timeout``)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.eventfd_read(fd) if ready else 0


def _transfer(client: Client, src: int, dst: int, length: int, cmd: int = sample.CMD_START) -> int:
    client.write32(BAR0, sample.DMA_SRC, src & 0xFFFFFFFF)
    client.write32(BAR0, sample.DMA_SRC + 4, src >> 32)
    client.write32(BAR0, sample.DMA_DST, dst & 0xFFFFFFFF)
    client.write32(BAR0, sample.DMA_DST + 4, dst >> 32)
    client.write32(BAR0, sample.DMA_LEN, length)
    client.write32(BAR0, sample.DMA_CMD, cmd, posted=True)  # as QEMU posts BAR writes
    return client.read32(BAR0, sample.DMA_STATUS)  # commands run in order: the transfer is done


def test_version_negotiation(server):
    c = Client.connect(server[0])
    try:
        with pytest.raises(ClientError, match="DEVICE_GET_INFO.*EINVAL|Invalid argument"):
            c.device_info()  # before VERSION
        # what QEMU 11's client proposes (hw/vfio-user/proxy.c caps_json)
        qemu_caps = {
            "migration": {"pgsize": 4096, "max_bitmap_size": 256 << 20},
            "max_msg_fds": 16,
            "max_data_xfer_size": 1 << 20,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
            "write_multiple": True,
        }
        reply = c.negotiate(qemu_caps)
        assert (reply.major, reply.minor) == (0, 0)
        caps = reply.capabilities
        assert caps["max_msg_fds"] <= p.MAX_MAX_FDS and caps["max_data_xfer_size"] <= p.MAX_MAX_XFER
        assert caps["pgsizes"] == 4096 and caps["max_dma_maps"] <= 65535 and caps["write_multiple"] is True
        assert set(caps) <= set(qemu_caps)  # a subset of what was proposed
        with pytest.raises(ClientError):
            c.negotiate()  # once per connection
    finally:
        c.close()


def test_device_regions_and_interrupts(client):
    info = client.device_info()
    assert info.flags == vc.VFIO_DEVICE_FLAGS_PCI | vc.VFIO_DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (vc.VFIO_PCI_NUM_REGIONS, vc.VFIO_PCI_NUM_IRQS)
    rw = vc.VFIO_REGION_INFO_FLAG_READ | vc.VFIO_REGION_INFO_FLAG_WRITE
    bar0, config, bar1 = client.region_info(BAR0), client.region_info(CONFIG), client.region_info(1)
    bar2, bar3 = client.region_info(sample.MSIX_BAR), client.region_info(sample.MSIX_BAR + 1)
    assert (bar0.index, bar0.size, bar0.flags) == (BAR0, sample.BAR0_SIZE, rw)
    assert (config.size, config.flags) == (256, rw)
    assert (bar1.size, bar1.flags) == (0, 0)
    assert (bar2.size, bar3.size) == (sample.MSIX_BAR_SIZE, 0)  # a 64-bit BAR: BAR3 is its upper half
    intx, msi, msix = client.irq_info(INTX), client.irq_info(MSI), client.irq_info(vc.VFIO_PCI_MSIX_IRQ_INDEX)
    assert intx.count == 1 and intx.flags & vc.VFIO_IRQ_INFO_AUTOMASKED and intx.flags & vc.VFIO_IRQ_INFO_EVENTFD
    assert msi.count == 1 and msix.count == sample.MSIX_VECTORS
    with pytest.raises(ClientError):
        client.region_info(vc.VFIO_PCI_NUM_REGIONS)


def test_config_space(client):
    assert client.read32(CONFIG, 0) == sample.DEVICE_ID << 16 | sample.VENDOR_ID
    assert client.region_read(CONFIG, 0x0B, 1)[0] == 0x00 and client.region_read(CONFIG, 0x0A, 1)[0] == 0xFF
    assert client.region_read(CONFIG, 0x3D, 1) == b"\x01"  # INTx pin A
    cap = client.region_read(CONFIG, 0x34, 1)[0]
    assert client.region_read(CONFIG, cap, 1)[0] == 0x05  # MSI
    client.write32(CONFIG, 0x10, 0xFFFFFFFF)  # BAR sizing
    assert client.read32(CONFIG, 0x10) == 0xFFFFF000
    client.write32(CONFIG, 0, 0)  # ids are read-only
    assert client.read32(CONFIG, 0) == sample.DEVICE_ID << 16 | sample.VENDOR_ID


def test_bar_registers_and_reset(client):
    assert client.read32(BAR0, sample.ID) == sample.ID_VALUE
    assert client.read32(BAR0, sample.VERSION) == sample.VERSION_VALUE
    client.write32(BAR0, sample.SCRATCH, 0xDEADBEEF)
    client.region_write(BAR0, sample.SCRATCH + 1, b"\x11")  # a byte within the register
    assert client.read32(BAR0, sample.SCRATCH) == 0xDEAD11EF
    client.write32(BAR0, sample.ID, 0)
    assert client.read32(BAR0, sample.ID) == sample.ID_VALUE
    assert client.region_read(BAR0, 0xFFC, 4) == bytes(4)  # past the registers: zeros
    with pytest.raises(ClientError):
        client.region_read(BAR0, 0xFFE, 4)  # past the BAR
    client.reset()
    assert client.read32(BAR0, sample.SCRATCH) == 0


def test_write_multiple(client):
    writes = [(sample.SCRATCH, BAR0, 4, (0x01020304).to_bytes(4, "little")), (sample.DMA_LEN, BAR0, 2, b"\x10\x00")]
    reply = client.request(Command.REGION_WRITE_MULTI, p.WriteMulti(writes).encode())
    assert reply.payload == (2).to_bytes(8, "little")
    assert client.read32(BAR0, sample.SCRATCH) == 0x01020304 and client.read32(BAR0, sample.DMA_LEN) == 0x10


def test_dma_into_a_memfd(client):
    size, base = 1 << 20, 0x4000_0000
    fd = _memfd(size)
    try:
        os.pwrite(fd, b"hello from guest RAM", 0x1000)
        client.dma_map(base, size, fd)
        assert _transfer(client, base + 0x1000, base + 0x8000, 20) == sample.STATUS_OK
        assert os.pread(fd, 20, 0x8000) == b"hello from guest RAM"
        assert client.read32(BAR0, sample.COUNTER) == 1
        # every guest-controlled address and length is checked: the device reports, the server lives on
        assert _transfer(client, base + size - 8, base, 16) == sample.STATUS_FAULT
        assert _transfer(client, base - 4, base, 8) == sample.STATUS_FAULT
        assert _transfer(client, base, (1 << 64) - 4, 8) == sample.STATUS_FAULT
        assert _transfer(client, base, base, sample.DMA_MAX_LEN + 1) == sample.STATUS_TOO_LONG
        assert client.read32(BAR0, sample.COUNTER) == 1
        with pytest.raises(ClientError) as e:
            client.dma_map(base + 0x1000, 0x1000, fd)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(ClientError):
            client.dma_map(0x8000_0000, 2 * size, fd)  # more than the memfd holds
        client.dma_unmap(base, size)
        assert _transfer(client, base + 0x1000, base + 0x8000, 20) == sample.STATUS_FAULT
    finally:
        os.close(fd)


def test_read_only_window_is_not_written(client):
    fd = _memfd(0x2000)
    try:
        client.dma_map(0x10000, 0x2000, fd, flags=p.DMA_MAP_READ)
        assert _transfer(client, 0x10000, 0x11000, 8) == sample.STATUS_FAULT
    finally:
        os.close(fd)


def test_dma_by_message_without_an_fd(client):
    memory = bytearray(0x4000)
    memory[0x100:0x105] = b"bytes"
    client.dma_map(0x20000, len(memory), memory=memory)
    assert _transfer(client, 0x20100, 0x22000, 5) == sample.STATUS_OK
    assert memory[0x2000:0x2005] == b"bytes"


def test_intx_through_an_eventfd_is_automasked(client):
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        client.set_eventfd(INTX, efd)
        client.write32(BAR0, sample.IRQ_RAISE, sample.IRQ_SOFT)
        assert _eventfd_count(efd) == 1
        assert client.read32(BAR0, sample.IRQ_STATUS) == sample.IRQ_SOFT
        client.write32(BAR0, sample.IRQ_RAISE, sample.IRQ_SOFT)  # masked until the client unmasks
        assert _eventfd_count(efd, 0.2) == 0
        client.set_irqs(INTX, vc.VFIO_IRQ_SET_DATA_NONE | vc.VFIO_IRQ_SET_ACTION_UNMASK)
        assert _eventfd_count(efd) == 1  # still asserted: it fires again
        client.write32(BAR0, sample.IRQ_ACK, sample.IRQ_SOFT)
        client.set_irqs(INTX, vc.VFIO_IRQ_SET_DATA_NONE | vc.VFIO_IRQ_SET_ACTION_UNMASK)
        assert _eventfd_count(efd, 0.2) == 0
        # the guest's EOI through a resample eventfd unmasks too, as KVM's irqfd resampler does
        resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        client.set_eventfd(INTX, resample, vc.VFIO_IRQ_SET_ACTION_UNMASK)
        os.close(resample)  # the server has its own copy
        client.write32(BAR0, sample.IRQ_RAISE, sample.IRQ_SOFT)
        assert _eventfd_count(efd) == 1
        with pytest.raises(ClientError):
            client.set_eventfd(INTX, _memfd(4096))  # not an eventfd
    finally:
        os.close(efd)


def test_a_write_before_the_eoi_is_taken_before_the_unmask(server, client):
    """The guest acknowledges the device (a posted write) and then EOIs, which KVM turns into a signal
    on the resample eventfd. When both wait for the server together (it is stopped here while they
    come), it takes the write first: the unmask then finds nothing asserted and nothing fires again."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    resample = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    proc = server[1]
    try:
        client.set_eventfd(INTX, efd)
        client.set_eventfd(INTX, resample, vc.VFIO_IRQ_SET_ACTION_UNMASK)
        client.write32(BAR0, sample.IRQ_RAISE, sample.IRQ_SOFT)
        assert _eventfd_count(efd) == 1  # fired, and automasked
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            client.write32(BAR0, sample.IRQ_ACK, sample.IRQ_SOFT, posted=True)
            os.eventfd_write(resample, 1)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert _eventfd_count(efd, 0.3) == 0
        assert client.read32(BAR0, sample.IRQ_STATUS) == 0
        client.write32(BAR0, sample.IRQ_RAISE, sample.IRQ_SOFT)  # unmasked: the next one fires
        assert _eventfd_count(efd) == 1
    finally:
        os.close(efd)
        os.close(resample)


def test_msi_on_dma_completion(client):
    fd, efd = _memfd(0x10000), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        client.dma_map(0, 0x10000, fd)
        client.set_eventfd(MSI, efd)
        for n in range(3):
            assert _transfer(client, 0, 0x8000, 64, sample.CMD_START | sample.CMD_IRQ) == sample.STATUS_OK
            assert _eventfd_count(efd) == 1, n
        assert client.read32(BAR0, sample.IRQ_STATUS) & sample.IRQ_DMA
        client.set_irqs(MSI, vc.VFIO_IRQ_SET_DATA_NONE | vc.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)  # disable
        _transfer(client, 0, 0x8000, 64, sample.CMD_START | sample.CMD_IRQ)
        assert _eventfd_count(efd, 0.2) == 0
    finally:
        os.close(fd)
        os.close(efd)


def test_a_new_connection_keeps_the_device_state_but_not_the_mappings(server):
    first = Client.connect(server[0])
    first.negotiate()
    fd = _memfd(0x1000)
    first.dma_map(0, 0x1000, fd)
    first.write32(BAR0, sample.SCRATCH, 42)
    first.close()
    os.close(fd)
    second = Client.connect(server[0])
    try:
        second.sock.settimeout(10)
        second.negotiate()
        assert second.read32(BAR0, sample.SCRATCH) == 42
        assert _transfer(second, 0, 0x800, 8) == sample.STATUS_FAULT  # the first client's window is gone
    finally:
        second.close()


def test_malformed_frames_get_error_replies(client):
    sock = client.sock
    # a size below the header's: the header alone is taken, and answered
    sock.sendall(p.Header(500, Command.REGION_READ, 3).pack())
    reply = p.receive(sock)
    assert (reply.header.id, reply.header.error) == (500, errno.EINVAL) and reply.header.flags & p.FLAG_ERROR
    # larger than any message may be: the bytes are skipped, the stream stays in step
    big = p.MAX_MESSAGE + 1
    sock.sendall(p.Header(501, Command.REGION_WRITE, big).pack() + bytes(big - 16))
    reply = p.receive(sock)
    assert (reply.header.id, reply.header.error) == (501, errno.E2BIG)
    for command, payload in [
        (Command.REGION_READ, b"\0" * 8),  # short
        (Command.REGION_WRITE, p.RegionAccess(0, BAR0, 8, b"\0" * 4).encode()),  # count != data
        (Command.REGION_READ, p.RegionAccess(0, 42, 4).encode()),  # no such region
        (Command.DEVICE_SET_IRQS, p.IrqSet(20, 0xFF, 0, 0, 1).encode()),
        (Command.DMA_MAP, p.DmaMap(32, 3, 0, (1 << 64) - 0x1000, 0x2000).encode()),  # wraps
        (Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x1234, 1).encode()),  # never mapped
        (Command.DIRTY_PAGES if hasattr(Command, "DIRTY_PAGES") else 14, b""),
        (0xFFFF, b"\xff" * 40),
    ]:
        with pytest.raises(ClientError):
            client.request(command, payload)
    assert client.read32(BAR0, sample.ID) == sample.ID_VALUE


def test_fuzzed_messages_are_answered_and_the_server_stays_up(client, server):
    """Random and mutated messages, framed right (the one thing a stream cannot survive), for a bounded
    time: each gets its reply (an error or not), and the device still works afterwards."""
    rng = random.Random(1234)
    valid = [
        (Command.REGION_READ, p.RegionAccess(0, BAR0, 4).encode()),
        (Command.REGION_WRITE, p.RegionAccess(sample.DMA_CMD, BAR0, 4, b"\x03\0\0\0").encode()),
        (Command.DEVICE_SET_IRQS, p.IrqSet(20, 0x21, 0, 0, 1).encode()),
        (Command.DMA_MAP, p.DmaMap(32, 3, 0, 0x1000, 0x1000).encode()),
        (Command.DMA_UNMAP, p.DmaUnmap(24, 0, 0x1000, 0x1000).encode()),
        (Command.DEVICE_GET_REGION_INFO, p.RegionInfo(32, 0, 7, 0, 0, 0).encode()),
        (Command.REGION_WRITE_MULTI, p.WriteMulti([(8, 0, 4, b"abcd")]).encode()),
        (Command.VERSION, p.Version().encode()),
    ]
    deadline, sent, errors = time.monotonic() + 4, 0, 0
    while time.monotonic() < deadline:
        command, payload = rng.choice(valid)
        payload = bytearray(payload)
        for _ in range(rng.randrange(4)):
            if payload and rng.random() < 0.7:
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            elif rng.random() < 0.5:
                payload = payload[: rng.randrange(len(payload) + 1)]
            else:
                payload += rng.randbytes(rng.randrange(1, 64))
        if rng.random() < 0.1:
            command = rng.randrange(0x20)
        if rng.random() < 0.05:
            payload = rng.randbytes(rng.randrange(200))
        fds = []
        if rng.random() < 0.15:
            fds = [os.eventfd(0, os.EFD_CLOEXEC) if rng.random() < 0.5 else _memfd(0x2000)]
        try:
            client.request(command, bytes(payload), fds)
        except ClientError:
            errors += 1
        finally:
            for fd in fds:
                os.close(fd)
        sent += 1
    assert server[1].poll() is None
    assert sent > 100 and errors > 0, (sent, errors)
    assert client.read32(BAR0, sample.ID) == sample.ID_VALUE

"""The source side: a migration thread that sends RAM and then the machine
state, as QEMU's migration thread does.

``file:`` is stop-and-copy: the VM stops first, so the file holds one
consistent image. Sockets use iterative precopy with KVM's dirty log while
the guest runs, until what is left fits in ``downtime-limit`` at the
bandwidth measured so far; unlike QEMU it always ends: when the dirty set
stops shrinking, or after MAX_PASSES, it stops the VM and copies the rest.
A failure or a cancel puts the VM back the way it was.
"""

from __future__ import annotations

import threading
import time

from minivmm import runstate
from minivmm.log import message

from . import channels, machine_state, stream
from .ram import CHUNK, DirtyLog, is_zero
from .stats import Stats

RECORD_MAX = 16 * CHUNK  # a stopped guest's RAM goes in records of up to 4 MiB

MAX_PASSES = 30
STALL_PASSES = 3  # passes in a row without the dirty set shrinking by a tenth


class Cancelled(Exception):
    pass


class Outgoing:
    def __init__(self, manager, addr: channels.Address) -> None:
        self.manager = manager
        self.machine = manager.machine
        self.addr = addr
        self.status = "setup"
        self.error: str | None = None
        self.stats = Stats()
        self.cancel_requested = False
        self.stopped_vm = False
        self.old_state = self.machine.control.state
        self.times: dict[str, int] = {}  # CLOCK_MONOTONIC ns of each step, sent to the target
        self.thread = threading.Thread(target=self._thread, name="migration", daemon=True)

    def start(self) -> None:
        self.manager.set_status(self, "setup")
        self.thread.start()

    def cancel(self) -> None:
        self.cancel_requested = True

    # --- the thread ----------------------------------------------------------------
    def _check_cancel(self) -> None:
        if self.cancel_requested:
            raise Cancelled()

    def _thread(self) -> None:
        loop = self.machine.loop
        try:
            self._migrate()
        except Cancelled:
            loop.call_and_wait(lambda: self._finish("cancelled", None))
        except Exception as e:
            text = str(e) or e.__class__.__name__
            loop.call_and_wait(lambda: self._finish("failed", text))

    def _migrate(self) -> None:
        loop = self.machine.loop
        out = channels.connect(self.addr, self.manager.named_fd)
        writer = stream.Writer(out)
        try:
            blocks = self.manager.outgoing_blocks()
            writer.header([stream.BlockInfo(b.name, b.size, sent) for b, sent in blocks], self.manager.layout())
            sent_blocks = [(i, b) for i, (b, sent) in enumerate(blocks) if sent]
            self.stats.total = sum(b.size for _, b in sent_blocks)
            self.stats.setup_end = time.monotonic()
            loop.call_and_wait(lambda: self.manager.set_status(self, "active"))
            index = {id(b): i for i, b in sent_blocks}
            if self.addr.transport == "file" or not sent_blocks:
                self._stop_vm()
                self._send_all(writer, sent_blocks, throttle=False)
            else:
                self._precopy(writer, sent_blocks, index)
            self._send_state(writer)
        finally:
            writer.close()
            out.close()
        loop.call_and_wait(lambda: self._finish("completed", None))

    def _send_state(self, writer: stream.Writer) -> None:
        """The machine state, the timestamps and the end mark (vCPUs stopped)."""
        resume = runstate.RUNNING if self.old_state == runstate.RUNNING else self.old_state
        writer.state(machine_state.save(self.machine, resume))
        self.times["saved"] = time.monotonic_ns()
        writer.times(self.times)
        writer.end()
        self.stats.phases["save"] = (self.times["saved"] - self.times["stopped"]) / 1e6
        self.stats.transferred = writer.bytes

    def _stop_vm(self) -> None:
        self.stats.stop = time.monotonic()
        self.times["stop"] = time.monotonic_ns()
        self.machine.loop.call_and_wait(self._stop_on_main)
        self.times["stopped"] = time.monotonic_ns()
        self.stats.phases["stop"] = (self.times["stopped"] - self.times["stop"]) / 1e6

    def _stop_on_main(self) -> None:
        self.stopped_vm = True
        self.machine.control.vm_stop_force_state(runstate.FINISH_MIGRATE)

    def _send(self, writer, index: int, block, offset: int, length: int, skip_zero: bool, throttle: bool) -> None:
        if self.stopped_vm:  # few, large records, checksummed ahead of the writes
            writer.stopped_pages(self._stopped_records(index, block, offset, length, skip_zero))
            self.stats.transferred = writer.bytes
            return
        for at in range(offset, offset + length, CHUNK):
            self._check_cancel()
            n = min(CHUNK, offset + length - at)
            pages = n // stream.PAGE_SIZE
            if skip_zero and is_zero(block, at, n):
                self.stats.zero_pages += pages
                continue
            writer.pages(index, at, memoryview(block.mem)[at : at + n], live=not self.stopped_vm)
            self.stats.normal_pages += pages
            self.stats.transferred = writer.bytes
            if throttle:
                self._throttle(writer.bytes)

    def _stopped_records(self, index: int, block, offset: int, length: int, skip_zero: bool):
        """(index, offset, data) of the runs of non-zero chunks, at most RECORD_MAX each."""
        mem = memoryview(block.mem)
        start = None
        for at in range(offset, offset + length, CHUNK):
            self._check_cancel()
            n = min(CHUNK, offset + length - at)
            if skip_zero and is_zero(block, at, n):
                self.stats.zero_pages += n // stream.PAGE_SIZE
                if start is not None:
                    yield index, start, mem[start:at]
                    start = None
                continue
            self.stats.normal_pages += n // stream.PAGE_SIZE
            if start is not None and at + n - start > RECORD_MAX:
                yield index, start, mem[start:at]
                start = None
            if start is None:
                start = at
        if start is not None:
            yield index, start, mem[start : offset + length]

    def _throttle(self, sent: int) -> None:
        bandwidth = self.manager.params.max_bandwidth
        if bandwidth <= 0:
            return
        ahead = sent / bandwidth - (time.monotonic() - self._throttle_start)
        if ahead > 0:
            time.sleep(ahead)

    def _send_all(self, writer, sent_blocks, throttle: bool) -> None:
        self._throttle_start = time.monotonic()
        for index, block in sent_blocks:
            self._send(writer, index, block, 0, block.size, skip_zero=True, throttle=throttle)
        self.stats.passes += 1

    def _precopy(self, writer, sent_blocks, index) -> None:
        """Send everything while the guest runs, then what it dirtied, pass after pass."""
        m = self.machine
        log = DirtyLog(m.vm, [s for s in m.memslots if id(s.mapping.block) in index])
        log.start()
        try:
            pass_start = time.monotonic()
            self._send_all(writer, sent_blocks, throttle=True)
            pass_bytes, pass_time = writer.bytes, time.monotonic() - pass_start
            # Chunks KVM reported dirty (and cleared) but not yet sent: they must reach the target.
            pending: dict[tuple[int, int], tuple] = {}
            previous, stalled = None, 0
            while True:
                for chunk in log.dirty_chunks():
                    pending[(id(chunk[0]), chunk[1])] = chunk
                dirty_bytes = sum(n for _, _, n in pending.values())
                self.stats.remaining = dirty_bytes
                bandwidth = pass_bytes / max(pass_time, 1e-6)
                if dirty_bytes / bandwidth * 1000 <= self.manager.params.downtime_limit:
                    break
                stalled = stalled + 1 if previous is not None and dirty_bytes > previous * 0.9 else 0
                if stalled >= STALL_PASSES or self.stats.passes >= MAX_PASSES:
                    break  # not converging: stop and copy
                previous = dirty_bytes
                pass_start, before = time.monotonic(), writer.bytes
                self._throttle_start = pass_start
                self._send_chunks(writer, index, pending.values(), throttle=True)
                pending.clear()
                self.stats.passes += 1
                m.loop.call_and_wait(lambda: self.manager.emit_pass(self.stats.passes))
                pass_bytes, pass_time = writer.bytes - before, time.monotonic() - pass_start
            self._stop_vm()
            for chunk in log.dirty_chunks():
                pending[(id(chunk[0]), chunk[1])] = chunk
            self._send_chunks(writer, index, pending.values(), throttle=False)
            self.stats.passes += 1
        finally:
            log.stop()

    def _send_chunks(self, writer, index, chunks, throttle: bool) -> None:
        for block, offset, n in chunks:
            self._send(writer, index[id(block)], block, offset, n, skip_zero=False, throttle=throttle)

    # --- main thread -------------------------------------------------------------------
    def _finish(self, status: str, error: str | None) -> None:
        m = self.machine
        self.stats.end = time.monotonic()
        self.error = error
        if status == "completed":
            m.control.set_state(runstate.POSTMIGRATE)
        elif self.stopped_vm:
            try:
                m.devices.cpr_resume()  # back from a CPR source's hand-over: the DMA addresses are ours again
            except Exception as e:  # noqa: BLE001 - the guest runs on regardless; the failure is the migration's
                message(str(e))
                self.error = f"{error}; {e}" if error else str(e)
            m.devices.bind_irqfds()
            if self.old_state == runstate.RUNNING:
                m.control.vm_start()
            else:
                m.control.set_state(self.old_state)
        self.manager.set_status(self, status)

"""The target side: read the stream into the RAM blocks and the machine
state into the devices and vCPUs, in a thread, then start the VM if the
source was running (QEMU's process_incoming_migration).

The endpoint is bound when the incoming migration is set up, so a bad
address is an error at once; a stream that cannot be loaded ends the
process with one line and a non-zero status, as QEMU's target does. That
holds for any bytes: the decoders raise only StreamError and VMStateError,
a stalled socket times out (stream.timeout()), and anything else that
escapes still ends in one line ("internal error: ...") rather than a
traceback and a target left waiting.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace

from minivmm import runstate
from minivmm.cpr import fdtable
from minivmm.kvm.system import KvmError
from minivmm.vmstate import VMStateError

from . import channels, machine_state, stream
from .stats import Stats

LOAD_ERRORS = (stream.StreamError, VMStateError, KvmError, OSError)


def describe_error(e: BaseException) -> str:
    """The one line for a failed load; an exception no decoder should raise says so."""
    if isinstance(e, LOAD_ERRORS):
        return str(e) or e.__class__.__name__
    return f"internal error: {e.__class__.__name__}: {e}"


class Incoming:
    def __init__(self, manager, channel: channels.Channel) -> None:
        self.manager = manager
        self.machine = manager.machine
        self.addr = channel.addr
        self.listener = channels.Listener(channel.addr)
        self.status = "setup"
        self.error: str | None = None
        self.stats = Stats()
        self.source_times: dict[str, int] = {}
        self.received_ns = 0  # when the end of the stream arrived
        self.take_ns = 0  # when this image began taking the guest over from a cpr-exec keeper
        self.thread = threading.Thread(target=self._thread, name="incoming-migration", daemon=True)

    def start(self) -> None:
        self.manager.set_status(self, "setup")
        self.thread.start()

    def run_now(self) -> None:
        """Load a file synchronously on the main thread (a cpr-exec's new image: resume first, then the rest)."""
        conn = self.listener.accept()
        self.manager.set_status(self, "active")
        try:
            loaded = self._receive(conn)
            self._complete(loaded)
        except Exception as e:  # noqa: BLE001 - every failure is one line, see describe_error
            self._fail(describe_error(e))
        finally:
            conn.close()

    def _thread(self) -> None:
        loop = self.machine.loop
        try:
            conn = self.listener.accept()
        except OSError as e:
            text = f"accepting the migration connection failed: {e}"
            loop.call_and_wait(lambda: self._fail(text))
            return
        try:
            loop.call_and_wait(lambda: self.manager.set_status(self, "active"))
            loaded = self._receive(conn)
            loop.call_and_wait(lambda: self._complete(loaded))
            self._verdict(conn, stream.VERDICT_OK)
        except Exception as e:  # noqa: BLE001 - every failure is one line, see describe_error
            text = describe_error(e)
            self._verdict(conn, f"FAIL {text}\n".encode())
            loop.call_and_wait(lambda: self._fail(text))
        finally:
            conn.close()

    @staticmethod
    def _verdict(conn, verdict: bytes) -> None:
        """For a source with the return-path capability (one that does not read it loses nothing)."""
        if isinstance(conn, socket.socket):
            try:
                conn.sendall(verdict)
            except OSError:
                pass

    def _receive(self, conn) -> machine_state.Loaded:
        reader = stream.Reader(conn)
        loaded, self.source_times = read_stream(
            reader, self.machine.memory.blocks, self.manager.layout(), self.machine, self.stats
        )
        self.stats.transferred = reader.bytes
        self.received_ns = time.monotonic_ns()
        return loaded

    # --- main thread -------------------------------------------------------------------
    def _complete(self, loaded: machine_state.Loaded) -> None:
        m, control = self.machine, self.machine.control
        taken = self._take_over(loaded)
        if taken is not None:  # the guest ran on in the old image's keeper: its state is newer than the file's
            loaded = replace(loaded, vcpus=taken.vcpus, vm=taken.vm, devices=[])  # the devices are loaded
        machine_state.apply(m, loaded)
        m.devices.cpr_resume()  # assigned devices' DMA mappings: this process's addresses from now on
        m.devices.bind_irqfds()  # a CPR source let go of them when it stopped
        loaded_ns = time.monotonic_ns()
        self.stats.end = time.monotonic()
        self.manager.set_status(self, "completed")
        if loaded.runstate == runstate.RUNNING:
            if control.autostart:
                control.vm_start()
            else:
                control.set_state(runstate.PAUSED)
        else:
            control.set_state(loaded.runstate)
        self._timeline(loaded_ns, time.monotonic_ns())
        if taken is not None:
            from minivmm.cpr import keeper

            keeper.after(m, taken, self.manager.cpr_state.table)
        self.manager.cpr_state = None  # the next update starts from this table

    def _take_over(self, loaded: machine_state.Loaded):
        """A cpr-exec whose old image left its vCPUs running in the keeper (cpr/keeper.py): the file's
        device state loaded first (what the writes the keeper logged, and the accesses it left
        waiting, act on, in the order the guest made them), then the vCPUs stopped and their state
        read; None otherwise."""
        cpr = self.manager.cpr_state
        fd = cpr.table.find(*fdtable.KEEPER) if cpr is not None else -1
        if fd < 0:
            return None  # before the import: the keeper and its C module cost a cpr-transfer ~9 ms here
        from minivmm.cpr import keeper

        machine_state.apply_devices(self.machine, loaded)
        self.take_ns = time.monotonic_ns()
        return keeper.take_over(self.machine, fd)

    def _timeline(self, loaded: int, resumed: int) -> None:
        """Phase times (ms) from the source's timestamps and ours, on one CLOCK_MONOTONIC."""
        cpr = self.manager.cpr_state
        t = {**self.source_times, **(cpr.times if cpr is not None else {})}
        if "stop" not in t or "saved" not in t:
            return
        marks = [("stop", t["stop"], t.get("stopped")), ("save", t.get("stopped"), t["saved"])]
        if "kept" in t:  # the guest ran in the keeper from "kept" until this image took it over
            marks += [
                ("keep", t["saved"], t["kept"]),
                ("exec", t["exec"], self.manager.start_ns),
                ("start-up", self.manager.start_ns, self.take_ns),
                ("take-over", self.take_ns, loaded),
            ]
            paused = (t["kept"] - t["stop"]) + (resumed - self.take_ns)
        elif "exec" in t:  # the same process: exec, then this image's start-up and load
            marks += [("exec", t["exec"], self.manager.start_ns), ("load", self.manager.start_ns, loaded)]
            paused = resumed - t["stop"]
        else:  # another process: the stream's way here, then the load
            marks += [("hand-over", t["saved"], self.received_ns), ("load", self.received_ns, loaded)]
            paused = resumed - t["stop"]
        marks.append(("resume", loaded, resumed))
        self.stats.phases = {name: (b - a) / 1e6 for name, a, b in marks if a is not None and b is not None}
        self.stats.downtime_ms = paused / 1e6

    def _fail(self, text: str) -> None:
        from minivmm.cpr.incoming import fail_line

        self.error = text
        self.manager.set_status(self, "failed")
        where = f"-incoming {self.addr.describe()}"
        line = fail_line(f"{self.addr.describe()}: load of migration failed: {text}", self.manager.cpr_state, where)
        self.machine.control.request_shutdown("host-error", 1, line, force=True)


def read_stream(
    reader: stream.Reader, local: list, layout: list[stream.Placement], machine, stats: Stats | None = None
) -> tuple[machine_state.Loaded, dict[str, int]]:
    """A whole stream: RAM into ``local``'s blocks, the machine state decoded and checked
    for ``machine`` (not applied), and the source's timestamps. Raises StreamError or
    VMStateError for anything wrong with the bytes."""
    try:
        return _read_stream(reader, local, layout, machine, stats)
    finally:
        reader.close()


def _read_stream(reader, local, layout, machine, stats) -> tuple[machine_state.Loaded, dict[str, int]]:
    infos, got_layout = reader.header()
    blocks = match_blocks(local, infos)
    if got_layout != layout:
        raise stream.StreamError("guest-physical RAM layout differs: the source machine was set up differently")
    if stats is not None:
        stats.setup_end = time.monotonic()
    loaded, times = None, {}
    while True:
        kind = reader.next_record()
        if kind == stream.REC_PAGES:
            n = reader.pages_into(blocks)
            if stats is not None:
                stats.normal_pages += n // stream.PAGE_SIZE
        elif kind == stream.REC_STATE:
            if loaded is not None:
                raise stream.StreamError("two device states in one migration stream")
            loaded = machine_state.decode_all(machine, reader.state())
        elif kind == stream.REC_TIMES:
            times = reader.times()
        elif kind == stream.REC_END:
            reader.end()
            if loaded is None:
                raise stream.StreamError("migration stream ended without the device state")
            return loaded, times
        else:
            raise stream.StreamError(f"unknown record type {kind} in the migration stream")


def match_blocks(local: list, infos: list[stream.BlockInfo]) -> list:
    """The local block for each of the stream's, checked by name and size (QEMU's wording)."""
    by_name = {b.name: b for b in local}
    for info in infos:
        block = by_name.get(info.name)
        if block is None:
            raise stream.StreamError(f'Unknown ramblock "{info.name}", cannot accept migration')
        if block.size != info.size:
            raise stream.StreamError(f"Length mismatch: {info.name}: {info.size:#x} in != {block.size:#x}")
    missing = set(by_name) - {i.name for i in infos}
    if missing:
        raise stream.StreamError(f"RAM block '{sorted(missing)[0]}' is not in the migration stream")
    return [by_name[i.name] for i in infos]

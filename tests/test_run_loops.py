"""The two vCPU loops on real KVM with real guests: the C loop (kvm/runloop.c)
and the Python reference loop (-accel kvm,x-run-loop=c|python) must give the
same guest-visible results; the C loop's contract with Python (which exits
it keeps, how it stops); the fallback when the C loop is not built; and the
CMOS index port's coalesced writes."""

from __future__ import annotations

import ctypes
import errno
import subprocess
import sys
import threading
import time

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, guest, wait_for
from minivmm.config import ChardevConfig, MachineConfig
from minivmm.kvm import constants as c
from minivmm.kvm import runloop
from minivmm.machine import Machine
from minivmm.vmstate import StateWriter, decode, read_blob

needs_c = pytest.mark.skipif(runloop.UNAVAILABLE is not None, reason=str(runloop.UNAVAILABLE))
LOOPS = [pytest.param("c", marks=needs_c), "python"]
PORT_POST = 0x80


def accel(loop: str) -> list[str]:
    return ["-accel", f"kvm,x-run-loop={loop}"]


@pytest.fixture
def machines(tmp_path):
    made: list[Machine] = []

    def make(**kw) -> Machine:
        m = Machine(MachineConfig(serials=[ChardevConfig("serial0", "null")], **kw))
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _bench(machines, loop: str) -> Machine:
    """The long64 guest's exit benchmark (``out %al, $0x80`` forever), started and running."""
    m = machines(kernel=guest("long64.elf"), append="bench", run_loop=loop)
    m.start()
    wait_for(lambda: _postcode(m).count > 1000, what="the bench loop to start")
    return m


def _postcode(m: Machine):
    return next(d for d in m.devices.devices() if d.name == "post-code")


# --- the same guest-visible results -------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_long_mode_guest_prints_and_exits_the_same(vmm, loop):
    r = vmm.run("-kernel", guest("long64.elf"), "-append", "hello", *DEBUG_EXIT, *accel(loop), timeout=30)
    assert r.status == GUEST_EXIT_OK, r
    assert "long64: hello from 64-bit long mode" in r.stdout
    assert "long64: mmio=ffffffff port=ff" in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize("loop", LOOPS)
def test_real_mode_guest_reads_cmos_through_the_coalesced_index_port(vmm, loop):
    r = vmm.run("-bios", guest("hello16.bin"), "-m", "512M", *DEBUG_EXIT, *accel(loop))
    assert r.status == GUEST_EXIT_OK, r
    assert r.stdout == "hello16: hello from real mode\nhello16: cmos ext16m=1f00\n"


@pytest.mark.parametrize("loop", LOOPS)
def test_traced_post_codes_go_through_python_with_either_loop(vmm, loop):
    r = vmm.run("-kernel", guest("hello32.elf"), "-d", "postcode", "-serial", "null", *DEBUG_EXIT, *accel(loop))
    assert r.status == GUEST_EXIT_OK
    assert [line.split()[3] for line in r.stderr.splitlines()] == ["0x32", "0x33"]


@pytest.mark.parametrize("loop", LOOPS)
def test_post_codes_are_counted_exit_for_exit_and_pauses_are_prompt(machines, loop):
    m = _bench(machines, loop)
    thread, postcode = m.vcpus[0], _postcode(m)
    last = None
    for _ in range(5):
        t0 = time.monotonic()
        m.control.vm_stop()
        assert time.monotonic() - t0 < 2 and thread.paused
        exits, count = thread.exits, postcode.count
        assert last in (None, postcode.last)
        last = postcode.last
        m.control.vm_start()
        wait_for(lambda c0=count: postcode.count > c0 + 1000, what="more post codes")
    m.control.vm_stop()
    assert postcode.count - count == thread.exits - exits  # every exit of the bench loop is one post code
    assert postcode.read(0, 1) == last
    w = StateWriter()
    w.add(postcode.vmstate, postcode.save_state())
    (section,) = read_blob(w.blob())  # what migration sends: the same fields as before the C loop
    state = decode(postcode.vmstate, section.payload, section.version, section.path)
    assert state == {"last": last, "count": postcode.count}


@needs_c
def test_both_loops_leave_the_same_post_code(machines):
    values = []
    for loop in ("c", "python"):
        m = _bench(machines, loop)
        m.control.vm_stop()
        values.append((_postcode(m).last, _postcode(m).count > 0))
    assert values[0] == values[1]


# --- the C loop's contract ------------------------------------------------------------


def _drive(m: Machine, prepare, stop_after: float | None = None) -> tuple[int, int, int]:
    """One call of vCPU 0's C loop from this thread, the vCPU thread paused: (return, errno, hot exits)."""
    thread = m.vcpus[0]
    m.control.vm_stop()
    run = thread.vcpu.run
    run.immediate_exit = 0
    prepare(thread.runloop, run)
    view = memoryview(thread.vcpu.run_mmap)
    try:
        enter = thread.runloop.enter(view)
        timer = None
        if stop_after is not None:  # what a pause request does, less the signal: KVM_RUN is entered again
            timer = threading.Timer(stop_after, lambda: setattr(run, "immediate_exit", 1))
            timer.start()
        ret = enter()
        err = thread.runloop.errno() if ret < 0 else 0
        if timer is not None:
            timer.join()
        return ret, err, thread.runloop.leave()
    finally:
        view.release()
        thread.runloop.hot = True
        run.request_interrupt_window = 0
        run.immediate_exit = 0


@needs_c
def test_c_loop_keeps_latch_writes_until_a_pause_stops_it(machines):
    m = _bench(machines, "c")
    postcode = _postcode(m)
    before = []
    ret, err, hot = _drive(m, lambda loop, run: before.append(postcode.count), stop_after=0.3)
    assert (ret, err) == (-1, errno.EINTR)
    assert hot > 100 and postcode.count - before[0] == hot


@needs_c
@pytest.mark.parametrize("how", ["hot off", "interrupt window"])
def test_c_loop_returns_every_exit_when_python_asks(machines, how):
    m = _bench(machines, "c")
    before = []

    def prepare(loop, run):
        before.append(_postcode(m).count)
        if how == "hot off":
            loop.hot = False
        else:
            run.request_interrupt_window = 1  # ignored by the in-kernel irqchip: the exit is still the OUT

    ret, err, hot = _drive(m, prepare, stop_after=None)
    run = m.vcpus[0].vcpu.run
    assert (ret, hot) == (0, 0)
    assert (run.exit_reason, run.exit.io.direction, run.exit.io.port) == (c.KVM_EXIT_IO, c.KVM_EXIT_IO_OUT, PORT_POST)
    assert _postcode(m).count == before[0]  # left to Python, which handles it on its next pass


@needs_c
def test_the_latch_python_writes_is_the_struct_c_writes():
    ffi = runloop.ffi
    assert ctypes.sizeof(runloop.Latch) == ffi.sizeof("struct minivmm_latch")
    assert runloop.Latch.last.offset == ffi.offsetof("struct minivmm_latch", "last")
    assert runloop.Latch.count.offset == ffi.offsetof("struct minivmm_latch", "count")


# --- choosing the loop, and the fallback ---------------------------------------------------

# The compiled module made unimportable, as where it was never built (Python's own switch).
_WITHOUT_C = "import sys; sys.modules['minivmm.kvm._runloop'] = None; from minivmm.__main__ import main; main()"


def _run_without_c(tmp_path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", _WITHOUT_C, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, start_new_session=True)


def test_without_the_c_loop_minivmm_says_so_once_and_runs_the_python_loop(tmp_path):
    r = _run_without_c(tmp_path, "-kernel", guest("long64.elf"), "-smp", "2", *DEBUG_EXIT)
    assert r.returncode == GUEST_EXIT_OK, r
    assert "long64: hello from 64-bit long mode" in r.stdout
    notes = [line for line in r.stderr.splitlines() if "C run loop" in line]
    assert len(notes) == 1, r.stderr
    assert notes[0].startswith("minivmm: the C run loop is not built (")
    assert notes[0].endswith("): using the Python loop")


def test_the_python_loop_chosen_needs_no_c_and_no_message(tmp_path):
    r = _run_without_c(tmp_path, "-kernel", guest("long64.elf"), *DEBUG_EXIT, *accel("python"))
    assert r.returncode == GUEST_EXIT_OK, r
    assert r.stderr == ""


def test_the_c_loop_chosen_but_not_built_is_an_error(tmp_path):
    r = _run_without_c(tmp_path, "-kernel", guest("long64.elf"), *DEBUG_EXIT, *accel("c"))
    assert r.returncode == 1
    assert r.stderr.startswith("minivmm: -accel kvm,x-run-loop=c: the C run loop is not built (")


def test_a_loop_minivmm_does_not_have_is_refused(vmm):
    r = vmm.run(*accel("asm"))
    assert r.status == 1
    assert "Parameter 'x-run-loop' does not accept value 'asm'" in r.stderr


# --- the CMOS index port's coalesced writes -----------------------------------------------------


def _index_then_spin_bios(tmp_path, index: int) -> str:
    """64 KiB of firmware whose reset vector writes ``index`` to port 0x70 and spins (no exit after)."""
    code = bytes([0xB0, index, 0xE6, 0x70, 0xEB, 0xFE])  # mov $index, %al; out %al, $0x70; jmp .
    path = tmp_path / "index.bin"
    path.write_bytes(b"\xf4" * 0xFFF0 + code.ljust(16, b"\xf4"))
    return str(path)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_queued_index_write_is_replayed_before_the_rtc_is_saved(machines, tmp_path, loop):
    m = machines(bios=_index_then_spin_bios(tmp_path, 0x0B), run_loop=loop)
    if m.devices.coalesced is None:
        pytest.skip("this KVM has no KVM_CAP_COALESCED_PIO: index writes exit")
    rtc = m.devices.rtc
    m.start()
    time.sleep(0.5)
    m.control.vm_stop()
    assert rtc.s.index == 0  # the write waits in the ring: no exit took it to the device
    assert rtc.save_state().index == 0x0B
    assert rtc.s.index == 0x0B

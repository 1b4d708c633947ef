"""Pausing and resuming vCPUs from another thread while the guest runs at
native speed, and starting paused (-S). In-process: the test drives the
Machine API the monitor will use, and watches guest RAM through the memfd."""

from __future__ import annotations

import time

import pytest

from conftest import guest, wait_for
from minivmm.config import ChardevConfig, MachineConfig
from minivmm.guests.abwalk import check_invariant, read_status
from minivmm.kvm import runloop
from minivmm.machine import Machine

needs_c = pytest.mark.skipif(runloop.UNAVAILABLE is not None, reason=str(runloop.UNAVAILABLE))


@pytest.fixture(params=[pytest.param("c", marks=needs_c), "python"])
def machines(tmp_path, request):
    """Machines running the C loop or the Python loop: pausing must work the same."""
    made: list[Machine] = []

    def make(**kw) -> Machine:
        serial = ChardevConfig("serial0", "file", path=str(tmp_path / f"serial{len(made)}.log"))
        m = Machine(MachineConfig(serials=[serial], run_loop=request.param, **kw))
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _walker(machines, **kw) -> tuple[Machine, int]:
    m = machines(kernel=guest("abwalk.elf"), ram_size=64 << 20, aux_ram_share=True, **kw)
    return m, m.memory.block("pc.ram").fd


def test_pause_stops_guest_ram_and_resume_restarts_it(machines):
    m, fd = _walker(machines, smp=2)  # vcpu1 waits for a SIPI inside KVM_RUN: it must be kicked too
    m.start()
    first = wait_for(lambda: (s := read_status(fd)) and s.passes > 2 and s, what="the walker to run")
    for _ in range(3):
        m.control.vm_stop()
        assert m.runstate == "paused"
        frozen = read_status(fd)
        time.sleep(0.2)
        assert read_status(fd) == frozen  # not one more byte walked
        assert check_invariant(fd, 64 << 20) == (64 - 2) * 256
        m.control.vm_start()
        wait_for(lambda f=frozen: read_status(fd).passes > f.passes, what="the walker to go on")
    assert read_status(fd).passes > first.passes


def test_many_quick_pauses_never_hang(machines):
    m, fd = _walker(machines)
    m.start()
    wait_for(lambda: read_status(fd), what="the walker to start")
    for _ in range(50):
        m.control.vm_stop()
        m.control.vm_start()
    m.control.vm_stop()
    assert all(t.paused for t in m.vcpus)


def test_start_paused_runs_nothing_until_resumed(machines, tmp_path):
    m, fd = _walker(machines, start_paused=True)
    m.start()
    time.sleep(0.3)
    assert m.runstate == "prelaunch"
    assert read_status(fd) is None
    assert (tmp_path / "serial0.log").read_bytes() == b""
    m.control.vm_start()
    wait_for(lambda: (tmp_path / "serial0.log").read_bytes().startswith(b"A"), what="the walker's A")

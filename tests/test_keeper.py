"""The cpr-exec keeper (cpr/keeper.py, kvm/keeper.c), in-process on real KVM: the guest runs in
the keeper's tasks while the VMM's own vCPU threads are parked, and comes back to them. The whole
update through it (exec, take-over in the new image) is in test_cpr.py and test_vfio_user_pci.py."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import guest, still_walking, walking
from minivmm.config import ChardevConfig, MachineConfig
from minivmm.cpr import keeper
from minivmm.guests.abwalk import read_status
from minivmm.kvm import runloop
from minivmm.machine import Machine

pytestmark = pytest.mark.skipif(runloop.lib is None, reason=f"{runloop.UNAVAILABLE}")


@pytest.fixture
def machine():
    made: list[Machine] = []

    def make(serial: ChardevConfig | None = None, **kw) -> Machine:
        serial = serial or ChardevConfig("serial0", "null")
        m = Machine(MachineConfig(kernel=guest("abwalk.elf"), ram_size=64 << 20, serials=[serial], **kw))
        threading.Thread(target=m.loop.run, daemon=True).start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.loop.stop()
        m.close()


def _frozen(fd: int) -> bool:
    before = read_status(fd).passes
    time.sleep(0.2)
    return read_status(fd).passes == before


def test_the_guest_runs_in_the_keeper_and_comes_back_to_the_vcpu_threads(machine):
    m = machine(aux_ram_share=True)
    fd = m.memory.blocks[0].fd
    assert keeper.unusable(m) is None
    m.start()
    walking(fd)
    m.control.vm_stop()
    assert _frozen(fd)
    block = keeper.prepare(m)
    assert m.fds.find(*keeper.ENTRY) == block  # it goes through the exec with the other fds
    keeper.start(block, m)
    still_walking(fd)  # the guest walks, and not in the VMM's threads: they are parked
    assert all(t.paused for t in m.vcpus)
    keeper.take_back(m, block)  # as after a failed exec
    assert m.fds.find(*keeper.ENTRY) < 0
    assert _frozen(fd)  # stopped until the VMM resumes it
    m.control.vm_start()
    still_walking(fd, by=2)


@pytest.mark.parametrize("spoiled", [False, True])
def test_an_idle_uarts_line_status_is_answered_in_the_keeper(machine, tmp_path, monkeypatch, spoiled):
    """The walker prints a "B" every pass (every=1), reading the UART's line status before each: the
    old image answers that read in advance (idle: 0x60) and the keeper answers it, so the guest walks
    on through the keeper instead of waiting for the VMM at its first print. With a rule that any
    write to THR spoils the answer, the first "B" spoils it and the next read waits for the VMM: the
    guest stops. Either way the "B"s go into the keeper's log; taken back, the log is played on the
    devices and a waiting read done, in order: every pass's "B" is there once, none lost, none twice."""
    from minivmm.arch.x86 import layout
    from minivmm.devices import serial
    from minivmm.devices.device import StableRead

    if spoiled:
        rule = [StableRead(serial.LSR, 1, 0x60, serial.RBR_THR_DLL, 0xFF)]
        monkeypatch.setattr(serial.Serial, "stable_reads", lambda self: rule)
    log = tmp_path / "serial.log"
    m = machine(ChardevConfig("serial0", "file", path=str(log)), aux_ram_share=True, append="every=1")
    fd = m.memory.blocks[0].fd
    m.start()
    walking(fd, more_than=3)
    m.control.vm_stop()
    com1 = layout.COM_PORTS[0][0]
    if not spoiled:
        assert keeper.stable_reads(m) == [(com1 + serial.LSR, 1, 0x60, com1 + serial.MCR, serial.MCR_LOOP)]
    block = keeper.prepare(m)
    keeper.start(block, m)
    if spoiled:
        time.sleep(0.2)
        assert _frozen(fd)  # parked at the second status read
    else:
        still_walking(fd, by=20)  # prints and all, in the keeper
    keeper.take_back(m, block)
    m.control.vm_start()
    still_walking(fd, by=3)
    m.control.vm_stop()
    time.sleep(0.1)
    passes = read_status(fd).passes
    printed = log.read_text().count("B")
    assert passes - 1 <= printed <= passes, (passes, printed)  # each once, the answered ones too


def test_a_machine_the_keeper_cannot_serve_says_why(machine):
    m = machine(kernel_irqchip="split")
    assert "kernel-irqchip=split" in keeper.unusable(m)

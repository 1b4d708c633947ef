"""The vCPU's explicit lifecycle and its saved state, in-process on real KVM:
the thread's states as other threads see them, the typed exit of a guest that
cannot go on, and the TSC frequency restored or refused on load."""

from __future__ import annotations

import fcntl
import threading
import time

import pytest

from conftest import guest, wait_for
from minivmm.arch.x86 import vcpu_state
from minivmm.config import ChardevConfig, MachineConfig
from minivmm.kvm import ioctls
from minivmm.machine import Machine
from minivmm.migration import machine_state
from minivmm.vcpu import ExitKind, VcpuRunState
from minivmm.vmstate import StateWriter, VMStateError, decode, read_blob


@pytest.fixture
def machine(tmp_path):
    made: list[Machine] = []

    def make(**kw) -> Machine:
        serial = ChardevConfig("serial0", "file", path=str(tmp_path / f"serial{len(made)}.log"))
        made.append(Machine(MachineConfig(kernel=guest("abwalk.elf"), ram_size=64 << 20, serials=[serial], **kw)))
        return made[-1]

    yield make
    for m in made:
        m.close()


def _states(m: Machine) -> set[VcpuRunState]:
    return {t.state for t in m.vcpus}


def test_a_vcpu_goes_through_its_states_as_asked(machine):
    m = machine(smp=2, start_paused=True)
    assert _states(m) == {VcpuRunState.CREATED}
    m.start()
    wait_for(lambda: _states(m) == {VcpuRunState.PAUSED}, what="the threads to park")
    m.control.vm_start()
    wait_for(lambda: _states(m) == {VcpuRunState.RUNNING}, what="the vCPUs to run")
    m.control.vm_stop()
    assert _states(m) == {VcpuRunState.PAUSED}  # vm_stop returns once every vCPU is out of KVM_RUN
    m.vcpus.close()
    assert _states(m) == {VcpuRunState.QUIT} and not any(t.thread.is_alive() for t in m.vcpus)


def test_a_guest_that_cannot_go_on_reports_a_typed_exit(tmp_path):
    serial = ChardevConfig("serial0", "null")
    m = Machine(MachineConfig(kernel=guest("long64.elf"), append="fault", serials=[serial], no_reboot=True))
    seen = []
    for t in m.vcpus:
        t.on_exit = lambda thread, why: seen.append(why)  # instead of the run-state controller
    try:
        m.start()
        wait_for(lambda: seen, what="the triple fault")
        assert seen[0].kind == ExitKind.TRIPLE_FAULT and "triple fault" in seen[0].message
        assert m.vcpus[0].thread.is_alive() and m.vcpus[0].wait_paused(5)  # parked, not dead
    finally:
        m.close()


def _with_tsc(blob: bytes, khz: int) -> bytes:
    """The same machine state with vcpu[0]'s saved TSC frequency changed (checksums made anew)."""
    w = StateWriter()
    for sec in read_blob(blob):
        if sec.name == "vcpu" and sec.instance == 0:
            st = decode(vcpu_state.VMSTATE, sec.payload, sec.version, sec.path)
            st.tsc_khz = khz
            w.add(vcpu_state.VMSTATE, st, 0)
        else:
            w.sections.append(sec)
    return w.blob()


def test_tsc_frequency_is_set_where_kvm_scales_it_and_refused_where_it_cannot(machine):
    m = machine()
    m.start()
    m.control.vm_stop()
    caps = m.vcpus.caps
    assert caps.tsc_khz > 0 and m.vcpus[0].vcpu.get_tsc_khz() == caps.tsc_khz
    blob = machine_state.save(m, "paused")
    machine_state.apply(m, machine_state.decode_all(m, _with_tsc(blob, caps.tsc_khz + 1)))  # within 250 ppm
    other = caps.tsc_khz * 2
    if caps.tsc_scaling:
        machine_state.apply(m, machine_state.decode_all(m, _with_tsc(blob, other)))
        assert m.vcpus[0].vcpu.get_tsc_khz() == other
    else:  # this host (e.g. the paravirtual KVM of the build machines) cannot scale the TSC
        with pytest.raises(VMStateError, match=r"vcpu\[0\]/tsc_khz: TSC frequency mismatch between the saved VM"):
            machine_state.decode_all(m, _with_tsc(blob, other))


def test_tsc_problem_rules():
    caps = vcpu_state.StateCaps(xsave_size=0, xcrs=False, msr_indices=(), tsc_khz=2_000_000)
    assert vcpu_state.tsc_problem(0, caps) is None  # a state that did not record it
    assert vcpu_state.tsc_problem(2_000_500, caps) is None  # 250 ppm: the same clock
    assert "mismatch" in vcpu_state.tsc_problem(2_000_501, caps)
    scaling = vcpu_state.StateCaps(0, False, (), tsc_khz=2_000_000, tsc_scaling=True)
    assert vcpu_state.tsc_problem(3_000_000, scaling) is None


def test_an_extint_kvm_holds_at_the_pause_is_in_the_saved_state(tmp_path):
    """kernel-irqchip=split: a vector handed to KVM (KVM_INTERRUPT) that the guest has not taken
    when the vCPUs stop is held by KVM outside what KVM_GET_VCPU_EVENTS reports. The saved state
    carries it, and the machine that loads it delivers it: without it the PIC's IRQ 0 would stay
    in service in the new machine and the guest's timer would never tick again."""
    made: list[Machine] = []

    def make(name: str, **kw) -> Machine:
        serial = ChardevConfig("serial0", "file", path=str(tmp_path / f"{name}.log"))
        split = {"kernel_irqchip": "split", "append": "pit 1000"}
        cfg = MachineConfig(kernel=guest("timer.elf"), serials=[serial], **split, **kw)
        made.append(Machine(cfg))
        threading.Thread(target=made[-1].loop.run, daemon=True).start()  # the PIT's timers
        return made[-1]

    try:
        src = make("src")
        src.start()
        boot = src.vcpus[0]

        def ready() -> bool:
            run = boot.vcpu.run
            return bool(src.irqchip.pic.output and run.ready_for_interrupt_injection and run.if_flag)

        for _ in range(200):  # stop it where the vCPU thread would hand the PIC's vector over
            src.control.vm_stop()
            if ready():
                break
            src.control.vm_start()
            time.sleep(0.002)
        else:
            pytest.fail("the guest never stopped ready for an interrupt with one pending")
        # The race, made certain: the vCPU thread's injection before KVM_RUN, then a KVM_RUN that a
        # pause request arriving in between makes return at once (immediate_exit), guest not entered.
        src.irqchip._inject_extint(boot)
        boot.vcpu.run.immediate_exit = 1
        with pytest.raises(InterruptedError):
            fcntl.ioctl(boot.vcpu.fd, ioctls.KVM_RUN, 0)
        assert not boot.vcpu.run.ready_for_interrupt_injection  # KVM holds the vector
        vector = src.irqchip.held_extint(boot)
        assert vector == src.irqchip.pic.s.chips[0].irq_base  # IRQ 0, in service in the PIC
        blob = machine_state.save(src, "running")
        [sec] = [s for s in read_blob(blob) if s.name == "vcpu"]
        assert decode(vcpu_state.VMSTATE, sec.payload, sec.version, sec.path).extint == vector

        dst = make("dst", start_paused=True)
        machine_state.apply(dst, machine_state.decode_all(dst, blob))
        dst.start()
        dst.control.vm_start()
        wait_for(lambda: "ticks=1000" in (tmp_path / "dst.log").read_text(), what="the loaded guest to finish counting")
    finally:
        for m in made:
            m.loop.stop()
            m.close()

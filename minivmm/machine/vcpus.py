"""The vCPU manager: creating the vCPUs in KVM's order, their threads, and
pausing and resuming them together or one at a time.

Creation order matters to KVM: CPUID before any MSR, MSRs, then the LAPIC
(LVT0 ExtINT and LVT1 NMI, as a PC's firmware leaves them). Each vCPU's
state right after creation is kept: a reset restores it.

Each thread runs the C loop (kvm/runloop.py) when it is built, with the
devices that offer a latch handled in C, or the Python loop, chosen with
``-accel kvm,x-run-loop=c|python``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from minivmm.arch.x86 import cpuid, msr, vcpu_state
from minivmm.devices.bus import Bus
from minivmm.kvm import constants as c
from minivmm.kvm import runloop
from minivmm.kvm.system import Kvm, Vcpu, Vm
from minivmm.vcpu import VcpuExit, VcpuThread, install_kick_handler

from .errors import MachineError

APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x700, 0x400
_fallback_told = False  # the Python loop instead of an unbuilt C loop is said once per process


def use_c_loop(choice: str | None, warn: Callable[[str], None]) -> bool:
    """Whether the vCPUs run the C loop: ``choice`` is -accel kvm,x-run-loop= (None: C when built)."""
    global _fallback_told
    if choice == "python":
        return False
    if runloop.UNAVAILABLE is None:
        return True
    if choice == "c":
        raise MachineError("-accel kvm,x-run-loop=c", runloop.UNAVAILABLE)
    if not _fallback_told:
        _fallback_told = True
        warn(f"{runloop.UNAVAILABLE}: using the Python loop")
    return False


class VcpuManager:
    def __init__(self) -> None:
        self.threads: list[VcpuThread] = []
        self.initial_states: list[vcpu_state.VcpuState] = []
        self.caps: vcpu_state.StateCaps | None = None  # what this host saves, decided on the first vCPU
        self.cpuid = None

    def __iter__(self) -> Iterator[VcpuThread]:
        return iter(self.threads)

    def __len__(self) -> int:
        return len(self.threads)

    def __getitem__(self, index: int) -> VcpuThread:
        return self.threads[index]

    def create(
        self,
        kvm: Kvm,
        vm: Vm,
        count: int,
        model: cpuid.CpuModel,
        buses: tuple[Bus, Bus],
        on_exit: Callable[[VcpuThread, VcpuExit], None],
        describe: Callable[[VcpuThread], str],
        warn: Callable[[str], None],
        run_loop: str | None = None,
    ) -> None:
        """All vCPUs, before the first KVM_RUN (APs then wait for INIT/SIPI in the in-kernel LAPIC)."""
        c_loop = use_c_loop(run_loop, warn)
        pio = buses[0]
        latches = [(r.base, r.device.latch) for r in pio.ranges if r.length == 1 and r.device.latch is not None]
        self.cpuid = model.apply(kvm.supported_cpuid(), warn=warn)
        xsave2 = kvm.check_extension(c.KVM_CAP_XSAVE2)
        for index in range(count):
            vcpu = vm.create_vcpu(index)
            vcpu.set_cpuid2(cpuid.for_vcpu(self.cpuid, index, count))
            vcpu.set_msrs(msr.boot_msrs())
            if self.caps is None:
                self.caps = vcpu_state.StateCaps(
                    xsave_size=xsave2 or (4096 if kvm.check_extension(c.KVM_CAP_XSAVE) else 0),
                    xcrs=bool(kvm.check_extension(c.KVM_CAP_XCRS)),
                    msr_indices=vcpu_state.readable_msrs(vcpu, kvm.msr_index_list()),
                    tsc_khz=vcpu.get_tsc_khz(),
                    tsc_scaling=bool(kvm.check_extension(c.KVM_CAP_TSC_CONTROL)),
                )
            lapic = vcpu.get_lapic()
            regs = bytearray(lapic.regs)
            regs[APIC_LVT0 : APIC_LVT0 + 4] = APIC_MODE_EXTINT.to_bytes(4, "little")
            regs[APIC_LVT1 : APIC_LVT1 + 4] = APIC_MODE_NMI.to_bytes(4, "little")
            lapic.regs = bytes(regs)
            vcpu.set_lapic(lapic)
            self.initial_states.append(vcpu_state.save(vcpu, self.caps))
            loop = None
            if c_loop:
                loop = runloop.RunLoop(vcpu.fd)
                for port, latch in latches:
                    loop.add_latch(port, latch)
            self.threads.append(VcpuThread(vcpu, *buses, on_exit, describe, loop))

    def start(self) -> None:
        """Start the threads, paused (once)."""
        if not self.threads or self.threads[0].thread.is_alive():
            return
        install_kick_handler()
        for t in self.threads:
            t.start()

    def hold_all(self) -> None:
        """Ask every vCPU to leave KVM_RUN, without waiting (any thread: a request is pending)."""
        for t in self.threads:
            t.request_pause()

    def pause_all(self) -> None:
        self.hold_all()
        for t in self.threads:
            t.wait_paused()

    def resume_all(self) -> None:
        for t in self.threads:
            t.resume()

    @contextmanager
    def paused(self, index: int, resume: Callable[[], bool]) -> Iterator[Vcpu]:
        """One vCPU held out of KVM_RUN, so its state can be read or changed; resumed after if ``resume()``."""
        thread = self.threads[index]
        thread.request_pause()
        thread.wait_paused()
        try:
            yield thread.vcpu
        finally:
            if resume():
                thread.resume()

    def restore_initial(self) -> None:
        """Power-on state for every vCPU (paused)."""
        for t, state in zip(self.threads, self.initial_states):
            vcpu_state.restore(t.vcpu, state, self.caps)

    def close(self) -> None:
        for t in self.threads:
            t.quit()
        for t in self.threads:
            t.vcpu.close()

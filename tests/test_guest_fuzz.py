"""A hostile guest (guests/portfuzz.S): pseudo-random 8/16/32-bit port reads
and writes to every emulated device (and any port), and MMIO to unassigned
addresses, at CPL3 under real KVM; then it proves the machine still works
(COM1 prints, CMOS RAM keeps a byte) and exits through isa-debug-exit.
Each run must print its seed's report, exit with status 33 and say nothing
about an internal error: an exception in a device model would park the VM
in internal-error naming the access. -no-reboot everywhere: a reset would
replay the same seed forever, so it must show as an early exit instead."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, wait_for

sys.path.insert(0, str(REPO / "tools"))
import fuzz as fz  # noqa: E402

OPS = 20000


def _check(status, log: str, stderr: str, seed: int, ops: int = OPS) -> None:
    problem = fz.GuestRun(status, log, stderr).problem(seed, ops)
    assert problem is None, problem


@pytest.mark.parametrize(
    "seed,smp",
    [(0x1F, 1), (0x5CD0, 1), (0x20DE2, 2), (0xDEADBEEFCAFEF00D, 1)],
    ids=["seed-1f", "seed-5cd0-reset-replay", "seed-20de2-pvpanic-smp2", "seed-64bit"],
)
def test_portfuzz_survives(vmm, tmp_path, seed, smp):
    """5cd0 once did a 32-bit out to 0xfffe (a #GP under PVM, a reset, the same seed again
    forever); 20de2 once wrote pvpanic's 'panicked' bit (exit 0). Both now stay clear."""
    log = tmp_path / "log"
    r = vmm.run(*fz.portfuzz_args(seed, OPS, log, smp), timeout=60)
    _check(r.status, log.read_text(errors="replace"), r.stderr, seed)


@pytest.mark.parametrize("seed,smp", [(0x1F, 1), (0x77, 2)])
def test_portfuzz_survives_with_a_split_irqchip(vmm, tmp_path, seed, smp):
    """minivmm's own PIC, PIT (ports 0x40-0x43, 0x61) and IOAPIC registers, fuzzed."""
    log = tmp_path / "log"
    r = vmm.run(*fz.portfuzz_args(seed, OPS, log, smp, split=True), timeout=60)
    _check(r.status, log.read_text(errors="replace"), r.stderr, seed)


@pytest.mark.parametrize("split", [False, True], ids=["kernel-irqchip", "split"])
def test_portfuzz_survives_on_q35(vmm, tmp_path, split):
    """The q35 machine's PCI functions through 0xcf8/0xcfc: the MCH's PCIEXBAR (the ECAM window
    moved, shrunk or switched off at random) and the LPC."""
    log = tmp_path / "log"
    r = vmm.run(*fz.portfuzz_args(0x1F, OPS, log, split=split, machine="q35"), timeout=60)
    _check(r.status, log.read_text(errors="replace"), r.stderr, 0x1F)


@pytest.mark.parametrize("seed", [0x1F, 0x10D0])
def test_portfuzz_survives_the_intel_iommu_registers(vmm, tmp_path, seed):
    """Random RTADDR, IQA, IQT and IRTA values and GCMD commands: translation, queued invalidation
    and interrupt remapping switched on over whatever memory (or none) they name, with the IOAPIC's
    routes translated through random tables; every bad address a recorded fault or an IQE."""
    log = tmp_path / "log"
    r = vmm.run(*fz.portfuzz_args(seed, OPS, log, split=True, machine="q35", iommu=True), timeout=60)
    _check(r.status, log.read_text(errors="replace"), r.stderr, seed)


def test_portfuzz_with_a_monitor_stays_running(qmp_vm, tmp_path):
    seed, ops = 0x7BBF, 150000
    log = tmp_path / "log"
    vm = qmp_vm(*fz.portfuzz_args(seed, ops, log))
    statuses = []
    while vm.proc.poll() is None and len(statuses) < 5:
        try:
            statuses.append(vm.status())
            assert "return" in vm.cmd("query-cpus-fast")
        except Exception:  # the guest finished and the monitor went with it
            break
    vm.close()
    wait_for(lambda: vm.proc.poll() is not None, timeout=120, what="portfuzz to finish")
    assert statuses and set(statuses) == {"running"}, statuses
    _check(vm.proc.returncode, log.read_text(errors="replace"), vm.proc.stderr.read().decode(), seed, ops)


def test_the_longer_harness_briefly():
    assert fz.main(["guest", "--seeds", "2", "--ops", "5000"]) == 0


def test_portfuzz_survives_a_vfio_user_device(vmm, tmp_path, server):
    """The function's configuration space through 0xcf8/0xcfc (BARs moved, MSI switched on and
    off with any address and data): every write also goes to the server, which stays up."""
    log = tmp_path / "log"
    device = ["-machine", "aux-ram-share=on", "-device", f"vfio-user-pci,socket={server.socket}"]
    r = vmm.run(*fz.portfuzz_args(0x1F, OPS, log), *device, timeout=60)
    _check(r.status, log.read_text(errors="replace"), r.stderr, 0x1F)
    wait_for(lambda: ("1", "gone") in server.clients(), what="the server to see minivmm go")
    assert server.proc.poll() is None and server.clients() == [("1", "connected"), ("1", "gone")]

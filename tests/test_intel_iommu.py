"""-device intel-iommu (VT-d) on q35, as kvm-unit-tests' intel_iommu test runs it
(``-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu``).

The platform guest (guests/platform.S, ``pci iommu``) finds the DMAR table, reads the unit's
VER/CAP/ECAP, enables queued invalidation, the root table, the interrupt remapping table,
translation and interrupt remapping the way kvm-unit-tests does, then: a wait descriptor's
status write, an edu DMA to the device and back through root, context and 3-level
second-level tables, a write to a read-only IOVA (a recorded fault), edu's INTA through a
remappable IOAPIC entry and its MSI in remappable format (both seen in the local APIC's IRR),
an MSI naming an absent IRTE (a recorded fault), and an invalid descriptor (IQE)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, guest, wait_migration

KUT = ["-M", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on,eim=off", "-device", "edu"]
CAP = "80d2008c222f0606"  # QEMU 11's: 48-bit MGAW, SAGAW 39+48, 2M/1G pages, FRCD at 0x220, PSI, drain, ESRTPS
ECAP_IR = "0000000000f00f4a"  # QI, IR, PT, IOTLB at 0xf0, MHMV
ECAP_NO_IR = "0000000000000f42"  # QI, PT, IOTLB at 0xf0
VTD_IR = [
    f"platform: vtd ver=00000010 cap={CAP} ecap={ECAP_IR} gsts=00000000 fsts=00000000",
    "platform: vtd enabled gsts=c7000000",  # TES RTPS QIES IRES IRTPS
    "platform: vtd qi status=cafe0001 iqh=0000000000000010",
    "platform: vtd dma=ok",
    # PPF; F, write (T=0), reason 5 (write not permitted), requester 00:01.0; the page; then clear
    "platform: vtd fault fsts=00000002 frcd-hi=8000000500000008 frcd-lo=0000000000001000 cleared=00000000",
    "platform: vtd ir ioapic=yes msi=yes",
    # reason 0x22: IRTE not present; the record holds the interrupt index (3) in bits 63:48
    "platform: vtd ir-fault fsts=00000002 frcd-hi=8000002200000008 frcd-lo=0003000000000000",
    "platform: vtd qi-error fsts=00000010 iqh=0000000000000010",  # IQE; the head stays on the bad one
]
QEMU = os.environ.get("MINIVMM_QEMU") or shutil.which("qemu-system-x86_64") or "/tmp/qemu-peer/qemu-system-x86_64"
HAVE_QEMU = os.access(QEMU, os.X_OK)


def _lines(out: str, *prefixes: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(tuple(f"platform: {p}" for p in prefixes))]


def _run(vmm, *args: str, image: str = "platform.elf"):
    r = vmm.run(*args, "-kernel", guest(image), *DEBUG_EXIT, "-append", "pci iommu")
    assert r.status == GUEST_EXIT_OK, r
    assert r.stderr == "", r.stderr
    return r


def test_the_kvm_unit_tests_machine_translates_dma_and_remaps_interrupts(vmm):
    r = _run(vmm, *KUT)
    assert _lines(r.stdout, "dmar") == [
        "platform: dmar haw=47 flags=01",  # 48-bit host address width, INTR_REMAP
        "platform: dmar drhd flags=01 segment=0 base=00000000fed90000",  # INCLUDE_PCI_ALL
        "platform: dmar scope type=3 id=1 path=ff:00.0",  # the IOAPIC (the MADT's id 1), QEMU's source id
    ], r.stdout
    assert _lines(r.stdout, "vtd") == VTD_IR, r.stdout
    assert "platform: acpi rsdp=000e0000 rev=2 tables=7 bad-checksums=0" in r.stdout  # + DMAR


def test_without_interrupt_remapping_dma_is_still_translated(vmm):
    """kernel-irqchip=on: intremap's default (auto) is off there, as QEMU's; no IR unit, no IOAPIC scope."""
    r = _run(vmm, "-M", "q35", "-device", "intel-iommu", "-device", "edu")
    assert _lines(r.stdout, "dmar") == [
        "platform: dmar haw=47 flags=00",
        "platform: dmar drhd flags=01 segment=0 base=00000000fed90000",
    ], r.stdout
    assert (
        _lines(r.stdout, "vtd")
        == [
            f"platform: vtd ver=00000010 cap={CAP} ecap={ECAP_NO_IR} gsts=00000000 fsts=00000000",
            "platform: vtd enabled gsts=c4000000",  # TES RTPS QIES
            *VTD_IR[2:5],
            "platform: vtd ir none",
            VTD_IR[-1],
        ]
    ), r.stdout


def test_without_an_iommu_the_guest_finds_no_dmar(vmm):
    r = _run(vmm, "-M", "q35,kernel-irqchip=split", "-device", "edu")
    assert _lines(r.stdout, "dmar", "vtd") == ["platform: dmar none"], r.stdout


def test_the_iommu_state_migrates_and_a_reset_powers_it_on_again(qmp_vm, tmp_path):
    """The guest leaves the unit enabled, with a fault logged, and suspends (S3, no alarm). Its state
    goes in the stream as an intel-iommu section; the target loads it, and a system_reset there runs
    the guest again from power-on registers (gsts=0 again) to the same report."""
    args = [*KUT, "-kernel", guest("platform.elf"), *DEBUG_EXIT, "-append", "pci iommu s3 noalarm"]
    log = tmp_path / "serial.log"
    src = qmp_vm(*args, "-serial", f"file:{log}")
    assert src.event("SUSPEND")
    first = _lines(log.read_text(), "vtd")
    assert first == VTD_IR
    state = tmp_path / "vm.state"
    assert src.cmd("migrate", uri=f"file:{state}") == {"return": {}}
    assert wait_migration(src.qmp)["status"] == "completed"
    src.close()
    assert b"intel-iommu" in state.read_bytes()
    log2 = tmp_path / "serial2.log"
    dst = qmp_vm(*args, "-serial", f"file:{log2}", "-incoming", f"file:{state}")
    assert dst.status() == "suspended"
    assert dst.cmd("system_reset") == {"return": {}}
    assert dst.status() == "prelaunch"  # a reset of a suspended machine, as QEMU's: it waits for cont
    assert dst.cmd("cont") == {"return": {}}
    assert dst.event("SUSPEND", timeout=60)
    assert _lines(log2.read_text(), "vtd") == VTD_IR


@pytest.mark.skipif(not HAVE_QEMU, reason="no QEMU to compare with (set MINIVMM_QEMU)")
def test_the_guest_reports_what_qemus_intel_iommu_gives_it(vmm):
    """platformpvh.elf on both VMMs with kvm-unit-tests' options: the same registers, the same
    translation, the same faults recorded the same way, the same interrupts. The DMAR differs where
    QEMU 11 lists its devices in the DRHD instead of INCLUDE_PCI_ALL and gives the IOAPIC id 0."""
    args = [*KUT, "-kernel", guest("platformpvh.elf"), *DEBUG_EXIT, "-append", "pci iommu"]
    q = subprocess.run(
        [QEMU, "-accel", "kvm", "-nodefaults", "-display", "none", "-serial", "stdio", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert q.returncode == GUEST_EXIT_OK, q
    r = vmm.run(*args)
    assert r.status == GUEST_EXIT_OK, r
    assert _lines(r.stdout, "vtd") == _lines(q.stdout, "vtd") == VTD_IR, (r.stdout, q.stdout)
    assert _lines(r.stdout, "dmar haw") == _lines(q.stdout, "dmar haw")
    assert _lines(q.stdout, "dmar scope type=3") == ["platform: dmar scope type=3 id=0 path=ff:00.0"]

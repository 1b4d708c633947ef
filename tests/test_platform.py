"""The PC platform a test guest finds, read by a shipped guest the way
kvm-unit-tests' start-up code reads it (guests/platform.S): fw_cfg, the ACPI
tables (checksummed and walked in the guest), the PM timer, pc-testdev, and
PCI configuration space on both machine types: pc (mechanism #1 only) and
q35 (also ECAM, found through the MCFG)."""

from __future__ import annotations

import re

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, guest, wait_migration


def _platform(vmm, *args: str) -> dict[str, dict[str, str]]:
    """What the guest reported: {"fw_cfg": {"cpus": "2", ...}, "madt": {...}, ...}."""
    r = vmm.run("-kernel", guest("platform.elf"), *DEBUG_EXIT, *args)
    assert r.status == GUEST_EXIT_OK, r
    assert r.stderr == "", r.stderr
    return {line.split()[1]: dict(re.findall(r"(\S+)=(\S+)", line)) for line in r.stdout.splitlines()}


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("smp,ram", [(1, "128"), (3, "512M")])
def test_fw_cfg_and_acpi_describe_the_machine(vmm, smp, ram, machine):
    seen = _platform(vmm, "-M", machine, "-smp", str(smp), "-m", ram)
    fw, tables, madt, fadt = seen["fw_cfg"], seen["acpi"], seen["madt"], seen["fadt"]
    assert fw["signature"] == "QEMU" and int(fw["id"], 16) == 3  # the traditional interface and DMA
    assert (int(fw["cpus"]), int(fw["max"])) == (smp, smp)
    assert int(fw["ram"], 16) == int(ram.rstrip("M")) << 20
    assert int(fw["files"]) >= 1  # etc/e820
    count = "5" if machine == "pc" else "6"  # XSDT RSDT FADT MADT DSDT, and the MCFG on q35
    assert tables == {"rsdp": "000e0000", "rev": "2", "tables": count, "bad-checksums": "0"}
    assert madt == {"cpus": str(smp), "ioapics": "1", "overrides": "5"}
    assert fadt == {"pm1a-evt": "0600", "pm1a-cnt": "0604", "pm-tmr": "0608", "dsdt-s5": "yes"}
    assert seen["pm-timer"] == {"advances": "yes"}
    if machine == "pc":
        assert seen["mcfg"] == {}  # "platform: mcfg none"
        assert seen["dsdt"] == {"pci-hid": "PNP0A03", "pci-cid": "none", "prt": "no"}
    else:  # QEMU's ECAM, described as QEMU's q35 describes it
        assert seen["mcfg"] == {"base": "00000000b0000000", "segment": "0", "buses": "0-255"}
        assert seen["dsdt"] == {"pci-hid": "PNP0A08", "pci-cid": "PNP0A03", "prt": "yes"}


def test_madt_has_one_local_apic_per_vcpu(vmm):
    r = vmm.run("-kernel", guest("platform.elf"), *DEBUG_EXIT, "-smp", "4")
    assert r.status == GUEST_EXIT_OK, r
    assert "platform: madt cpus=4 ioapics=1 overrides=5" in r.stdout


def test_pc_testdev_scratch_register_and_memory(vmm):
    testdev = _platform(vmm, "-device", "pc-testdev", "-append", "testdev")["testdev"]
    assert testdev["data"] == "1234ab78"  # 0x12345678, then byte lane 1 written through the byte view
    assert testdev["iomem"] == "deadbeef"  # written and read back through MMIO exits


def test_without_pc_testdev_its_ports_are_unclaimed(vmm):
    assert _platform(vmm, "-append", "testdev")["testdev"] == {"data": "ffffffff", "iomem": "ffffffff"}


PCI_DEVICES = ["-device", "edu", "-device", "pci-testdev"]
EDU = "platform: pci 00:01.0 id=1234:11e8 class=00ff00 bar0=e0000000 bar1=00000000 irq={irq}"  # INTA's GSI
PCI_TESTDEV = "platform: pci 00:02.0 id=1b36:0005 class=00ff00 bar0=e0100000 bar1=0000c001 irq=0"


def _lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize(
    "machine",
    ["pc", "q35", "q35,kernel-irqchip=split"],  # the last: kvm-unit-tests' intel_iommu test's machine
)
def test_pci_devices_are_found_by_enumerating_config_space_and_work(vmm, machine):
    """Mechanism #1 on both machines; on q35 also ECAM (found through the MCFG): the same first 64
    bytes, all ones past a conventional function's 256 and on bus 1, BAR0 sized through it. INTA
    of edu reaches the IOAPIC pin its interrupt line names: IRQ 10 on pc, GSI 21 on q35."""
    r = vmm.run("-M", machine, "-kernel", guest("platform.elf"), *DEBUG_EXIT, *PCI_DEVICES, "-append", "pci")
    assert r.status == GUEST_EXIT_OK, r
    seen = {line.split()[1]: dict(re.findall(r"(\S+)=(\S+)", line)) for line in r.stdout.splitlines()}
    edu = [line for line in r.stdout.splitlines() if line.startswith("platform: edu ")]
    assert edu == [
        "platform: edu id=010000ed live=edcba987 fact10=00375f00 dma=ok",  # 10! = 0x375f00
        f"platform: edu intx-pin={10 if machine == 'pc' else 21} rirr=1",  # delivered by the IOAPIC
    ], r.stdout
    assert seen["pci-testdev"] == {
        "name": "mmio-no-eventfd",
        "hits": "1",
        "datamatch": "1",  # the write of another value did not count
        "port": "portio-no-eventfd",
    }
    if machine == "pc":
        assert _lines(r.stdout, "platform: pci ") == [
            "platform: pci 00:00.0 id=8086:1237 class=060000 bar0=00000000 bar1=00000000 irq=0",  # i440FX
            EDU.format(irq=10),
            PCI_TESTDEV,
        ], r.stdout
        assert not _lines(r.stdout, "platform: ecam"), r.stdout
        return
    assert _lines(r.stdout, "platform: pci ") == [
        "platform: pci 00:00.0 id=8086:29c0 class=060000 bar0=00000000 bar1=00000000 irq=0",  # MCH
        EDU.format(irq=21),  # PIRQF: (slot 1 + INTA - 1) mod 4 + E, on GSI 16 + 5
        PCI_TESTDEV,
        "platform: pci 00:1f.0 id=8086:2918 class=060100 bar0=00000000 bar1=00000000 irq=0",  # ICH9 LPC
    ], r.stdout
    assert _lines(r.stdout, "platform: ecam") == [
        "platform: ecam 00:00.0 id=8086:29c0 same=yes ext=ffffffff bar0-mask=00000000 restored=yes",
        "platform: ecam 00:01.0 id=1234:11e8 same=yes ext=ffffffff bar0-mask=fff00000 restored=yes",  # 1 MiB
        "platform: ecam 00:02.0 id=1b36:0005 same=yes ext=ffffffff bar0-mask=fffff000 restored=yes",  # 4 KiB
        "platform: ecam 00:1f.0 id=8086:2918 same=yes ext=ffffffff bar0-mask=00000000 restored=yes",
        "platform: ecam bus1=ffffffff",
    ], r.stdout
    assert seen["mch"] == {"pciexbar": "00000000b0000001"}  # enabled, 256 MiB, at 0xb0000000
    assert seen["lpc"] == {"pmbase": "00000601", "acpi-cntl": "80"}  # the PM block at 0x600, ACPI on


def test_query_pci_and_info_pci_on_pc(qmp_vm):
    vm = qmp_vm("-kernel", guest("platform.elf"), "-S", "-serial", "null", "-device", "edu", "-device", "pci-testdev")
    devices = vm.cmd("query-pci")["return"][0]["devices"]
    assert [(d["slot"], d["id"]["vendor"], d["id"]["device"]) for d in devices] == [
        (0, 0x8086, 0x1237),
        (1, 0x1234, 0x11E8),
        (2, 0x1B36, 0x0005),
    ]
    assert devices[0]["class_info"] == {"class": 0x0600, "desc": "Host bridge"}
    edu = devices[1]
    assert (edu["irq"], edu["irq_pin"]) == (10, 1)
    assert edu["regions"] == [
        {"bar": 0, "type": "memory", "address": 0xE0000000, "size": 1 << 20, "prefetch": False, "mem_type_64": False}
    ]
    text = vm.cmd("human-monitor-command", **{"command-line": "info pci"})["return"].replace("\r\n", "\n")
    assert "  Bus  0, device   0, function 0:\n    Host bridge: PCI device 8086:1237\n" in text
    assert "      IRQ 10, pin A\n      BAR0: 32 bit memory at 0xe0000000 [0xe00fffff].\n" in text
    assert "      BAR1: I/O at 0xc000 [0xc0ff].\n" in text


def test_pci_config_spaces_survive_a_migration(qmp_vm, tmp_path):
    args = ["-kernel", guest("platform.elf"), "-S", "-serial", "null", "-device", "edu", "-device", "pci-testdev"]
    src = qmp_vm(*args)
    before = src.cmd("query-pci")["return"]
    state = tmp_path / "vm.state"
    assert src.cmd("migrate", uri=f"file:{state}") == {"return": {}}
    wait_migration(src.qmp)
    dst = qmp_vm(*args, "-incoming", f"file:{state}")
    assert dst.cmd("query-pci")["return"] == before


def test_s3_suspend_to_ram_and_an_rtc_alarm_wake_resume_at_the_waking_vector(vmm):
    """kvm-unit-tests' s3 test, as our guest does it: FACS waking vector, RTC_EN, an alarm on the
    next second, SLP_TYP 1 with SLP_EN; the resume code runs in real mode and reports what it
    finds at address 0 (0x10 when the suspend happened, 1 if the guest ran on)."""
    r = vmm.run("-kernel", guest("platform.elf"), *DEBUG_EXIT, "-append", "s3", timeout=30)
    assert r.status == GUEST_EXIT_OK, r
    assert r.stdout.endswith("platform: s3 suspending\n") and r.stderr == ""


def test_a_suspended_guest_waits_for_system_wakeup_when_no_alarm_may_wake_it(qmp_vm):
    vm = qmp_vm("-kernel", guest("platform.elf"), *DEBUG_EXIT, "-append", "s3 noalarm")
    assert vm.event("SUSPEND")
    assert vm.status() == "suspended"
    assert vm.cmd("system_wakeup") == {"return": {}}
    assert vm.event("WAKEUP")
    assert vm.proc.wait(20) == GUEST_EXIT_OK  # the resume code ran at the waking vector


def test_system_wakeup_of_a_running_guest_is_refused(qmp_vm):
    vm = qmp_vm("-kernel", guest("abwalk.elf"), "-serial", "null")
    reply = vm.cmd("system_wakeup")
    assert reply["error"]["desc"] == "Unable to wake up: guest is not in suspended state"
    assert vm.status() == "running"

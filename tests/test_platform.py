"""The PC platform a test guest finds, read by a shipped guest the way
kvm-unit-tests' start-up code reads it (guests/platform.S): fw_cfg, the ACPI
tables (checksummed and walked in the guest), the PM timer, pc-testdev."""

from __future__ import annotations

import re

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, guest


def _platform(vmm, *args: str) -> dict[str, dict[str, str]]:
    """What the guest reported: {"fw_cfg": {"cpus": "2", ...}, "madt": {...}, ...}."""
    r = vmm.run("-kernel", guest("platform.elf"), *DEBUG_EXIT, *args)
    assert r.status == GUEST_EXIT_OK, r
    assert r.stderr == "", r.stderr
    return {line.split()[1]: dict(re.findall(r"(\S+)=(\S+)", line)) for line in r.stdout.splitlines()}


@pytest.mark.parametrize("smp,ram", [(1, "128"), (3, "512M")])
def test_fw_cfg_and_acpi_describe_the_machine(vmm, smp, ram):
    seen = _platform(vmm, "-smp", str(smp), "-m", ram)
    fw, tables, madt, fadt = seen["fw_cfg"], seen["acpi"], seen["madt"], seen["fadt"]
    assert fw["signature"] == "QEMU" and int(fw["id"], 16) == 3  # the traditional interface and DMA
    assert (int(fw["cpus"]), int(fw["max"])) == (smp, smp)
    assert int(fw["ram"], 16) == int(ram.rstrip("M")) << 20
    assert int(fw["files"]) >= 1  # etc/e820
    assert tables == {"rsdp": "000e0000", "rev": "2", "tables": "5", "bad-checksums": "0"}  # XSDT RSDT FADT MADT DSDT
    assert madt == {"cpus": str(smp), "ioapics": "1", "overrides": "5"}
    assert fadt == {"pm1a-evt": "0600", "pm1a-cnt": "0604", "pm-tmr": "0608", "dsdt-s5": "yes"}
    assert seen["pm-timer"] == {"advances": "yes"}


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

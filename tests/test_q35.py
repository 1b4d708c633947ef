"""The q35 machine as a whole: its names on the command line, RAM and the e820
map around ECAM, query-pci and info pci, a running guest migrated, and a
stream refused by a machine of the other type. The guest's own view of the
PCI bus and the ACPI tables is in test_platform.py (both machines, one
guest); here the same image is also run under QEMU's q35, when a QEMU is
there, and the two reports compared where they should agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, MiB, guest, wait_for, wait_migration, walking
from minivmm.arch.x86 import layout
from minivmm.arch.x86.e820 import memory_map
from minivmm.arch.x86.machine_types import Q35
from minivmm.guests.abwalk import check_invariant, read_status
from minivmm.machine.control import EXIT_PANIC

PCI_DEVICES = ["-device", "edu", "-device", "pci-testdev"]


def _run_platform(vmm, *machine: str) -> str:
    r = vmm.run(*machine, "-kernel", guest("platform.elf"), *DEBUG_EXIT, *PCI_DEVICES, "-append", "pci")
    assert r.status == GUEST_EXIT_OK and r.stderr == "", r
    return r.stdout


@pytest.mark.parametrize(
    "machine",
    [
        ["-M", "q35"],
        ["-machine", "type=q35"],
        ["-machine", "pc-q35-9.2,kernel-irqchip=split"],  # a versioned name: the same machine
        ["-machine", "accel=kvm", "-machine", "q35"],  # repeated -machine options merge
    ],
    ids=["M", "type", "versioned-split", "merged"],
)
def test_the_names_of_the_q35_machine(vmm, machine):
    out = _run_platform(vmm, *machine)
    assert "platform: pci 00:00.0 id=8086:29c0 class=060000" in out  # the MCH
    assert "platform: ecam 00:1f.0 id=8086:2918 same=yes" in out  # the LPC, through ECAM


def test_machine_help_lists_both_in_qemus_format(vmm):
    r = vmm.run("-machine", "help")
    assert r.status == 0 and r.stdout == (
        "Supported machines are:\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (default)\n"
        "q35                  Standard PC (Q35 + ICH9, 2009)\n"
    )
    assert vmm.run("-M", "?").stdout == r.stdout


def test_pc_is_still_the_default_and_has_no_ecam(vmm):
    for machine in ([], ["-M", "pc"], ["-M", "pc-i440fx-9.2"]):
        out = _run_platform(vmm, *machine)
        assert "platform: pci 00:00.0 id=8086:1237" in out and "platform: mcfg none" in out, machine


def test_the_isa_test_devices_work_on_q35(vmm):
    """pc-testdev (ports and MMIO), isa-debug-exit (every run's exit status) and pvpanic, as on pc."""
    r = vmm.run(
        "-M", "q35", "-kernel", guest("platform.elf"), *DEBUG_EXIT, "-device", "pc-testdev", "-append", "testdev"
    )
    assert r.status == GUEST_EXIT_OK, r
    assert "platform: testdev data=1234ab78 iomem=deadbeef\n" in r.stdout
    r = vmm.run("-M", "q35", "-kernel", guest("hello32.elf"), "-append", "panic", "-device", "pvpanic", *DEBUG_EXIT)
    assert r.status == EXIT_PANIC and r.stderr == "minivmm: the guest panicked (-action panic=shutdown)\n", r


def _e820(out: str) -> list[tuple[int, int, int]]:
    return [
        (int(m[1], 16), int(m[2], 16), int(m[3], 16))
        for m in re.finditer(r"linuxboot: e820 addr=(\w+) size=(\w+) type=(\d+)\n", out)
    ]


@pytest.mark.parametrize("ram", [1 << 30, 0xB0000000, 3 << 30])
def test_ram_below_4g_ends_before_ecam_and_the_e820_map_reserves_it(vmm, ram):
    """QEMU's q35: all RAM below 4 GiB when it ends before 0xb0000000, else 2 GiB below and the
    rest from 4 GiB; the ECAM window reserved in every boot protocol's map (here Linux's)."""
    r = vmm.run("-M", "q35", "-m", f"{ram >> 20}M", "-kernel", guest("linuxboot.bin"), *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    ranges = Q35.ram_ranges(ram)
    assert ranges == ([(0, ram)] if ram < 0xB0000000 else [(0, 2 << 30), (4 << 30, ram - (2 << 30))])
    e820 = _e820(r.stdout)
    assert e820 == memory_map(ranges, Q35.reserved())
    assert (layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE, 2) in e820
    assert all(base + size <= layout.PCIE_ECAM_BASE or base >= 4 << 30 for base, size, kind in e820 if kind == 1)


def test_the_multiboot_memory_map_reserves_ecam_too(vmm):
    r = vmm.run("-M", "q35", "-kernel", guest("hello32.elf"), *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert "hello32: mmap base=0x00000000b0000000 len=0x0000000010000000 type=2\n" in r.stdout


def test_query_pci_info_pci_and_info_mtree_on_q35(qmp_vm):
    vm = qmp_vm("-M", "q35", "-kernel", guest("platform.elf"), "-S", "-serial", "null", *PCI_DEVICES)
    devices = vm.cmd("query-pci")["return"][0]["devices"]
    assert [(d["slot"], d["id"]["vendor"], d["id"]["device"]) for d in devices] == [
        (0, 0x8086, 0x29C0),
        (1, 0x1234, 0x11E8),
        (2, 0x1B36, 0x0005),
        (31, 0x8086, 0x2918),
    ]
    assert devices[0]["class_info"] == {"class": 0x0600, "desc": "Host bridge"}
    assert devices[3]["class_info"] == {"class": 0x0601, "desc": "ISA bridge"}
    assert (devices[1]["irq"], devices[1]["irq_pin"]) == (21, 1)  # INTA of slot 1: PIRQF, GSI 21
    hmp = lambda line: vm.cmd("human-monitor-command", **{"command-line": line})["return"].replace("\r\n", "\n")  # noqa: E731
    text = hmp("info pci")
    assert "  Bus  0, device  31, function 0:\n    ISA bridge: PCI device 8086:2918\n" in text
    assert "      IRQ 21, pin A\n" in text
    assert "00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio" in hmp("info mtree")


def _walker(*extra: str) -> list[str]:
    kernel = ["-kernel", guest("abwalk.elf"), "-m", "64", "-machine", "aux-ram-share=on", "-serial", "null"]
    return [*kernel, *PCI_DEVICES, *extra]


def test_a_running_q35_guest_migrates_to_a_file_and_only_a_q35_target_takes_it(qmp_vm, vmm, ram_fds, tmp_path):
    src = qmp_vm(*_walker("-M", "q35"))
    walking(ram_fds(src.proc.pid), 2)
    before = src.cmd("query-pci")["return"]
    state = tmp_path / "q35.state"
    assert src.cmd("migrate", uri=f"file:{state}") == {"return": {}}  # while it runs
    assert wait_migration(src.qmp)["status"] == "completed"

    dst = qmp_vm(*_walker("-M", "pc-q35-9.2"), "-incoming", f"file:{state}")  # the same machine by another name
    wait_for(lambda: dst.status() == "running", what="the target to resume")
    assert dst.cmd("query-pci")["return"] == before
    fd = ram_fds(dst.proc.pid)
    passes = read_status(fd).passes
    wait_for(lambda: read_status(fd).passes > passes + 2, what="the walker in the target")
    dst.cmd("stop")
    check_invariant(fd, 64 * MiB)

    # A pc machine has the same RAM layout at 64 MiB and the same device sections: only the
    # machine type tells them apart, and it is checked first.
    r = vmm.run(*_walker(), "-incoming", f"file:{state}")
    assert r.status == 1, r
    assert r.stderr.strip() == (
        f"minivmm: file:{state}: load of migration failed: "
        "configuration/name: Machine type received is 'q35' and local is 'pc'"
    )


def test_a_pc_stream_is_refused_by_a_q35_target(qmp_vm, vmm, tmp_path):
    src = qmp_vm(*_walker())
    time.sleep(0.2)
    state = tmp_path / "pc.state"
    src.cmd("migrate", uri=f"file:{state}")
    assert wait_migration(src.qmp)["status"] == "completed"
    r = vmm.run(*_walker("-M", "q35"), "-incoming", f"file:{state}")
    assert r.status == 1 and "Machine type received is 'pc' and local is 'q35'" in r.stderr, r


# --- the same guest under QEMU's q35 ---------------------------------------------------------------------

QEMU = os.environ.get("MINIVMM_QEMU") or shutil.which("qemu-system-x86_64")


def _lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"platform: {prefix}")]


@pytest.mark.skipif(QEMU is None, reason="no QEMU to compare with (set MINIVMM_QEMU or put qemu-system-x86_64 on PATH)")
def test_the_platform_guest_reports_what_qemus_q35_gives_it(vmm):
    """platformpvh.elf (the platform guest through PVH, which QEMU boots too) on both VMMs, q35,
    with the same devices. They agree on the MADT and FADT, the MCFG, the DSDT's PCI root, the ids
    and classes on bus 0, everything read through ECAM, PCIEXBAR and the LPC's PMBASE. They differ
    where firmware decides: QEMU's SeaBIOS places BARs from the top of the hole down and routes
    INTx through the PIRQ registers to IRQs 10 and 11 too (writing 10 in edu's interrupt line),
    minivmm places BARs from 0xe0000000 up and leaves INTx on GSI 21 alone."""
    args = ["-M", "q35", "-kernel", guest("platformpvh.elf"), *DEBUG_EXIT, *PCI_DEVICES, "-append", "pci"]
    qemu_args = [QEMU, "-accel", "kvm", "-nodefaults", "-display", "none", "-serial", "stdio", *args]
    q = subprocess.run(qemu_args, capture_output=True, text=True, timeout=120)
    assert q.returncode == GUEST_EXIT_OK, q
    r = vmm.run(*args)
    assert r.status == GUEST_EXIT_OK, r
    for prefix in ("madt", "fadt", "mcfg", "dsdt", "pm-timer", "ecam", "mch", "lpc"):
        assert _lines(r.stdout, prefix) == _lines(q.stdout, prefix), (prefix, r.stdout, q.stdout)
    ids = lambda out: [line.split()[2:5] for line in _lines(out, "pci ")]  # noqa: E731  slot, id=, class=
    assert (
        ids(r.stdout)
        == ids(q.stdout)
        == [
            ["00:00.0", "id=8086:29c0", "class=060000"],
            ["00:01.0", "id=1234:11e8", "class=00ff00"],
            ["00:02.0", "id=1b36:0005", "class=00ff00"],
            ["00:1f.0", "id=8086:2918", "class=060100"],
        ]
    )
    assert _lines(r.stdout, "edu intx") == ["platform: edu intx-pin=21 rirr=1"]
    assert _lines(q.stdout, "edu intx") == ["platform: edu intx-pin=10 rirr=1"]

"""-device vfio-pci: a host PCI function assigned through kernel VFIO (the container or iommufd).

What runs on any host, for real: the kernel backends invoked directly fail with one line naming
the missing node or QEMU's words for a device without an IOMMU group or a VFIO cdev, the
machine's own attach of a real host PCI device fails the same way, KVM's VFIO pseudo-device
(which this kernel has) refuses a file that is not VFIO's, and the memory slots that carry an
mmap'd BAR follow it in KVM.

What needs VFIO (a kernel with /dev/vfio/vfio or /dev/iommu, and MINIVMM_VFIO_HOST=BDF naming a
device bound to vfio-pci) is written out in full and skipped, naming what is missing: a guest
that finds the device (configuration space as the host has it) and a BAR read, and a cpr-exec
with the device kept (same fds, never reset, the guest running on).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path

import pytest

from conftest import argv_of, guest, wait_exec, wait_for
from minivmm.cpr.fdtable import FdTable
from minivmm.kvm import constants as kc
from minivmm.kvm.system import Kvm, KvmError
from minivmm.machine.errors import MachineError
from minivmm.machine.ram import DeviceSlots
from minivmm.machine.vfio import VfioHost, VfioPciOptions
from minivmm.memory import GuestMemory
from minivmm.vfio import constants as vc
from minivmm.vfio import host, kernel
from minivmm.vmprocess import qmp_connect

PCI = Path("/sys/bus/pci/devices")
HOST = os.environ.get("MINIVMM_VFIO_HOST", "")
RAM = ["-object", "memory-backend-memfd,id=ram0,size=64M,share=on", "-machine", "memory-backend=ram0", "-m", "64M"]


def _missing(req: host.Requirement) -> str | None:
    return host.missing(req)


def _no_vfio_host(iommufd: bool) -> str | None:
    """Why the full tests cannot run here, naming the missing kernel support first."""
    line = _missing(host.IOMMUFD if iommufd else host.CONTAINER)
    if line:
        return line
    if iommufd and not os.path.isdir(vc.VFIO_DEVICES_DIR):
        return f"no {vc.VFIO_DEVICES_DIR}: this kernel has no VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV)"
    if not HOST:
        return "MINIVMM_VFIO_HOST is not set (a host BDF bound to vfio-pci)"
    return None


def _host_devices_without_vfio() -> list[str]:
    """Real PCI functions of this host that have no IOMMU group (so none is bound to VFIO)."""
    if not PCI.is_dir():
        return []
    return sorted(str(p) for p in PCI.iterdir() if not (p / "iommu_group").exists())


# --- on any host --------------------------------------------------------------------------------
@pytest.mark.skipif(not _missing(host.CONTAINER), reason="this host has /dev/vfio/vfio: nothing is missing")
def test_the_container_backend_names_the_missing_node():
    with pytest.raises(host.VfioUnavailable) as e:
        kernel.Container(FdTable()).open()
    assert str(e.value) == (
        "Could not open '/dev/vfio/vfio': No such file or directory: this kernel has no VFIO container "
        "(CONFIG_VFIO and CONFIG_VFIO_CONTAINER: not built, or the module not loaded)"
    )


@pytest.mark.skipif(not _missing(host.IOMMUFD), reason="this host has /dev/iommu: nothing is missing")
def test_the_iommufd_backend_names_the_missing_node():
    table = FdTable()
    with pytest.raises(host.VfioUnavailable) as e:
        kernel.Iommufd(table, "iommufd0").open(None)
    assert "Could not open '/dev/iommu': No such file or directory: this kernel has no iommufd" in str(e.value)
    assert table.fds == {}  # nothing half-opened is left in the CPR table


def test_the_iommufd_backend_takes_a_given_fd_and_refuses_a_closed_one():
    r, w = os.pipe()
    os.close(w)
    os.set_inheritable(r, True)  # as a parent hands it over
    table = FdTable()
    be = kernel.Iommufd(table, "io0")
    be.open(r)
    assert (be.fd, be.kept, table.find("iommufd", "io0")) == (r, False, r)
    assert not os.get_inheritable(r)  # no child of minivmm inherits it; a CPR exec clears the flag itself
    os.close(r)
    with pytest.raises(kernel.VfioError, match=f"Could not parse remote object fd {r}: Bad file descriptor"):
        kernel.Iommufd(FdTable(), "io1").open(r)


@pytest.mark.skipif(not _host_devices_without_vfio(), reason="every PCI device of this host has an IOMMU group")
def test_a_host_device_without_an_iommu_group_or_vfio_cdev_gets_qemus_words():
    sysfsdev = _host_devices_without_vfio()[0]
    with pytest.raises(kernel.VfioError, match=r"^no iommu_group found: No such file or directory$"):
        kernel.iommu_group(sysfsdev)
    with pytest.raises(kernel.VfioError) as e:
        kernel.cdev_path(sysfsdev)
    assert str(e.value) == f"couldn't open directory {sysfsdev}/vfio-dev: No such file or directory"


@pytest.mark.skipif(not _host_devices_without_vfio(), reason="every PCI device of this host has an IOMMU group")
@pytest.mark.parametrize("path", ["legacy", "iommufd"])
def test_the_machines_attach_of_a_real_host_device_fails_in_one_line(path):
    """VfioHost.attach on a real VM and a real host PCI function that VFIO does not have: the line a
    machine build would fail with, naming the device and what is missing, and nothing left open."""
    sysfsdev = _host_devices_without_vfio()[0]
    name = os.path.basename(sysfsdev)
    kvm = Kvm()
    vm = kvm.create_vm()
    table = FdTable()
    vfio = VfioHost(vm, GuestMemory(), table)
    iommufd = None
    if path == "iommufd":
        from minivmm.config import IommufdConfig

        iommufd = IommufdConfig("iommufd0", None, "-object iommufd,id=iommufd0")
    try:
        with pytest.raises(MachineError) as e:
            vfio.attach(VfioPciOptions(name, sysfsdev, None, iommufd, name), f"-device vfio-pci,host={name}")
        if path == "legacy":
            assert str(e.value).endswith(f"vfio {name}: no iommu_group found: No such file or directory")
        elif _missing(host.IOMMUFD):
            assert "Could not open '/dev/iommu'" in str(e.value)
        else:
            assert f"vfio {name}: couldn't open directory {sysfsdev}/vfio-dev" in str(e.value)
        assert "vfio_device" not in {k[0] for k in table.fds}
    finally:
        vfio.close()
        vm.close()
        kvm.close()


def test_kvms_vfio_device_refuses_a_file_that_is_not_vfios():
    """The KVM VFIO pseudo-device exists on this kernel (CONFIG_KVM_VFIO): it is made for real and
    refuses an eventfd as QEMU's vfio_kvm_device_add_fd would report it."""
    kvm = Kvm()
    vm = kvm.create_vm()
    assert vm.check_extension(kc.KVM_CAP_DEVICE_CTRL)
    vfio = VfioHost(vm, GuestMemory(), FdTable())
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with pytest.raises(kernel.VfioError) as e:
            vfio._kvm_add(fd, "group ID 7: ")
        assert str(e.value) == f"group ID 7: Failed to add fd {fd} to KVM VFIO device: Invalid argument"
        assert vfio.kvm_device is not None and vfio.kvm_device.fd >= 0  # made once, kept for the next file
        with pytest.raises(KvmError):
            vfio.kvm_device.set_attr(kc.KVM_DEV_VFIO_GROUP, kc.KVM_DEV_VFIO_GROUP_DEL, fd)
    finally:
        os.close(fd)
        vfio.close()
        vm.close()
        kvm.close()


def test_a_bars_memory_slot_follows_the_bar():
    """DeviceSlots on a real VM with an mmap standing where a BAR's pages would be: the slot is at the
    BAR's address (KVM refuses another slot over it), moves with it (the old range is free again) and
    goes when the BAR is unmapped."""
    kvm = Kvm()
    vm = kvm.create_vm()
    bar = mmap.mmap(-1, 0x2000)
    probe = mmap.mmap(-1, 0x2000)
    import ctypes

    host_addr = ctypes.addressof(ctypes.c_char.from_buffer(bar))
    probe_addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    slots = DeviceSlots(vm, 10)
    try:
        slots.place("vfio-pci 'h0' BAR0", 0xE0000000, 0x2000, host_addr)
        assert slots.slots["vfio-pci 'h0' BAR0"] == (10, 0xE0000000)
        with pytest.raises(KvmError) as e:
            vm.set_user_memory_region(20, 0xE0001000, 0x1000, probe_addr)
        assert e.value.errno == 17  # EEXIST: the BAR's slot is there
        slots.place("vfio-pci 'h0' BAR0", 0xE0100000, 0x2000, host_addr)
        vm.set_user_memory_region(20, 0xE0000000, 0x1000, probe_addr)  # the old range is free
        vm.set_user_memory_region(20, 0xE0000000, 0, probe_addr)
        slots.place("vfio-pci 'h0' BAR0", None, 0x2000, host_addr)
        vm.set_user_memory_region(21, 0xE0100000, 0x2000, probe_addr)  # and so is the new one, unmapped
        assert slots.slots["vfio-pci 'h0' BAR0"] == (10, None)
    finally:
        vm.close()
        kvm.close()


def test_a_bar_the_guest_puts_over_ram_stays_trapped_and_the_guest_runs_on(capfd):
    """The BAR's address is the guest's: a slot KVM refuses (over a RAM slot, EEXIST) is one line on
    stderr, not an exception in the vCPU's configuration write; the BAR's slot comes back when the
    guest moves it somewhere free."""
    kvm = Kvm()
    vm = kvm.create_vm()
    ram = mmap.mmap(-1, 0x10000)
    bar = mmap.mmap(-1, 0x2000)
    import ctypes

    ram_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    bar_addr = ctypes.addressof(ctypes.c_char.from_buffer(bar))
    slots = DeviceSlots(vm, 1)
    try:
        vm.set_user_memory_region(0, 0, 0x10000, ram_addr)
        slots.place("vfio-pci 'h0' BAR0", 0x4000, 0x2000, bar_addr)
        assert slots.slots["vfio-pci 'h0' BAR0"] == (1, None)
        assert "vfio-pci 'h0' BAR0 at 0x4000: no memory slot (File exists)" in capfd.readouterr().err
        slots.place("vfio-pci 'h0' BAR0", 0xE0000000, 0x2000, bar_addr)
        assert slots.slots["vfio-pci 'h0' BAR0"] == (1, 0xE0000000)
        slots.place("vfio-pci 'h0' BAR0", 0x6000, 0x2000, bar_addr)  # from a slot onto RAM: the old one goes
        assert slots.slots["vfio-pci 'h0' BAR0"] == (1, None)
        vm.set_user_memory_region(2, 0xE0000000, 0x2000, bar_addr)  # free again
    finally:
        vm.close()
        kvm.close()


# --- with VFIO: a real assignment ---------------------------------------------------------------
def _sysfs_ids(bdf: str) -> tuple[int, int, int]:
    d = PCI / (bdf if bdf.count(":") == 2 else f"0000:{bdf}")
    return tuple(int((d / n).read_text(), 16) for n in ("vendor", "device", "class"))


def _device_args(iommufd: bool) -> list[str]:
    if iommufd:
        return ["-object", "iommufd,id=iommufd0", "-device", f"vfio-pci,id=h0,host={HOST},iommufd=iommufd0"]
    return ["-device", f"vfio-pci,id=h0,host={HOST}"]


@pytest.mark.parametrize("iommufd", [False, True], ids=["container", "iommufd"])
def test_a_guest_finds_the_assigned_device_and_reads_its_bar(vmm, iommufd):
    """platform.elf walks bus 0 and prints what it reads of each function's configuration space: the
    assigned one shows the host's vendor, device and class. The BAR read goes through the function
    itself (in-process, on a real VM) and is compared with the host's own view (sysfs resource0)."""
    reason = _no_vfio_host(iommufd)
    if reason:
        pytest.skip(reason)
    vendor, device, klass = _sysfs_ids(HOST)
    r = vmm.run("-kernel", guest("platform.elf"), "-append", "pci", *RAM, *_device_args(iommufd), timeout=60)
    line = f"id={vendor:04x}:{device:04x} class={klass:06x}"
    assert re.search(rf"platform: pci 00:\w\w\.0 {line}", r.stdout), r.stdout + r.stderr

    from minivmm.cli import parse
    from minivmm.machine import Machine

    m = Machine(parse(["-kernel", guest("platform.elf"), *RAM, *_device_args(iommufd)]).config)
    try:
        fn = m.devices.vfio_pci[0]
        index = next(i for i, b in enumerate(fn.bars) if b is not None and b.kind == "mmio")
        with open(PCI / (HOST if HOST.count(":") == 2 else f"0000:{HOST}") / f"resource{index}", "rb") as f:
            theirs = struct.unpack("<I", mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ)[:4])[0]
        assert fn.bars[index].device.read(0, 4) == theirs
    finally:
        m.close()


@pytest.mark.parametrize("iommufd", [False, True], ids=["container", "iommufd"])
def test_cpr_exec_keeps_the_assigned_device(qmp_vm, tmp_path, iommufd):
    """The same process after the exec holds the same VFIO files (the CPR table's), the guest runs on,
    query-pci shows the function where it was, and no blocker stood in the way."""
    reason = _no_vfio_host(iommufd)
    if reason:
        pytest.skip(reason)
    args = ["-kernel", guest("abwalk.elf"), *RAM, "-serial", "null", *_device_args(iommufd)]
    vm = qmp_vm(*args)
    before = vm.cmd("query-pci")["return"][0]["devices"]
    vfio_files = sorted(
        os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{vm.proc.pid}/fd")
        if os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}").startswith(("/dev/vfio", "/dev/iommu"))
    )
    state = tmp_path / "vm.state"
    new = [*argv_of(vm, *args), "-incoming", f"file:{state}"]
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": new})
    assert vm.cmd("migrate", uri=f"file:{state}") == {"return": {}}
    wait_exec(vm.qmp)
    target = qmp_connect(vm.socket)
    try:
        wait_for(lambda: target.cmd("query-status")["status"] == "running", timeout=30, what="the guest running")
        assert target.cmd("query-pci")[0]["devices"] == before
        after = sorted(
            os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{vm.proc.pid}/fd")
            if os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}").startswith(("/dev/vfio", "/dev/iommu"))
        )
        assert after == vfio_files
    finally:
        target.close()


@pytest.mark.parametrize("iommufd", [False, True], ids=["container", "iommufd"])
def test_a_normal_migration_with_an_assigned_device_is_refused(qmp_vm, tmp_path, iommufd):
    reason = _no_vfio_host(iommufd)
    if reason:
        pytest.skip(reason)
    vm = qmp_vm("-kernel", guest("abwalk.elf"), *RAM, "-serial", "null", *_device_args(iommufd))
    err = vm.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")["error"]["desc"]
    assert err == "h0: VFIO device doesn't support migration"
    assert vm.status() == "running"


def test_a_cpr_source_whose_kernel_refuses_the_dma_addresses_back_still_resumes(monkeypatch, capfd):
    """A CPR that failed after the source stopped: if taking the container's DMA addresses back fails
    (VADDR map refused; simulated, this kernel has no VFIO), the guest still gets its state back, the
    migration reports both failures, and nothing escapes into the migration thread."""
    from minivmm.cli import parse
    from minivmm.machine import Machine
    from minivmm.migration.manager import MigrationManager
    from minivmm.migration.outgoing import Outgoing

    m = Machine(parse(["-kernel", guest("abwalk.elf"), "-serial", "null"]).config)
    try:
        manager = MigrationManager(m)
        out = Outgoing(manager, None)
        out.stopped_vm = True

        def refused() -> None:
            raise MachineError("-device vfio-pci", "vfio_legacy_cpr_dma_map (iova 0x0): Invalid argument")

        monkeypatch.setattr(m.devices, "cpr_resume", refused)
        out._finish("failed", "the target hung up")
        assert out.status == "failed"
        assert out.error.startswith("the target hung up; ") and "vfio_legacy_cpr_dma_map" in out.error
        assert m.control.state == out.old_state
        assert "vfio_legacy_cpr_dma_map (iova 0x0): Invalid argument" in capfd.readouterr().err
    finally:
        m.close()


def test_a_container_fd_under_several_groups_is_released_once_and_never_while_in_use():
    """cpr-exec keeps fd numbers, so the container stands in the CPR table under each group's name
    with one number. After the load, groups the new command line dropped let go of their names; the
    fd is closed once when none is left, and stays open while a kept group still holds it."""
    table = FdTable(inherited=True)
    kept, dropped = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    for group in ("1", "2"):
        table.fds[("vfio_container_for_group", group)] = kept
    for group in ("3", "4"):
        table.fds[("vfio_container_for_group", group)] = dropped
    table.claim("vfio_container_for_group", "1")
    try:
        table.release_unclaimed()
        assert table.fds == {("vfio_container_for_group", "1"): kept}
        os.fstat(kept)  # still the machine's
        with pytest.raises(OSError):
            os.fstat(dropped)
    finally:
        os.close(kept)

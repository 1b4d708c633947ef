"""-device vfio-user-pci against the sample server (minivmm-vfio-user), with a real guest:
timer.elf's vfiouser mode finds the device on the PCI bus, enables MSI, MSI-X (its table in a
64-bit BAR) or INTx and runs DMA rounds through it, each ending in an interrupt. Across cpr-exec
and cpr-transfer the server keeps its one connection and the guest loses no interrupt; the device
is never reset. QEMU 11's own vfio-user-pci client runs the same guest against the same server
when a QEMU is at hand."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import VfioUserServer, argv_of, guest, wait_exec, wait_for
from minivmm.devices import q35
from minivmm.machine.pci import piix_irq
from minivmm.vmprocess import qmp_connect

QEMU = os.environ.get("MINIVMM_QEMU") or shutil.which("qemu-system-x86_64") or "/tmp/qemu-peer/qemu-system-x86_64"
HAVE_QEMU = os.access(QEMU, os.X_OK)
RAM = ["-object", "memory-backend-memfd,id=ram0,size=64M,share=on", "-machine", "memory-backend=ram0", "-m", "64M"]
EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


def guest_args(
    server: VfioUserServer, rounds: int, serial: Path | None = None, irq: str = "msi", exit: bool = True
) -> list[str]:
    """timer.elf's DMA rounds through the device, their interrupts by ``irq``: msi, msix or intx;
    ``exit``: with isa-debug-exit, which ends the VMM when the guest is done."""
    return [
        "-kernel",
        guest("timer.elf"),
        "-append",
        f"vfiouser {rounds}" + ("" if irq == "msi" else f" {irq}"),
        *RAM,
        "-device",
        f"vfio-user-pci,id=vu0,socket={server.socket}",
        *(EXIT if exit else []),
        *(["-serial", f"file:{serial}"] if serial else []),
    ]


def rounds_done(serial: Path) -> int:
    found = re.findall(r"timer: vfiouser round=(\d+)", serial.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def test_the_guest_runs_dma_and_msis_through_the_device(vmm, server):
    r = vmm.run(*guest_args(server, 300), timeout=120)
    assert "timer: vfiouser id=4d565531" in r.stdout, r.stderr
    assert "timer: vfiouser rounds=300 irqs=300 counter=300" in r.stdout, r.stdout + r.stderr
    assert r.status == 33
    wait_for(lambda: ("1", "gone") in server.clients(), what="the server to see minivmm go")
    assert server.clients() == [("1", "connected"), ("1", "gone")]


def test_msix_vectors_wait_in_the_pending_bits_while_masked(vmm, server):
    """MSI-X vector 0, its table and pending bits in the device's 64-bit BAR2, emulated by minivmm:
    a transfer's interrupt while the guest masks the vector waits (its pending bit set, nothing
    delivered) and comes at the unmask; then every round's interrupt arrives."""
    r = vmm.run(*guest_args(server, 300, irq="msix"), timeout=120)
    assert "timer: vfiouser msix pending=1 early=0 delivered=1" in r.stdout, r.stdout + r.stderr
    assert "timer: vfiouser rounds=300 irqs=300 counter=301" in r.stdout, r.stdout + r.stderr
    assert r.status == 33


# The device is in slot 1 (the first free one): its INTA's GSI as each chipset routes it.
@pytest.mark.parametrize("machine, line", [("pc", piix_irq(1, 1)), ("q35", q35.pirq_gsi(1, 1))])
def test_intx_reaches_the_guest_through_the_ioapic_and_is_unmasked_at_its_eoi(vmm, server, machine, line):
    """INTx: level-triggered on the pin's GSI through a resampling irqfd; the device masks itself
    when it fires and the guest's EOI unmasks it, so each round's interrupt comes exactly once."""
    r = vmm.run(*guest_args(server, 300, irq="intx"), "-M", machine, timeout=120)
    assert f"timer: vfiouser intx line={line}\n" in r.stdout, r.stdout + r.stderr
    assert "timer: vfiouser rounds=300 irqs=300 counter=300" in r.stdout, r.stdout + r.stderr
    assert r.status == 33


def test_without_kvms_ioapic_the_function_has_no_interrupt_pin(vmm, server):
    """kernel-irqchip=split: minivmm's IOAPIC cannot tell the device the guest's EOI, so the function
    shows no INTx pin (the guest says so); MSI-X, which KVM routes itself, still works."""
    split = ["-M", "kernel-irqchip=split"]
    r = vmm.run(*guest_args(server, 20, irq="intx"), *split, timeout=120)
    assert "timer: vfiouser no INTx" in r.stdout, r.stdout + r.stderr
    r = vmm.run(*guest_args(server, 20, irq="msix"), *split, timeout=120)
    assert "timer: vfiouser rounds=20 irqs=20 counter=21" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    "mode, irq",
    [
        ("cpr-exec", "msi"),
        ("cpr-transfer", "msi"),
        ("cpr-exec", "msix"),
        ("cpr-exec", "intx"),
        ("cpr-transfer", "intx"),
    ],
)
def test_the_device_keeps_its_connection_through_a_live_update(qmp_vm, vmm, server, tmp_path, mode, irq):
    """The update comes while the guest runs DMA: the rounds go on in the new VMM, every round's
    interrupt arrives (irqs == rounds), the device's count of transfers was never reset, and the
    server saw one client only."""
    serial, rounds = tmp_path / "serial.log", 15000  # about 10 s here: the update comes early on
    args = guest_args(server, rounds, serial, irq)
    vm = qmp_vm(*args)
    pci = vm.cmd("query-pci")["return"][0]["devices"]
    dev = next(d for d in pci if d["id"]["vendor"] == 0x1234 and d["id"]["device"] == 0x4D56)
    regions = [(r["bar"], r["size"], r["mem_type_64"]) for r in dev["regions"]]
    assert regions == [(0, 0x1000, False), (2, 0x1000, True), (6, 0x800, False)]  # 6: the ROM
    wait_for(lambda: rounds_done(serial) >= 100, timeout=120, what="the guest's first 100 rounds")
    if mode == "cpr-exec":
        state = tmp_path / "vm.state"
        new = [*argv_of(vm, *args), "-incoming", f"file:{state}"]
        vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": new})
        assert vm.cmd("migrate", uri=f"file:{state}") == {"return": {}}
        wait_exec(vm.qmp)
        target, pid = qmp_connect(vm.socket), vm.proc.pid
    else:
        main, cpr, dst_qmp = tmp_path / "main.sock", tmp_path / "cpr.sock", tmp_path / "dst.qmp"
        cpr_channel = f'{{"channel-type": "cpr", "addr": {{"transport": "socket", "type": "unix", "path": "{cpr}"}}}}'
        dst = vmm.start(
            *args, "-qmp", f"unix:{dst_qmp},server=on,wait=off", "-incoming", f"unix:{main}", "-incoming", cpr_channel
        )
        wait_for(cpr.exists, what="the target's cpr channel")
        vm.cmd("migrate-set-parameters", mode="cpr-transfer")
        channels = [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main)}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}},
        ]
        assert vm.cmd("migrate", channels=channels) == {"return": {}}
        wait_for(dst_qmp.exists, what="the target's monitor")
        target, pid = qmp_connect(str(dst_qmp)), dst.pid
    try:
        wait_for(lambda: target.cmd("query-status")["status"] == "running", timeout=30, what="the guest running")
        at_update = rounds_done(serial)
        wait_for(lambda: rounds_done(serial) >= at_update + 500, timeout=120, what="rounds after the update")
        assert pid and target.cmd("query-pci")[0]["devices"][-1]["id"]["device"] == 0x4D56
    finally:
        target.close()
    last = re.compile(r"timer: vfiouser rounds=(\d+) irqs=(\d+) counter=(\d+)\n")
    done = wait_for(lambda: last.search(serial.read_text(errors="replace")), timeout=120, what="the last round")
    extra = 1 if irq == "msix" else 0  # the guest's transfer with the vector masked, before the rounds
    assert done.groups() == (str(rounds), str(rounds), str(rounds + extra))  # none lost, the device never reset
    # one connection, kept: never a second client (the guest has exited by now, so it may be gone)
    assert [c for c in server.clients() if c[1] == "connected"] == [("1", "connected")]


def test_a_normal_migration_is_refused_with_qemus_words(qmp_vm, server, tmp_path):
    vm = qmp_vm(*guest_args(server, 1000000, tmp_path / "serial.log"))
    err = vm.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")["error"]["desc"]
    assert err == "vu0: VFIO device doesn't support migration"
    assert vm.status() == "running"


def test_a_server_that_goes_away_leaves_the_guest_and_the_vmm_running(qmp_vm, server, tmp_path):
    """The device is detached (it reads all ones) and says so once; the guest carries on: after a
    system_reset it boots again and finds the function, whose BAR now answers all ones. Without
    debug-exit and with -no-shutdown, so that a guest that notices the dead device first (its DMA
    status reads all ones: "bad round", then a power-off) leaves the VMM up for the reset too."""
    serial = tmp_path / "serial.log"
    vm = qmp_vm(*guest_args(server, 1000000, serial, exit=False), "-no-shutdown")
    wait_for(lambda: rounds_done(serial) >= 100, timeout=120, what="the guest's first 100 rounds")
    server.kill()
    vm.cmd("system_reset")

    def booted_again() -> bool:
        if "id=ffffffff" in serial.read_text(errors="replace"):
            return True
        status = vm.status()  # the guest may have powered off around the reset: reset it (again) and run it
        if status == "shutdown":
            vm.cmd("system_reset")
        elif status == "prelaunch":
            vm.cmd("cont")
        return False

    wait_for(booted_again, timeout=60, interval=0.2, what="the detached device")
    assert vm.proc.poll() is None
    assert vm.cmd("query-pci")["return"][0]["devices"][-1]["id"]["device"] == 0x4D56  # the shadow answers
    vm.cmd("quit")
    vm.proc.wait(timeout=20)
    assert vm.proc.stderr.read().decode().count("vfio-user-pci 'vu0': the vfio-user server is gone") == 1


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["-device", "vfio-user-pci,socket=/nonexistent/dev.sock"],
            "-device vfio-user-pci,socket=/nonexistent/dev.sock: Failed to connect to '/nonexistent/dev.sock': "
            "No such file or directory",
        ),
    ],
)
def test_a_socket_nobody_serves_is_one_line(vmm, args, line):
    r = vmm.run("-kernel", guest("timer.elf"), *RAM, *args)
    assert r.status == 1 and r.stderr.strip() == f"minivmm: {line}", r.stderr


def test_guest_ram_the_server_cannot_map_is_refused(vmm, server):
    r = vmm.run("-kernel", guest("timer.elf"), "-m", "64M", "-device", f"vfio-user-pci,socket={server.socket}")
    assert r.status == 1
    assert "RAM block 'pc.ram' has no shared memfd for the server to map" in r.stderr, r.stderr


@pytest.mark.skipif(not HAVE_QEMU, reason="no QEMU to compare with (set MINIVMM_QEMU)")
@pytest.mark.parametrize("irq", ["msi", "msix", "intx"])
def test_qemus_vfio_user_client_runs_the_same_guest_on_the_same_server(vmm, server, tmp_path, irq):
    """The same lines from QEMU's client, but for the MSI-X pending bit: QEMU leaves a masked
    vector's interrupt in the eventfd without setting the bit, minivmm reads the eventfd for it."""
    device = f'{{"driver": "vfio-user-pci", "socket": {{"type": "unix", "path": "{server.socket}"}}}}'
    qemu_args = guest_args(server, 300, irq=irq)[:4] + [*RAM, "-device", device, *EXIT]
    proc = subprocess.run(
        [QEMU, "-accel", "kvm", "-nodefaults", "-display", "none", "-serial", "stdio", *qemu_args],
        capture_output=True,
        timeout=120,
        start_new_session=True,
    )
    out = proc.stdout.decode()
    assert "timer: vfiouser id=4d565531" in out, proc.stderr.decode()
    assert "timer: vfiouser rounds=300 irqs=300" in out
    ours = vmm.run(*guest_args(server, 300, irq=irq), timeout=120)

    def lines(text: str) -> list[str]:
        return [re.sub(r" pending=\d", "", line) for line in text.splitlines() if "vfiouser" in line]

    assert lines(ours.stdout) == lines(out)
    assert "pending=1" in ours.stdout or irq != "msix"


def fake_wiring(table, block, routes: dict, irqfds: dict):
    """A function's wiring without a VM: 1 MiB of RAM, GSIs from 24, routes and irqfds kept in dicts."""
    from minivmm.devices.vfio_user_pci import Wiring
    from minivmm.memory import Mapping

    def add_irqfd(gsi, fd, resample=None):
        irqfds[fd] = (gsi, resample)

    ram = [Mapping(0, 1 << 20, block, 0)]

    def remove_irqfd(fd):
        irqfds.pop(fd, None)

    return Wiring(table, ram, lambda n: list(range(24, 24 + n)), routes.__setitem__, add_irqfd, remove_irqfd)


def test_odd_guest_accesses_neither_raise_nor_detach_the_device(server):
    """The function in-process, on the real server: a configuration write cut short at the end of
    the space (a 32-bit value in 2 bytes), an access that runs past BAR0's end, and one the server
    refuses each fail alone; the device still answers after them."""
    from minivmm.cpr.fdtable import FdTable
    from minivmm.devices.vfio_user_pci import VfioUserPci
    from minivmm.memory import RamBlock

    block = RamBlock.memfd("pc.ram", 1 << 20, shared=True)
    routes, irqfds = {}, {}
    fn = VfioUserPci("vu0", server.socket, fake_wiring(FdTable(), block, routes, irqfds))
    try:
        bar = fn.bars[0].device
        assert bar.read(0, 4) == 0x4D565531
        fn.write_config(0xFE, 2, 0xFFFFFFFF)  # what a 4-byte ECAM write at 0xfe becomes
        assert bar.read(0xFFE, 4) == 0xFFFFFFFF and not fn.link.dead  # past the end: all ones
        assert fn.link.call(lambda c: c.region_read(9, 0, 4), b"refused") == b"refused"  # an error reply
        assert not fn.link.dead and bar.read(0, 4) == 0x4D565531
        msi = fn.msi_cap
        fn.write_config(msi + 4, 4, 0xFEE00000)
        fn.write_config(msi + 12, 2, 0x52)
        fn.write_config(msi + 2, 2, 1)  # enable: routed and bound, the eventfd given to the server
        assert routes[24] == (0xFEE00000, 0x52) and irqfds == {fn.irqs.vectors[0].fd: (24, None)}
        fn.write_config(msi + 2, 2, 0)
        assert routes[24] is None and irqfds == {}
    finally:
        fn.close()
        block.close()


def test_the_functions_vmstate_carries_the_shadow_and_msi_to_the_next_image(server):
    """What a CPR does with the function, in-process on the real server: the first image programs MSI
    and saves its 'vfio-pci' section; a second function built over the same CPR table takes the kept
    connection (no new client, no reset: the scratch register keeps its value), loads the section and
    has the shadow, the MSI route and the irqfd back. A section whose MSI message the shadow does
    not give is refused by name."""
    from minivmm.cpr.fdtable import FdTable
    from minivmm.devices.vfio_user_pci import VfioUserPci
    from minivmm.memory import RamBlock
    from minivmm.vmstate import VMStateError

    block = RamBlock.memfd("pc.ram", 1 << 20, shared=True)
    table = FdTable()
    routes, irqfds = {}, {}
    first = VfioUserPci("vu0", server.socket, fake_wiring(table, block, routes, irqfds))
    second = None
    try:
        first.bars[0].device.write(0x08, 4, 0x5CA7C4)  # SCRATCH
        msi = first.msi_cap
        first.write_config(msi + 4, 4, 0xFEE01000)
        first.write_config(msi + 12, 2, 0x41)
        first.write_config(msi + 2, 2, 1)
        state = first.save_state()
        assert (state["msi_enabled"], state["msi_address"], state["msi_data"]) == (True, 0xFEE01000, 0x41)
        first.close()
        routes.clear(), irqfds.clear()
        second = VfioUserPci("vu0", server.socket, fake_wiring(table, block, routes, irqfds))  # the connection: kept
        msi_fd = second.irqs.vectors[0].fd
        assert msi_fd == first.irqs.vectors[0].fd and routes == {}  # nothing routed before the load
        second.load_state(state)
        assert bytes(second.config) == state["config"]
        assert routes[24] == (0xFEE01000, 0x41) and irqfds == {msi_fd: (24, None)}
        assert second.bars[0].device.read(0x08, 4) == 0x5CA7C4  # never reset
        assert [c for c in server.clients() if c[1] == "connected"] == [("1", "connected")]
        bad = dict(state, msi_data=0x42)
        with pytest.raises(VMStateError, match="vfio-pci/msi_address"):
            second.load_state(bad)
    finally:
        (second or first).close()
        block.close()


def test_msix_table_pending_bits_and_function_mask_in_process(server):
    """The MSI-X capability of the real server, in-process: the table (in BAR2, a 64-bit BAR) starts
    masked; enabling MSI-X routes nothing until a vector is unmasked; an interrupt the device raises
    on a masked vector sets its pending bit and nothing is bound; unmasking binds the vector's
    irqfd on its own GSI with its message; the function mask unbinds every vector; the table goes
    in the state and comes back in a second image, and a table of another size is refused."""
    from minivmm.cpr.fdtable import FdTable
    from minivmm.devices.vfio_function import MSIX_ENABLE, MSIX_MASKALL
    from minivmm.devices.vfio_user_pci import VfioUserPci
    from minivmm.memory import RamBlock
    from minivmm.vfio_user import sample
    from minivmm.vmstate import VMStateError

    block, table = RamBlock.memfd("pc.ram", 1 << 20, shared=True), FdTable()
    routes, irqfds = {}, {}
    fn = VfioUserPci("vu0", server.socket, fake_wiring(table, block, routes, irqfds))
    second = None
    try:
        m = fn.msix
        assert (m.vectors, m.table_bar, m.table_offset, m.pba_bar, m.pba_offset) == (2, 2, 0, 2, 0x800)
        assert fn.bars[2].wide and fn.bars[3] is None
        bar2, bar0 = fn.bars[2].device, fn.bars[0].device
        assert [bar2.read(16 * n + 12, 4) for n in range(2)] == [1, 1]  # vector control: masked
        fn.write_config(m.cap + 2, 2, MSIX_ENABLE)
        assert routes == {} and irqfds == {}
        bar2.write(16, 8, 0xFEE00000)  # vector 1: address, data, still masked
        bar2.write(24, 4, 0x61)
        bar0.write(sample.IRQ_RAISE, 4, sample.IRQ_SOFT)  # the device raises vector 1
        wait_for(lambda: bar2.read(0x800, 8) == 0b10, what="vector 1's pending bit")
        assert irqfds == {}
        bar2.write(28, 4, 0)  # unmasked: bound on its GSI, the waiting interrupt delivered by KVM then
        vector1 = fn.irqs.vectors[1]
        assert routes[25] == (0xFEE00000, 0x61) and irqfds == {vector1.fd: (25, None)}
        assert bar2.read(0x800, 8) == 0  # bound: nothing pends in minivmm's view
        state = fn.save_state()
        assert state["msix_table"] == bytes(fn.msix_table) and not state["msi_enabled"]
        fn.write_config(m.cap + 2, 2, MSIX_ENABLE | MSIX_MASKALL)
        assert irqfds == {} and routes[25] is None
        fn.close()
        routes.clear(), irqfds.clear()
        second = VfioUserPci("vu0", server.socket, fake_wiring(table, block, routes, irqfds))
        second.load_state(state)
        assert routes == {25: (0xFEE00000, 0x61)} and irqfds == {vector1.fd: (25, None)}
        with pytest.raises(VMStateError, match="vfio-pci/msix_table: 16 bytes"):
            second.load_state(dict(state, msix_table=bytes(16)))
        second.load_state(dict(state, msix_table=b""))  # a version 1 section (MSI-X was hidden): all masked
        assert routes == {25: None} and irqfds == {}
    finally:
        (second or fn).close()
        block.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_random_configuration_and_bar_accesses_leave_the_function_working(server, seed):
    """A bounded fuzz of what a guest can do to the function, in-process on the real server: any
    configuration write (BARs, command, MSI and MSI-X control), any access of any size to BAR0 and
    to BAR2's MSI-X table and pending bits. Nothing raises, the connection stays, and afterwards the
    device still answers and a reset brings the shadow back to firmware's."""
    import random

    from minivmm.cpr.fdtable import FdTable
    from minivmm.devices.vfio_user_pci import VfioUserPci
    from minivmm.memory import RamBlock

    rng = random.Random(seed)
    block, routes, irqfds = RamBlock.memfd("pc.ram", 1 << 20, shared=True), {}, {}
    fn = VfioUserPci("vu0", server.socket, fake_wiring(FdTable(), block, routes, irqfds))
    try:
        initial = bytes(fn.config)
        windows = [fn.bars[0].device, fn.bars[2].device]
        for _ in range(2000):
            size, value = rng.choice((1, 2, 4, 8)), rng.getrandbits(64)
            if rng.random() < 0.4:
                size = min(size, 4)
                offset = rng.choice((rng.randrange(0, 256), fn.msix.cap + 2, fn.msi_cap + 2, 0x04, 0x18, 0x1C))
                fn.write_config(offset, min(size, 256 - offset), value & ((1 << (8 * size)) - 1))
            else:
                window = rng.choice(windows)
                offset = rng.choice((rng.randrange(0, 0x1010), rng.randrange(0, 32), 0x800))
                if rng.random() < 0.5:
                    window.read(offset, size)
                else:  # a DMA it starts is checked against the 1 MiB mapped, as any
                    window.write(offset, size, value & ((1 << (8 * size)) - 1))
        assert not fn.link.dead
        assert fn.bars[0].device.read(0, 4) == 0x4D565531
        fn.reset()
        assert bytes(fn.config) == initial and routes.get(24) is None and irqfds == {}
    finally:
        fn.close()
        block.close()


def test_a_route_kvm_refuses_is_one_line_and_the_function_works_on(server, capsys):
    """Whatever message the guest programs, a refusal of its route (KVM's EINVAL here) costs that
    vector alone: the configuration write returns, one line names the function and the vector, and
    the next message the guest writes is routed."""
    import errno

    from minivmm.cpr.fdtable import FdTable
    from minivmm.devices.vfio_user_pci import VfioUserPci
    from minivmm.memory import RamBlock

    block, routes, irqfds = RamBlock.memfd("pc.ram", 1 << 20, shared=True), {}, {}
    wiring = fake_wiring(FdTable(), block, routes, irqfds)

    def set_route(gsi, route):
        if route is not None and route[0] == 0xBAD00000:
            raise OSError(errno.EINVAL, "Invalid argument")
        routes[gsi] = route

    wiring.set_route = set_route
    fn = VfioUserPci("vu0", server.socket, wiring)
    try:
        msi = fn.msi_cap
        fn.write_config(msi + 4, 4, 0xBAD00000)
        fn.write_config(msi + 2, 2, 1)
        assert irqfds == {} and "vfio-user-pci 'vu0': vector 0 (GSI 24)" in capsys.readouterr().err
        fn.write_config(msi + 4, 4, 0xFEE00000)
        assert routes[24] == (0xFEE00000, 0) and irqfds == {fn.irqs.vectors[0].fd: (24, None)}
    finally:
        fn.close()
        block.close()


def test_the_expansion_rom_is_sized_enabled_and_read_where_the_guest_puts_it(server):
    """The device's ROM region behind the ROM BAR: firmware gives it an address and leaves it off;
    sizing answers its 2 KiB; enabled (with memory decoding), the machine's memory bus reads the
    image from the server at that address; writes there change nothing; query-pci lists it as 6."""
    from minivmm.cli import parse
    from minivmm.devices.bus import UNCLAIMED
    from minivmm.devices.pci import ROM_ADDRESS, ROM_ENABLE
    from minivmm.machine import Machine
    from minivmm.machine.pci import describe
    from minivmm.vfio_user import sample

    args = ["-kernel", guest("abwalk.elf"), *RAM, "-device", f"vfio-user-pci,socket={server.socket}"]
    m = Machine(parse(args).config)
    try:
        fn, mmio = m.devices.vfio_user[0], m.devices.mmio
        at = fn.rom.address
        assert at and fn.read_config(ROM_ADDRESS, 4) == at and mmio.lookup(at)[0] is UNCLAIMED  # off
        fn.write_config(ROM_ADDRESS, 4, 0xFFFFFFFE)
        assert fn.read_config(ROM_ADDRESS, 4) == 0xFFFFF800  # 2 KiB
        fn.write_config(ROM_ADDRESS, 4, at | ROM_ENABLE)
        assert mmio.read(at, 2) == 0xAA55 and mmio.read(at + 0x20, 4) == int.from_bytes(b"PCIR", "little")
        text = bytes(mmio.read(at + 0x40 + i, 1) for i in range(len(sample.ROM_TEXT)))
        assert text == sample.ROM_TEXT
        mmio.write(at, 4, 0)
        assert mmio.read(at, 2) == 0xAA55
        rom = {
            "bar": 6,
            "type": "memory",
            "address": at,
            "size": sample.ROM_SIZE,
            "prefetch": False,
            "mem_type_64": False,
        }
        assert rom in describe(fn)["regions"]
        fn.write_config(ROM_ADDRESS, 4, at)
        assert mmio.lookup(at)[0] is UNCLAIMED
    finally:
        m.close()


def test_the_device_is_told_the_command_register_the_bus_gave_it(server):
    """The bus plays firmware in the shadow (decoding and bus mastering on); a guest that reads them on
    never writes them, so the device must hear them from minivmm: at start-up and after each reset."""
    from minivmm.cli import parse
    from minivmm.devices.pci import CMD_IO, CMD_MASTER, CMD_MEMORY, COMMAND
    from minivmm.machine import Machine
    from minivmm.vfio import constants as vc

    args = ["-kernel", guest("abwalk.elf"), *RAM, "-device", f"vfio-user-pci,socket={server.socket}"]
    m = Machine(parse(args).config)
    try:
        fn = m.devices.vfio_user[0]

        def device_command() -> int:
            data = fn.link.call(lambda t: t.region_read(vc.VFIO_PCI_CONFIG_REGION_INDEX, COMMAND, 2))
            return int.from_bytes(data, "little")

        firmware = CMD_IO | CMD_MEMORY | CMD_MASTER
        assert fn.read_config(COMMAND, 2) == firmware and device_command() == firmware
        fn.write_config(COMMAND, 2, 0)
        assert device_command() == 0
        m.devices.reset_all()
        assert fn.read_config(COMMAND, 2) == firmware and device_command() == firmware
    finally:
        m.close()

"""The README's main job: `minivmm demo` on real KVM."""

import re


def test_demo_updates_a_running_guest_and_checks_it(vmm):
    r = vmm.run("demo", "--ram", "128M", "--updates", "2", timeout=180)
    assert r.status == 0, r
    rows = re.findall(r"^\s+(\d) +(\d+) ms \|", r.stdout, re.M)
    assert [n for n, _ in rows] == ["1", "2"]
    assert all(0 < int(ms) < 10_000 for _, ms in rows)
    assert "ok: same pid" in r.stdout and "no RAM copied" in r.stdout


def test_demo_rejects_a_bad_size(vmm):
    r = vmm.run("demo", "--ram", "lots")
    assert r.status == 2 and "--ram lots: invalid size 'lots'" in r.stderr


def test_demo_device_keeps_the_vfio_user_connection_and_every_interrupt(vmm):
    r = vmm.run("demo", "--device", "--ram", "128M", "--updates", "2", "--rounds", "8000", timeout=240)
    assert r.status == 0, r
    rows = re.findall(r"^\s+(\d) +(\d+) ms \|.*\| +(\d+) -> (\d+)$", r.stdout, re.M)
    assert [n for n, *_ in rows] == ["1", "2"], r.stdout
    assert all(0 < int(ms) < 10_000 for _, ms, _, _ in rows)
    assert all(int(before) < int(after) for *_, before, after in rows)  # the DMA went on after each update
    # the guest's own count: every round's MSI arrived and the device's COUNTER never went back to 0
    assert "guest:  timer: vfiouser rounds=8000 irqs=8000 counter=8000" in r.stdout
    assert "server: minivmm-vfio-user: client 1 connected" in r.stdout and "client 2" not in r.stdout
    assert "ok: same pid" in r.stdout


def test_demo_rounds_option_errors(vmm):
    r = vmm.run("demo", "--rounds", "5000")
    assert r.status == 2 and "--rounds: only with --device" in r.stderr
    r = vmm.run("demo", "--device", "--rounds", "5")
    assert r.status == 2 and "--rounds 5: at least 400" in r.stderr

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

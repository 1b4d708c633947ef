"""A stock Debian kernel on minivmm: the cloud kernel's ELF vmlinux, taken out
of its bzImage, booted through PVH, bounded in time.

On this project's machines (nested paravirtual KVM) the kernel's CPL0 code is
emulated, so the test follows it up to its "Memory:" line (about half a
minute of guest time) and checks what it found on the way: the command
line, the e820 map minivmm gave, the ACPI tables and the MADT, the CPUs.
The kernel package comes from Debian's registry (apt-get download) once per
test session; without the registry the test is skipped, naming it.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for
from minivmm.arch.x86.boot import linux
from minivmm.arch.x86.e820 import RAM, RESERVED, memory_map

LZ4_LEGACY_MAGIC = 0x184C2102
BOOT_LIMIT_S = 240  # wall-clock bound for the boot to reach "Memory:" on this emulating host


def _lz4_legacy(data: bytes) -> bytes:
    """The kernel's LZ4 payload format: a magic, then (u32 size, block) pairs of up to 8 MiB each."""
    import lz4.block

    pos, out = 4, []
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        if n == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        block = data[pos + 4 : pos + 4 + n]
        if len(block) < n:
            break  # the trailing word is the uncompressed size, not a block
        out.append(lz4.block.decompress(block, uncompressed_size=8 << 20))
        pos += 4 + n
    return b"".join(out)


def vmlinux_from_bzimage(data: bytes) -> bytes:
    """The ELF inside a bzImage: its payload (setup header fields), decompressed."""
    kernel = linux.parse(data)
    h = kernel.header
    payload = kernel.protected[h.payload_offset : h.payload_offset + h.payload_length]
    if payload[:2] == b"\x1f\x8b":
        return gzip.decompress(payload)
    if payload[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(payload)
    if struct.unpack_from("<I", payload)[0] == LZ4_LEGACY_MAGIC:
        return _lz4_legacy(payload)
    pytest.skip(f"the kernel's payload compression ({payload[:4].hex()}) is not one this test reads")


def _run(cmd: list[str], cwd, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def debian_kernel(tmp_path_factory):
    """(the bzImage, the ELF vmlinux inside it) of Debian's newest cloud kernel."""
    if not (shutil.which("apt-get") and shutil.which("apt-cache") and shutil.which("dpkg")):
        pytest.skip("needs Debian's apt-get, apt-cache and dpkg to fetch the cloud kernel")
    where = tmp_path_factory.mktemp("debian-kernel")

    def candidates() -> list[str]:
        found = _run(["apt-cache", "pkgnames", "linux-image-"], where, 60).stdout.split()
        return sorted(n for n in found if re.fullmatch(r"linux-image-[\d.]+-\d+-cloud-amd64-unsigned", n))

    names = candidates()
    if not names:
        _run(["apt-get", "update", "-q"], where, 300)
        names = candidates()
    if not names:
        pytest.skip("needs Debian's package registry: no linux-image-*-cloud-amd64-unsigned package is listed")
    got = _run(["apt-get", "download", "-q", names[-1]], where, 300)
    debs = list(where.glob("*.deb"))
    if got.returncode or not debs:
        pytest.skip(f"needs Debian's package registry: apt-get download {names[-1]} failed: {got.stderr[-200:]}")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(where / "pkg")], check=True)
    vmlinuz = where / "vmlinuz"
    shutil.move(next((where / "pkg" / "boot").glob("vmlinuz-*")), vmlinuz)
    shutil.rmtree(where / "pkg")
    debs[0].unlink()
    vmlinux = where / "vmlinux"
    vmlinux.write_bytes(vmlinux_from_bzimage(vmlinuz.read_bytes()))
    return vmlinuz, vmlinux


def test_a_stock_debian_kernel_boots_through_pvh_to_its_memory_line(vmm, tmp_path, debian_kernel):
    log = tmp_path / "console.log"
    ram_mib, cpus = 256, 2
    start = time.monotonic()
    proc = vmm.start(
        *("-kernel", str(debian_kernel[1]), "-m", f"{ram_mib}M", "-smp", str(cpus), "-no-reboot"),
        *("-cpu", "host,-cx16,-xsave", "-serial", f"file:{log}"),
        *("-append", "console=ttyS0 earlyprintk=ttyS0"),
    )
    text = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731
    wait_for(lambda: "Memory:" in text() or proc.poll() is not None, timeout=BOOT_LIMIT_S, interval=0.5)
    wall = time.monotonic() - start
    out = text()
    assert "Memory:" in out, f"stopped after {wall:.0f} s: {out[-2000:]}\n{proc.stderr.read1().decode()}"
    assert re.search(r"Linux version \d+\.\d+", out)
    assert "Command line: console=ttyS0 earlyprintk=ttyS0" in out
    e820 = re.findall(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (usable|reserved)", out)
    kinds = {"usable": RAM, "reserved": RESERVED}
    seen = [(int(a, 16), int(b, 16) - int(a, 16) + 1, kinds[k]) for a, b, k in e820]
    given = memory_map([(0, ram_mib << 20)])
    assert [e for e in seen if e[2] == RAM] == [e for e in given if e[2] == RAM], e820
    # Linux also reserves the legacy hole between minivmm's two reserved ranges: each lies inside one of its own.
    reserved = [e for e in seen if e[2] == RESERVED]
    for base, size, _ in (e for e in given if e[2] == RESERVED):
        assert any(b <= base and base + size <= b + s for b, s, _ in reserved), (hex(base), e820)
    assert "ACPI: RSDP 0x00000000000E0000" in out
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in out
    assert f"smpboot: Allowing {cpus} CPUs" in out
    guest_s = float(re.search(r"\[\s*([\d.]+)\] Memory:", out).group(1))
    print(f"\nDebian kernel under minivmm: 'Memory:' at {guest_s:.1f} s guest time, {wall:.1f} s wall")
    os.killpg(proc.pid, 9)


# --- a whole boot, where the host virtualizes the CPU in hardware ----------------------------------

PARAVIRTUAL_KVM = "/sys/module/kvm_pvm"
INIT = b"#!/bin/sh\n/bin/busybox echo minivmm-init-ran\n/bin/busybox poweroff -f\n"


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format (newc): (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out += b"070701" + b"".join(b"%08x" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


@pytest.fixture(scope="session")
def initramfs(tmp_path_factory) -> str:
    """busybox-static (Debian's) with an init that says it ran and powers the machine off."""
    where = tmp_path_factory.mktemp("initramfs")
    got = _run(["apt-get", "download", "-q", "busybox-static"], where, 300) if shutil.which("apt-get") else None
    debs = list(where.glob("busybox-static*.deb"))
    if got is None or got.returncode or not debs:
        pytest.skip("needs Debian's package registry for busybox-static (apt-get download)")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(where / "pkg")], check=True)
    busybox = (where / "pkg" / "bin" / "busybox").read_bytes()
    directory, file, link = 0o040755, 0o100755, 0o120777
    archive = newc(
        [
            ("bin", directory, b""),
            ("bin/busybox", file, busybox),
            ("bin/sh", link, b"busybox"),
            ("dev", directory, b""),
            ("proc", directory, b""),
            ("init", file, INIT),
        ]
    )
    path = where / "initramfs.cpio.gz"
    path.write_bytes(gzip.compress(archive))
    return str(path)


def test_the_initramfs_is_a_valid_newc_archive(initramfs):
    """What the kernel unpacks: checked by GNU cpio, where it is installed."""
    if shutil.which("cpio") is None:
        pytest.skip("needs GNU cpio to list the archive")
    archive = gzip.decompress(Path(initramfs).read_bytes())
    listing = subprocess.run(["cpio", "-t"], input=archive, capture_output=True)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == ["bin", "bin/busybox", "bin/sh", "dev", "proc", "init"]


def test_a_stock_kernel_boots_its_bzimage_to_init_and_powers_off(vmm, debian_kernel, initramfs):
    """The kernel CI use: bzImage and initramfs in, the guest's verdict out as the exit status."""
    if os.path.exists(PARAVIRTUAL_KVM):
        pytest.skip(
            "needs hardware virtualization (VMX/SVM): this host's /dev/kvm is the paravirtual kvm_pvm, which "
            "emulates the kernel's CPL0 code (the decompressor alone takes minutes) and cannot run its xrstor"
        )
    r = vmm.run(
        *("-kernel", str(debian_kernel[0]), "-initrd", initramfs, "-m", "512M", "-no-reboot"),
        *("-append", "console=ttyS0 panic=-1", "-serial", "stdio"),
        timeout=120,
    )
    assert r.status == 0 and "minivmm-init-ran" in r.stdout, r

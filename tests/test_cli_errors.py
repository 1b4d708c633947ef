"""Bad input: one line naming the option and what is wrong, exit status 1, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import guest

KERNEL = ["-kernel", guest("hello32.elf")]


def _one_line_error(result, *fragments):
    assert result.status == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minivmm: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["-foo"], ["-foo: invalid option"]),
        (["-m"], ["-m: requires an argument"]),
        (["-m", "abc"], ["-m abc: invalid size 'abc'"]),
        (["-m", "64T"], ["-m 64T: cannot set up guest memory 'pc.ram'", "more than the host has"]),
        (["-smp", "0"], ["-smp 0:", "at least 1"]),
        (["-smp", "5000"], ["-smp 5000:", "between 1 and"]),
        (["-smp", "cpus=2,bogus=1"], ["-smp cpus=2,bogus=1: Invalid parameter 'bogus'"]),
        (["-cpu", "host,+nosuchfeature"], ["-cpu host,+nosuchfeature:", "unknown CPU feature 'nosuchfeature'"]),
        (["-cpu", "pentium"], ["-cpu pentium: unable to find CPU model 'pentium'"]),
        (
            ["-overcommit", "cpu-pm=on"],
            ["-overcommit cpu-pm=on: cpu-pm=on is not supported by minivmm (only cpu-pm=off)"],
        ),
        (["-overcommit", "bogus=off"], ["-overcommit bogus=off: Invalid parameter 'bogus'"]),
        (["-M", "q36"], ['-M q36: unsupported machine type: "q36"', "minivmm has pc, q35"]),
        (["-M", "pc-q35-latest"], ['-M pc-q35-latest: unsupported machine type: "pc-q35-latest"']),
        (["-machine", "q35,iommu=on"], ["-machine q35,iommu=on: Property 'q35-machine.iommu' not found"]),
        (  # QEMU's wordings: the pc machine has no place for it; IR needs minivmm's IOAPIC
            [*KERNEL, "-device", "intel-iommu"],
            ["-device intel-iommu: Parameter 'driver' expects a dynamic sysbus device type for the machine"],
        ),
        (
            [*KERNEL, "-M", "q35", "-device", "intel-iommu,intremap=on"],
            [
                "-device intel-iommu,intremap=on: Interrupt Remapping cannot work with kernel-irqchip=on, "
                "please use 'split|off'."
            ],
        ),
        (
            [*KERNEL, "-M", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=on,eim=on"],
            ["-device intel-iommu,intremap=on,eim=on: eim=on is not supported: minivmm has no x2APIC"],
        ),
        (
            [*KERNEL, "-M", "q35", "-device", "intel-iommu,eim=on"],
            ["-device intel-iommu,eim=on: eim=on cannot be selected without intremap=on"],
        ),
        (
            [*KERNEL, "-M", "q35,kernel-irqchip=split", "-device", "intel-iommu,intremap=yes"],
            ["-device intel-iommu,intremap=yes: Parameter 'intremap' does not accept value 'yes'"],
        ),
        (
            [*KERNEL, "-M", "q35,kernel-irqchip=split", "-device", "intel-iommu,aw-bits=39"],
            ["-device intel-iommu,aw-bits=39: Property 'intel-iommu.aw-bits' not found"],
        ),
        (
            [*KERNEL, "-M", "q35,kernel-irqchip=split", "-device", "intel-iommu", "-device", "intel-iommu"],
            ["-device intel-iommu: minivmm does not support multiple vIOMMUs for x86 yet."],
        ),
        (["-machine", "kernel-irqchip=off"], ["kernel-irqchip=off is not supported", "(use on or split)"]),
        (["-machine", "kernel-irqchip=maybe"], ["Parameter 'kernel-irqchip' expects 'on', 'off' or 'split'"]),
        (["-machine", "pit=sometimes"], ["-machine pit=sometimes: Parameter 'pit' expects 'on' or 'off'"]),
        (["-machine", "foo=bar"], ["-machine foo=bar: Property 'pc-machine.foo' not found"]),
        (["-machine", "memory-backend=ram0"], ["memory-backend=ram0", "'ram0' not found"]),
        (["-machine", "aux-ram-share=maybe"], ["aux-ram-share=maybe: Parameter 'aux-ram-share' expects"]),
        (["-machine", "accel=tcg"], ["accel=tcg: invalid accelerator 'tcg'"]),
        (
            ["-object", "memory-backend-memfd,id=r,size=1G", "-machine", "memory-backend=r", "-m", "512"],
            ["-m 512: Memory size does not match the size of the memory backend 'r'", "536870912", "1073741824"],
        ),
        (["-object", "memory-backend-memfd,id=r"], ["can't create backend with size 0"]),
        (
            ["-object", "memory-backend-memfd,id=r,size=1G,colour=red"],
            ["Property 'memory-backend-memfd.colour' not found"],
        ),
        (["-object", "secret,id=s"], ["invalid object type: secret"]),
        (["-object", "memory-backend-file,id=f,size=1M"], ["mem-path property not set"]),
        (["-kernel", "/nonexistent/kernel"], ["could not load kernel '/nonexistent/kernel': No such file"]),
        (["-kernel", "/etc/hostname"], ["-kernel /etc/hostname: not a multiboot, ELF64 or Linux kernel image"]),
        (["-kernel", sys.executable], ["not an executable ELF file"]),
        (["-bios", "/etc/hostname", *KERNEL], ["-kernel", "cannot be combined with -bios"]),
        (["-bios", "/nonexistent"], ["-bios /nonexistent: could not load PC BIOS '/nonexistent'"]),
        (["-initrd", "/etc/hostname"], ["-initrd /etc/hostname: only allowed with -kernel"]),
        ([*KERNEL, "-initrd", "/nonexistent/module"], ["could not load initial ram disk '/nonexistent/module'"]),
        ([*KERNEL, "-append", "x" * 5000], ["-append", "longer than 4095 bytes"]),
        ([*KERNEL, "-device", "e1000"], ["-device e1000: 'e1000' is not a valid device model name"]),
        ([*KERNEL, "-device", "isa-debug-exit,iobase=0x3fc"], ["isa-debug-exit at 0x3fc-0x3fd overlaps serial0"]),
        ([*KERNEL, "-device", "isa-debug-exit,colour=1"], ["Property 'isa-debug-exit.colour' not found"]),
        ([*KERNEL, "-serial", "tcp:localhost:4444"], ["-serial tcp:localhost:4444: 'tcp' is not a valid char driver"]),
        ([*KERNEL, "-serial", "chardev:nope"], ["-serial chardev:nope: chardev 'nope' not found"]),
        ([*KERNEL, "-serial", "file:/nonexistent/dir/log"], ["file:/nonexistent/dir/log", "Could not open"]),
        ([*KERNEL, "-display", "gtk"], ["-display gtk: Display 'gtk' is not available"]),
        ([*KERNEL, "-d", "everything"], ["-d everything: unknown log item 'everything'"]),
        (["disk.img"], ["disk.img: unexpected argument"]),
        # Values that once gave a traceback:
        ([*KERNEL, "-m", "1K"], ["-m 1K: guest RAM must be at least 1 MiB"]),
        ([*KERNEL, "-m", "9" * 5000], ["-m 99999", "(5000 characters): invalid size", "more than 24 digits"]),
        (
            [*KERNEL, "-object", "memory-backend-memfd,id=r,size=1000", "-machine", "memory-backend=r"],
            ["size=1000: size 1000 is not a multiple of the page size (4096)"],
        ),
        (
            [*KERNEL, "-object", "memory-backend-file,id=r,size=1M,mem-path=/proc", "-machine", "memory-backend=r"],
            ["mem-path=/proc: can't open backing store /proc for guest RAM"],
        ),
        ([*KERNEL, "-object", '{"a":' * 3000 + "1" + "}" * 3000], ["-object {", "nesting depth limit exceeded"]),
        ([*KERNEL, "-object", '{"qom-type": ' + "1" * 5000 + "}"], ["-object {", "JSON parse error"]),
        (
            [*KERNEL, "-chardev", "socket,id=c,fd=999,server=on", "-serial", "chardev:c"],
            ["fd=999: fd 999 is not an open socket"],
        ),
        (
            [*KERNEL, "-chardev", "socket,id=c,fd=2,server=on", "-serial", "chardev:c"],
            ["fd=2: fd 2 is not an open socket"],
        ),
        ([*KERNEL, "-qmp", "tcp:127.0.0.1:99999,server=on,wait=off"], ["port '99999' is not a number from 0 to 65535"]),
        ([*KERNEL, "-incoming", "tcp:127.0.0.1:99999"], ["port '99999' is not a number from 0 to 65535"]),
        ([*KERNEL, "-incoming", "file:/x,offset=abc"], ["Parameter 'offset' expects a non-negative integer"]),
        ([*KERNEL, "-smp", "256"], ["-smp 256: the number of CPUs must be between 1 and 254", "8-bit APIC ids"]),
        (
            [*KERNEL, "-incoming", "tcp:0.0.0.0:4444"],
            ["refusing to listen on 0.0.0.0:4444", "unauthenticated", "-global migration.x-listen-remote=on"],
        ),
        ([*KERNEL, "-global", "foo.bar=1"], ["-global foo.bar=1: Property 'foo.bar' not found"]),
        ([*KERNEL, "-global", "nodot"], ["-global nodot: give DRIVER.PROP=VALUE"]),
    ],
)
def test_bad_input_is_one_clear_line(vmm, args, fragments):
    _one_line_error(vmm.run(*args, timeout=30), *fragments)


def test_kernel_whose_segment_is_larger_than_ram_is_refused(vmm, tmp_path):
    import struct
    from pathlib import Path

    image = bytearray(Path(guest("long64.elf")).read_bytes())
    phoff = struct.unpack_from("<Q", image, 32)[0]
    struct.pack_into("<Q", image, phoff + 40, 1 << 40)  # the first segment's p_memsz: 1 TiB
    (tmp_path / "huge.elf").write_bytes(image)
    _one_line_error(vmm.run("-kernel", str(tmp_path / "huge.elf")), "does not fit in guest RAM", "is not all RAM")


def test_remote_incoming_listens_once_allowed(vmm):
    proc = vmm.start(*KERNEL, "-global", "migration.x-listen-remote=on", "-incoming", "tcp:0.0.0.0:0")
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        pass  # still waiting for a stream: it listens
    assert proc.poll() is None, proc.stderr.read().decode()


def test_bzimage_with_an_empty_header_is_one_line(vmm, tmp_path):
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    (tmp_path / "bzImage").write_bytes(image)
    _one_line_error(vmm.run("-kernel", str(tmp_path / "bzImage")), "Linux boot protocol 0.00 is too old")


def _run_in_private_mount_namespace(setup: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    """Run minivmm after ``setup`` (Python) changed /dev in a private mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root and util-linux unshare/setpriv to change /dev/kvm in a private mount namespace")
    code = f"import os, subprocess, sys\n{setup}\n"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_kvm_device_missing(tmp_path):
    # An empty tmpfs over /dev: /dev/kvm really is missing.
    setup = (
        "subprocess.run(['mount', '-t', 'tmpfs', 'none', '/dev'], check=True)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'minivmm', *sys.argv[1:]])"
    )
    r = _run_in_private_mount_namespace(setup, KERNEL, tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (
        1,
        "",
        "minivmm: Could not access KVM kernel module: No such file or directory (/dev/kvm)\n",
    )


def test_kvm_device_not_accessible(tmp_path):
    # A mode-000 copy of the device node over /dev/kvm, and root without CAP_DAC_OVERRIDE.
    setup = (
        "node = os.path.join(os.getcwd(), 'kvm-node')\n"
        "os.mknod(node, 0o020000, os.stat('/dev/kvm').st_rdev)\n"
        "os.chmod(node, 0)\n"
        "subprocess.run(['mount', '--bind', node, '/dev/kvm'], check=True)\n"
        "os.execvp('setpriv', ['setpriv', '--bounding-set', '-dac_override,-dac_read_search',"
        " sys.executable, '-m', 'minivmm', *sys.argv[1:]])"
    )
    r = _run_in_private_mount_namespace(setup, KERNEL, tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (
        1,
        "",
        "minivmm: Could not access KVM kernel module: Permission denied (/dev/kvm)\n",
    )


@pytest.mark.parametrize("flag,text", [("-version", "minivmm version"), ("-help", "usage: minivmm")])
def test_version_and_help(vmm, flag, text):
    r = vmm.run(flag)
    assert r.status == 0 and text in r.stdout


def test_what_the_kvm_unit_tests_runner_probes(vmm):
    """run_tests.sh finds a QEMU by --help, reads its version from -h's first line, looks
    for pc-testdev in -device '?', and runs every test line with _NO_FILE_4Uhere_ as the
    kernel first, expecting QEMU's "could not load kernel" (else: a premature failure)."""
    assert "QEMU" in vmm.run("--help").stdout
    first = vmm.run("-h").stdout.splitlines()[0]
    words = first.replace(".", " ").split()
    assert words[:3] == ["QEMU", "emulator", "version"] and all(w.isdigit() for w in words[3:6]), first
    listing = vmm.run("-device", "?").stdout
    assert '"pc-testdev"' in listing and 'name "isa-debug-exit", bus ISA' in listing
    assert vmm.run("-device", "help").stdout == listing
    r = vmm.run(
        *"--no-reboot -nodefaults -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 -vnc none "
        "-serial stdio -machine accel=kvm -global kvm-pit.lost_tick_policy=discard -kernel _NO_FILE_4Uhere_ "
        "-smp 2".split()
    )
    _one_line_error(r, "_NO_FILE_4Uhere_", "could not load kernel '_NO_FILE_4Uhere_'")


def test_lost_tick_policy_discard_and_vnc_none_run_a_guest(vmm):
    r = vmm.run("-global", "kvm-pit.lost_tick_policy=discard", "-vnc", "none", "-overcommit", "mem-lock=off,cpu-pm=off")
    assert r.status == 0 and "long64: work=19ec7595d3969201" in r.stdout, r
    for args, fragment in (
        (["-global", "kvm-pit.lost_tick_policy=slew"], "does not accept value 'slew' (delay or discard)"),
        (["-vnc", ":0"], "-vnc :0: minivmm has no display"),
        (["-global", "e1000.mac=x"], "Property 'e1000.mac' not found (minivmm knows: kvm-pit.lost_tick_policy"),
    ):
        _one_line_error(vmm.run(*args), fragment)

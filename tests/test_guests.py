"""Real guests on real KVM: what each guest printed, its exit status, what it
wrote to RAM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import pytest

from conftest import DEBUG_EXIT, GUEST_EXIT_OK, NO_EMULATION_FAILURE, guest, wait_for
from minivmm.machine.control import EXIT_RESET, EXIT_TRIPLE_FAULT


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --- real mode and -bios -----------------------------------------------------


@pytest.mark.parametrize("ram,cmos", [("128", "0700"), ("512M", "1f00"), ("16M", "0000")])
def test_real_mode_bios_guest_reads_ram_size_from_cmos(vmm, ram, cmos):
    r = vmm.run("-bios", guest("hello16.bin"), "-m", ram, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert r.stdout == f"hello16: hello from real mode\nhello16: cmos ext16m={cmos}\n"


# --- multiboot --------------------------------------------------------------------


def test_multiboot_guest_sees_magic_memory_cmdline_and_modules(vmm, tmp_path):
    (tmp_path / "mod1").write_text("first module\nsecond line\n")
    (tmp_path / "mod,2").write_bytes(b"x" * 5000)
    kernel = guest("hello32.elf")
    r = vmm.run("-kernel", kernel, "-append", "hi there exit=2a", "-initrd", "mod1 arg1 arg2,mod,,2", *DEBUG_EXIT)
    assert r.status == (0x2A << 1) | 1, r
    assert lines(r.stdout, "hello32: ")[:4] == [
        "hello32: protected mode",
        "hello32: magic=2badb002",
        "hello32: mem_lower=640 mem_upper=130048",
        f"hello32: cmdline={kernel} hi there exit=2a",
    ]
    assert lines(r.stdout, "hello32: mmap") == [
        "hello32: mmap base=0x0000000000000000 len=0x000000000009fc00 type=1",
        "hello32: mmap base=0x000000000009fc00 len=0x0000000000000400 type=2",
        "hello32: mmap base=0x00000000000e0000 len=0x0000000000020000 type=2",  # ACPI tables, MP table
        "hello32: mmap base=0x0000000000100000 len=0x0000000007f00000 type=1",
    ]
    assert lines(r.stdout, "hello32: mod") == [
        "hello32: mods=2",
        "hello32: mod 0 cmdline=mod1 arg1 arg2 bytes=25 first=first module",
        "hello32: mod 1 cmdline=mod,2 bytes=5000 first=" + "x" * 32,
    ]


def test_large_ram_is_split_around_the_mmio_hole(vmm):
    r = vmm.run("-kernel", guest("hello32.elf"), "-m", "4G", *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert "hello32: mem_lower=640 mem_upper=3144704" in r.stdout  # 3 GiB - 1 MiB below the hole
    assert lines(r.stdout, "hello32: mmap")[-2:] == [
        "hello32: mmap base=0x0000000000100000 len=0x00000000bff00000 type=1",
        "hello32: mmap base=0x0000000100000000 len=0x0000000040000000 type=1",
    ]


@pytest.mark.parametrize("value", [0x00, 0x01, 0x7F])
def test_debug_exit_status_is_value_shifted_or_one(vmm, value):
    r = vmm.run("-kernel", guest("hello32.elf"), "-append", f"exit={value:02x}", *DEBUG_EXIT)
    assert r.status == ((value << 1) | 1) & 0xFF


def test_serial_input_reaches_a_polling_guest(vmm):
    r = vmm.run("-kernel", guest("hello32.elf"), "-append", "echo", *DEBUG_EXIT, input=b"typed text\nq")
    assert r.status == GUEST_EXIT_OK, r
    assert r.stdout.endswith("typed text\nhello32: bye\n")


# --- long mode, CPL3 ----------------------------------------------------------------


def test_long_mode_guest_does_native_work_at_cpl3(vmm):
    r = vmm.run("-kernel", guest("long64.elf"), "-append", "hello", *DEBUG_EXIT, timeout=30)
    assert r.status == GUEST_EXIT_OK, r
    assert "long64: hello from 64-bit long mode" in r.stdout
    assert re.search(r"^long64: cpl=3 iopl=\d$", r.stdout, re.M)
    assert "long64: work=19ec7595d3969201" in r.stdout  # 200 M iterations: only quick when native
    assert "long64: mmio=ffffffff port=ff" in r.stdout  # unassigned MMIO and port read all ones
    assert "long64: cmdline=" + guest("long64.elf") + " hello" in r.stdout


def test_default_guest_boots_and_powers_off(vmm):
    r = vmm.run(timeout=30)
    assert r.status == 0, r  # ACPI power-off: no debug-exit device given
    assert r.stdout.startswith("long64: hello from 64-bit long mode\n")
    assert "built-in guest long64.elf" in r.stderr


def _leaf1_ecx(stdout: str) -> int:
    return int(re.search(r"long64: cpuid 1 ecx=([0-9a-f]{8})", stdout).group(1), 16)


def test_cpu_features_can_be_removed(vmm):
    base = vmm.run("-kernel", guest("long64.elf"), "-cpu", "host", *DEBUG_EXIT)
    cut = vmm.run("-kernel", guest("long64.elf"), "-cpu", "host,-cx16,x2apic=off", *DEBUG_EXIT)
    cx16, x2apic = 1 << 13, 1 << 21
    assert _leaf1_ecx(base.stdout) & (cx16 | x2apic) == cx16 | x2apic
    assert _leaf1_ecx(cut.stdout) & (cx16 | x2apic) == 0
    assert _leaf1_ecx(cut.stdout) | cx16 | x2apic == _leaf1_ecx(base.stdout)


@pytest.mark.parametrize(
    "spec,vendor",
    [("kvm64", "GenuineIntel"), ("qemu64,+x2apic", "AuthenticAMD"), ("max,vendor=MinivmmCpuId", "MinivmmCpuId")],
)
def test_named_cpu_models_and_vendor_are_what_the_guest_sees(vmm, spec, vendor):
    """Read at CPL0, where CPUID is the VMM's on every host (see long64.S). Only bits KVM
    reports as supported are the VMM's to set (the paravirtual KVM of the build machines
    passes most of the host's leaf 1 through), so the check is on x2apic, which KVM offers."""
    r = vmm.run("-kernel", guest("long64.elf"), "-cpu", spec, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert f"long64: cpuid vendor={vendor}\n" in r.stdout
    x2apic = 1 << 21
    assert bool(_leaf1_ecx(r.stdout) & x2apic) == ("x2apic" in spec or spec.startswith("max"))


def test_triple_fault_with_no_reboot_exits_with_a_message(vmm):
    r = vmm.run("-kernel", guest("long64.elf"), "-append", "fault", "-no-reboot")
    assert r.status == EXIT_TRIPLE_FAULT
    assert re.match(
        r"minivmm: vcpu0: triple fault \(KVM_EXIT_SHUTDOWN\) at RIP=0x[0-9a-f]+ CS=0x0010 base 0x0 \(long mode, CPL0\)",
        r.stderr,
    ), r.stderr
    assert "-no-reboot" in r.stderr


def test_instruction_kvm_cannot_emulate_is_an_internal_error(vmm):
    r = vmm.run("-kernel", guest("long64.elf"), "-append", "badinsn")
    assert r.status == 1
    if "xgetbv returned" in r.stdout:
        pytest.skip(NO_EMULATION_FAILURE)
    m = re.match(r"minivmm: vcpu0: KVM internal error, suberror 1 \(emulation failure\) at RIP=(0x[0-9a-f]+)", r.stderr)
    assert m, r.stderr
    assert "code: 0f 01 d0" in r.stderr  # xgetbv's encoding, read from guest memory at RIP
    assert len(r.stderr.strip().splitlines()) == 1


# --- reset ------------------------------------------------------------------------


def test_i8042_reset_reboots_the_guest(vmm):
    r = vmm.run("-kernel", guest("hello32.elf"), "-append", "reboot", *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert lines(r.stdout, "hello32: boot") == ["hello32: boot 1", "hello32: boot 2"]
    assert r.stdout.count("hello32: protected mode") == 2  # the kernel ran again from its entry


def test_i8042_reset_with_no_reboot_exits(vmm):
    r = vmm.run("-kernel", guest("hello32.elf"), "-append", "reboot", "-no-reboot", *DEBUG_EXIT)
    assert r.status == EXIT_RESET, r
    assert r.stderr == "minivmm: the guest reset the machine; -no-reboot was given, so minivmm exits\n"
    assert lines(r.stdout, "hello32: boot") == ["hello32: boot 1"]


# --- SMP and interrupts ------------------------------------------------------------------


@pytest.mark.parametrize("ncpus", [1, 2, 4, 64])  # 64: more than the EBDA holds, the MP table is in the BIOS area
def test_smp_application_processors_start_and_report(vmm, ncpus):
    r = vmm.run("-kernel", guest("smp.elf"), "-smp", str(ncpus), *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert f"smp: mptable cpus={ncpus}" in r.stdout
    assert lines(r.stdout, "smp: ap ") == [f"smp: ap apic_id={i} up" for i in range(1, ncpus)]  # in id order
    assert f"smp: all {ncpus} cpus up" in r.stdout


def test_smp_topology_form(vmm):
    r = vmm.run("-kernel", guest("smp.elf"), "-smp", "sockets=1,cores=2,threads=1", *DEBUG_EXIT)
    assert "smp: all 2 cpus up" in r.stdout


@pytest.mark.parametrize("irqchip", ["on", "split"])  # split: through minivmm's PIC and PIT
@pytest.mark.parametrize("timer", ["pit", "lapic", "oneshot", "tscdeadline"])  # the last three: LAPIC timer modes
def test_timer_interrupts_are_delivered(vmm, timer, irqchip):
    r = vmm.run(
        "-kernel", guest("timer.elf"), "-append", f"{timer} 100", "-M", f"kernel-irqchip={irqchip}", *DEBUG_EXIT
    )
    assert r.status == GUEST_EXIT_OK, r
    assert f"timer: {timer} ticks=100" in r.stdout


def test_tsc_deadline_mode_follows_the_cpu_model(vmm):
    """Without the CPUID bit the guest does not find TSC-deadline mode (CPUID read at CPL0)."""
    r = vmm.run("-kernel", guest("timer.elf"), "-append", "tscdeadline 5", "-cpu", "host,-tsc-deadline", *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK, r
    assert r.stdout == "timer: tscdeadline unsupported\n"


@pytest.mark.parametrize("irqchip", ["on", "split"])
def test_serial_receive_interrupts_through_the_irqchip(vmm, irqchip):
    args = ["-kernel", guest("timer.elf"), "-append", "serial", "-M", f"kernel-irqchip={irqchip}"]
    r = vmm.run(*args, *DEBUG_EXIT, input=b"abq")
    assert r.status == GUEST_EXIT_OK, r
    assert lines(r.stdout, "timer: ") == ["timer: got a", "timer: got b", "timer: got q", "timer: serial done"]


# --- chardevs -------------------------------------------------------------------------------


def test_serial_to_file(vmm, tmp_path):
    log = tmp_path / "serial.log"
    r = vmm.run("-kernel", guest("hello32.elf"), "-serial", f"file:{log}", *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK and r.stdout == ""
    assert log.read_text().startswith("hello32: protected mode\n")


def test_named_chardev_file_append(vmm, tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("earlier\n")
    args = ["-chardev", f"file,id=log,path={log},append=on", "-serial", "chardev:log"]
    r = vmm.run("-kernel", guest("hello32.elf"), *args, *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK
    assert log.read_text().startswith("earlier\nhello32: protected mode\n")


def test_serial_null_and_none(vmm):
    for backend in ("null", "none"):
        r = vmm.run("-kernel", guest("hello32.elf"), "-serial", backend, *DEBUG_EXIT)
        assert (r.status, r.stdout) == (GUEST_EXIT_OK, "")


def test_serial_unix_socket_server(vmm, tmp_path):
    path = tmp_path / "serial.sock"
    proc = vmm.start(
        "-kernel", guest("hello32.elf"), "-append", "echo", "-serial", f"unix:{path},server=on,wait=on", *DEBUG_EXIT
    )
    wait_for(path.exists, what="the serial socket")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.settimeout(20)
        got = b""
        while b"hello32: mods=0\n" not in got:
            got += client.recv(4096)
        client.sendall(b"over the socket\nq")
        while b"bye" not in got:
            got += client.recv(4096)
    assert proc.wait(20) == GUEST_EXIT_OK
    assert b"over the socket\nhello32: bye" in got


# --- process control ----------------------------------------------------------------------------


def test_pidfile_and_sigterm(vmm, tmp_path):
    pidfile = tmp_path / "vm.pid"
    proc = vmm.start("-kernel", guest("abwalk.elf"), "-pidfile", str(pidfile), "-name", "walker")
    assert proc.stdout.read(1) == b"A"
    assert int(pidfile.read_text()) == proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "terminating on signal 15" in proc.stderr.read().decode()
    assert not pidfile.exists()


# --- RAM backends ---------------------------------------------------------------------------------


def _ram_fd_and_map(pid: int, name: str) -> tuple[str, str]:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == f"/memfd:{name} (deleted)":
            with open(f"/proc/{pid}/maps") as f:
                perms = next(line.split()[1] for line in f if f"/memfd:{name}" in line)
            return f"/proc/{pid}/fd/{fd}", perms
    pytest.fail(f"no memfd named {name} in process {pid}")


@pytest.mark.parametrize(
    "args,name,shared",
    [
        (["-m", "64"], "pc.ram", False),
        (["-m", "64", "-machine", "aux-ram-share=on"], "pc.ram", True),
        (["-object", "memory-backend-memfd,id=ram0,size=64M", "-machine", "memory-backend=ram0"], "ram0", True),
        (
            [
                "-object",
                '{"qom-type":"memory-backend-memfd","id":"j","size":67108864,"share":false}',
                "-machine",
                "pc,memory-backend=j",
                "-m",
                "64M",
            ],
            "j",
            False,
        ),
    ],
)
def test_ram_is_a_named_memfd(vmm, args, name, shared):
    proc = vmm.start("-kernel", guest("abwalk.elf"), *args)
    assert proc.stdout.read(2) == b"AB"
    path, perms = _ram_fd_and_map(proc.pid, name)
    assert perms.endswith("s" if shared else "p"), perms
    assert os.stat(path).st_size == 64 << 20
    fd = os.open(path, os.O_RDONLY)
    try:
        walked = os.pread(fd, 1, 0x200000)  # the first byte of the first walked page
        assert (walked != b"\0") == shared  # shared: the memfd's pages are the guest's RAM
    finally:
        os.close(fd)


def test_file_backend_holds_guest_ram(vmm, tmp_path):
    ram = tmp_path / "guest.ram"
    args = ["-object", f"memory-backend-file,id=f,size=32M,mem-path={ram},share=on", "-machine", "memory-backend=f"]
    proc = vmm.start("-kernel", guest("abwalk.elf"), "-append", "every=1", *args)
    assert proc.stdout.read(3) == b"ABB"
    assert ram.stat().st_size == 32 << 20
    with open(ram, "rb") as f:
        f.seek(0x1FF000)
        assert f.read(4) == b"ABWK"  # the walker's status block, written by the guest


def test_the_multiboot_walker_enters_long_mode_itself_and_walks(vmm):
    """abwalk-mb.elf: the walker behind an ELF32 multiboot entry (what QEMU's -kernel takes),
    which maps 8 GiB and enters long mode itself; its status block counts passes."""
    args = ["-object", "memory-backend-memfd,id=ram0,size=64M,share=on", "-machine", "memory-backend=ram0", "-m", "64M"]
    proc = vmm.start("-kernel", guest("abwalk-mb.elf"), "-append", "every=1", *args)
    assert proc.stdout.read(3) == b"ABB"
    path, _ = _ram_fd_and_map(proc.pid, "ram0")
    with open(path, "rb") as f:
        f.seek(0x1FF000)
        status = f.read(32)
    assert status[:4] == b"ABWK" and int.from_bytes(status[8:16], "little") >= 2  # passes


def test_hugetlb_memfd(vmm):
    with open("/proc/sys/vm/nr_hugepages") as f:
        hugepages = int(f.read())
    r = vmm.run(
        "-object",
        "memory-backend-memfd,id=h,size=4M,hugetlb=on",
        "-machine",
        "memory-backend=h",
        "-kernel",
        guest("hello32.elf"),
        "-m",
        "4M",
        *DEBUG_EXIT,
    )
    if hugepages >= 2:
        assert r.status == GUEST_EXIT_OK, r
    else:
        assert r.status == 1
        assert r.stderr.startswith("minivmm: -object memory-backend-memfd,id=h,size=4M,hugetlb=on: ")
        assert "cannot set up guest memory 'h'" in r.stderr


# --- other boot details ----------------------------------------------------------------------------


def test_post_codes_are_traced_with_d_postcode(vmm):
    r = vmm.run("-kernel", guest("hello32.elf"), "-d", "postcode", "-serial", "null", *DEBUG_EXIT)
    assert r.status == GUEST_EXIT_OK
    codes = re.findall(r"^minivmm: post code (0x[0-9a-f]{2}) at [0-9.]+ ms$", r.stderr, re.M)
    assert codes == ["0x32", "0x33"]


def test_qemu_options_minivmm_has_nothing_to_do_for(vmm):
    r = vmm.run(
        "-kernel",
        guest("hello32.elf"),
        "-accel",
        "kvm",
        "-enable-kvm",
        "-machine",
        "pc,accel=kvm",
        "-M",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-nographic",
        "-name",
        "guest=test,debug-threads=on",
        "--m",
        "64",
        *DEBUG_EXIT,
    )
    assert r.status == GUEST_EXIT_OK, r
    assert "mem_upper=64512" in r.stdout  # --m 64 took effect


# The test guests' ending: msg to COM1, then debug-exit 0x10 (GUEST_EXIT_OK).
PRINT_MSG_AND_EXIT = r"""
    mov $msg, %esi
1:  lodsb
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
2:  mov $0x10, %al
    out %al, $0xf4
    hlt
"""

AOUT_KLUDGE_GUEST = (
    r"""
    .code32
    .text
header:                             # multiboot header with the a.out kludge (flags bit 16)
    .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    .long header                    # header_addr
    .long header                    # load_addr
    .long load_end                  # load_end_addr
    .long bss_end                   # bss_end_addr
    .long entry                     # entry_addr
entry:
    cmpl $0, bss_word               # the bss must come zeroed
    jne 2f
"""
    + PRINT_MSG_AND_EXIT
    + r"""msg: .asciz "a.out kludge ok\n"
load_end:
    .bss
bss_word: .long 0
    .space 4096
bss_end:
"""
)


def _flat_image(tmp_path, source: str, text_addr: int):
    """A 32-bit a.out-kludge multiboot image from ``source``, linked to run at ``text_addr``."""
    (tmp_path / "k.S").write_text(source)
    subprocess.run(["as", "--32", "-o", "k.o", "k.S"], cwd=tmp_path, check=True)
    link = [
        "ld",
        "-m",
        "elf_i386",
        f"-Ttext={text_addr:#x}",
        "--oformat",
        "binary",
        "-e",
        "entry",
        "-o",
        "k.bin",
        "k.o",
    ]
    subprocess.run(link, cwd=tmp_path, check=True)
    return tmp_path / "k.bin"


def test_multiboot_aout_kludge_image(vmm, tmp_path):
    image = _flat_image(tmp_path, AOUT_KLUDGE_GUEST, 0x100000).read_bytes()
    (tmp_path / "k.bin").write_bytes(image + b"\xff" * 64)  # junk past load_end must not be loaded
    r = vmm.run("-kernel", str(tmp_path / "k.bin"), *DEBUG_EXIT)
    assert (r.status, r.stdout) == (GUEST_EXIT_OK, "a.out kludge ok\n"), r


LOW_MULTIBOOT_GUEST = (
    r"""
    .code32
    .text
header:                             # loaded at 0x7000, as kvm-unit-tests' realmode.flat loads low
    .long 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    .long header, header, load_end, bss_end, entry
entry:
    cmp $0x2BADB002, %eax
    jne bad
    cmp $bss_end, %ebx              # the boot information lies outside the image
    jb bad
    cmpl $0x5A5A5A5A, marker_8000   # and nothing was written over the image
    jne bad
    cmpl $0xA5A5A5A5, marker_9000
    jne bad
"""
    + PRINT_MSG_AND_EXIT
    + r"""bad: mov $0x11, %al
    out %al, $0xf4
    hlt
msg: .asciz "low image intact\n"
    .org 0x1000
marker_8000: .long 0x5A5A5A5A
    .org 0x2000
marker_9000: .long 0xA5A5A5A5
load_end:
    .bss
    .space 4096
bss_end:
"""
)


def test_multiboot_information_goes_after_the_image_and_modules_as_qemu_places_it(vmm, tmp_path):
    kernel = _flat_image(tmp_path, LOW_MULTIBOOT_GUEST, 0x7000)
    r = vmm.run("-kernel", str(kernel), "-append", "x" * 3000, *DEBUG_EXIT)
    assert (r.status, r.stdout) == (GUEST_EXIT_OK, "low image intact\n"), r


def test_multiboot_entry_state_is_qemus(qmp_vm):
    """CS 0x10 and flat data at 0x18, paging off, EAX the magic, EBX past the kernel, and TR
    and IDTR as after reset: guests written against QEMU rely on TR's limit 0xffff."""
    vm = qmp_vm("-kernel", guest("hello32.elf"), "-S", "-serial", "null")
    regs = vm.cmd("human-monitor-command", **{"command-line": "info registers"})["return"]
    assert "EAX=2badb002 EBX=00102000" in regs  # hello32's image ends at 0x1014f0
    assert re.search(r"^CS =0010 0+ ffffffff 00c09b00", regs, re.M)
    assert re.search(r"^DS =0018 0+ ffffffff 00c09300", regs, re.M)
    assert re.search(r"^TR =0000 0+ 0000ffff 00008b00", regs, re.M)
    assert re.search(r"^IDT=\s+0+ 0000ffff", regs, re.M)
    assert "CR0=00000011" in regs

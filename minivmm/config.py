"""What a machine is made of, as parsed from the command line: plain data,
validated by cli.py, consumed by machine.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arch.x86.cpuid import CpuModel
from .arch.x86.machine_types import PC, MachineType

DEFAULT_RAM_SIZE = 128 << 20  # QEMU's default
MIN_RAM = 1 << 20  # below it there is no room for the boot structures and a kernel at 1 MiB


@dataclass
class MemoryBackendConfig:
    """-object memory-backend-{memfd,file,ram},id=ID,size=SIZE,..."""

    id: str
    kind: str  # "memfd", "file" or "ram"
    size: int
    share: bool
    hugetlb: bool = False
    mem_path: str | None = None
    prealloc: bool = False
    option: str = ""  # the option text, for error messages


@dataclass
class ChardevConfig:
    """-serial / -chardev: a back-end and its settings."""

    id: str
    backend: str  # "stdio", "file", "null", "socket" or "none"
    path: str | None = None
    host: str | None = None  # a tcp socket (monitors only)
    port: int = 0
    fd: int | None = None  # fd=N: an already listening socket
    server: bool = True
    wait: bool = False
    append: bool = False
    option: str = ""


@dataclass
class MonitorConfig:
    """-qmp / -mon: a QMP monitor listening on a unix socket or loopback TCP."""

    id: str
    path: str | None = None  # unix socket
    host: str | None = None  # tcp
    port: int = 0
    wait: bool = False
    pretty: bool = False
    fd: int | None = None  # an already listening socket (fd=N)
    option: str = ""


@dataclass
class DeviceConfig:
    driver: str
    props: dict[str, str]
    option: str = ""


@dataclass
class IommufdConfig:
    """-object iommufd,id=ID[,fd=N]: an iommufd context vfio-pci devices share (fd: one already open)."""

    id: str
    fd: int | None = None
    option: str = ""


@dataclass
class MachineConfig:
    machine: MachineType = PC  # -machine type=: pc (i440FX) or q35
    ram_size: int = DEFAULT_RAM_SIZE
    ram_size_option: str | None = None  # the -m text when given
    smp: int = 1
    cpu: CpuModel = field(default_factory=CpuModel)
    memory_backend: str | None = None
    aux_ram_share: bool = False
    mem_prealloc: bool = False  # -mem-prealloc: fault in all of pc.ram at start
    backends: dict[str, MemoryBackendConfig] = field(default_factory=dict)
    iommufds: dict[str, IommufdConfig] = field(default_factory=dict)
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    bios: str | None = None
    serials: list[ChardevConfig] = field(default_factory=list)
    devices: list[DeviceConfig] = field(default_factory=list)
    no_reboot: bool = False
    no_shutdown: bool = False  # on guest power-off, stop in runstate "shutdown" instead of exiting
    kernel_irqchip: str = "on"  # -machine kernel-irqchip=on|split: split has minivmm emulate PIC, IOAPIC, PIT
    pit: bool = True  # -machine pit=off: no PIT at all
    pit_reinject: bool = True  # -global kvm-pit.lost_tick_policy=discard turns it off (QEMU's default: delay)
    listen_remote: bool = False  # -global migration.x-listen-remote=on: -incoming beyond loopback
    panic_action: str = "shutdown"  # -action panic=pause|shutdown|exit-failure|none
    monitors: list[MonitorConfig] = field(default_factory=list)
    start_paused: bool = False
    incoming: list = field(default_factory=list)  # -incoming channels (migration.channels.Channel; DEFER)
    name: str | None = None
    trace: set[str] = field(default_factory=set)
    run_loop: str | None = None  # -accel kvm,x-run-loop=c|python; None: the C loop when it is built

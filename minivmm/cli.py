"""minivmm's command line, spelled as QEMU's.

QEMU options are not GNU options: every option has one dash (two are
accepted), and an option that takes a value always takes the next word, even
one starting with a dash (``-append -v``). argparse cannot express that, so
the options are scanned from a table here; each value is then parsed with the
keyval/size helpers in options.py. Errors are one line naming the option and
exit with status 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__
from .arch.x86 import machine_types
from .arch.x86.cpuid import CpuModel, CpuModelError
from .arch.x86.layout import PAGE_SIZE, KiB
from .config import (
    MIN_RAM,
    ChardevConfig,
    DeviceConfig,
    IommufdConfig,
    MachineConfig,
    MemoryBackendConfig,
    MonitorConfig,
)
from .options import OptionError, parse_bool, parse_keyval, parse_object, parse_size

# The first line QEMU prints for -h and -version: test runners read the version from it.
VERSION_LINE = f"QEMU emulator version {__version__} (minivmm {__version__}, a small KVM VMM with QEMU's command line)"
USAGE = f"""\
{VERSION_LINE}
usage: minivmm [options]
       minivmm demo [--ram SIZE] [--updates N]   a live update under a running guest, checked and timed
       minivmm demo --device [--rounds N] ...    the same with a guest doing DMA with a vfio-user device

Boots a guest on KVM with QEMU's command-line conventions.

Machine:
  -m SIZE                  guest RAM (plain numbers are MiB; K/M/G/T suffixes), default 128M
  -smp N                   number of vCPUs (also cpus=N,sockets=..,cores=..,threads=..)
  -cpu host[,+feat|-feat]  CPUID as KVM supports it, with features added or removed
  -cpu qemu64|kvm64|Opteron_G1|Skylake-Server|max[,vendor=...]  QEMU's CPU models
  -machine [pc|q35,]KEY=VAL  the machine type (pc: i440FX, the default; q35: MCH/ICH9, PCI Express;
                           -machine help lists them),
                           accel=kvm, memory-backend=ID, aux-ram-share=on|off,
                           kernel-irqchip=on|split (split: PIC, IOAPIC, PIT in minivmm), pit=on|off
  -object memory-backend-memfd,id=ID,size=SIZE[,share=on|off][,hugetlb=on][,prealloc=on]
  -object memory-backend-file,id=ID,size=SIZE,mem-path=PATH[,share=on|off]
  -object memory-backend-ram,id=ID,size=SIZE[,share=on|off]
  -mem-prealloc            fault in all guest RAM at start (first touches are slow under nested KVM)
  -accel kvm | -enable-kvm the only accelerator
  -accel kvm,x-run-loop=c|python   the vCPU loop: C (the default when built) or the Python reference
Boot:
  -kernel FILE             Linux bzImage, PVH vmlinux, multiboot (ELF32) or minivmm ELF64; default: built-in guest
  -append CMDLINE          kernel command line
  -initrd FILE             Linux initrd; multiboot: "FILE [ARGS][,FILE [ARGS]]" modules
  -bios FILE               flat real-mode firmware, mapped to end at 4 GiB
Devices:
  -serial stdio|null|none|file:PATH|unix:PATH,server=on[,wait=off]|chardev:ID  (default stdio)
  -chardev stdio|null|file|socket,id=ID[,path=PATH][,server=on][,wait=off][,append=on]
  -device isa-debug-exit[,iobase=0x501][,iosize=2]
  -device pc-testdev | pci-testdev | edu | pvpanic   (-device help lists the models)
  -device vfio-user-pci,socket=PATH[,id=ID]   a PCI device served over vfio-user (minivmm-vfio-user SOCKET)
  -object iommufd,id=ID[,fd=N]  -device vfio-pci,host=BDF|sysfsdev=PATH[,fd=N][,iommufd=ID]
                           a host PCI device through VFIO (container or iommufd), kept across CPR (docs/devices.md)
Control:
  -qmp unix:PATH[,server=on][,wait=off] | tcp:HOST:PORT,server=on[,wait=off]   a QMP monitor
  -mon chardev=ID,mode=control[,pretty=on]   a QMP monitor on a -chardev socket
  -incoming URI|defer      wait for a migration stream (unix:PATH, tcp:HOST:PORT, file:PATH) or migrate-incoming
  -S                       start with the vCPUs paused
  -no-reboot               exit instead of resetting the machine
  -no-shutdown             stop (runstate shutdown) instead of exiting when the guest powers off
  -action panic=pause|shutdown|exit-failure|none   what a pvpanic report does
  -device pvpanic[,ioport=0x505]
  -global migration.x-listen-remote=on   let -incoming tcp: listen beyond loopback (unauthenticated)
  -global kvm-pit.lost_tick_policy=delay|discard   make up missed PIT ticks, or not
  -overcommit mem-lock=off,cpu-pm=off    accepted (minivmm neither locks RAM nor passes HLT/MWAIT)
  -name NAME  -pidfile FILE  -nodefaults  -display none  -nographic
  -d postcode              print every write to port 0x80 with its time
  -version  -help
"""


class CliError(Exception):
    """``minivmm: <option> <value>: <what is wrong>``, exit status 1."""


@dataclass
class _Parsed:
    config: MachineConfig = field(default_factory=MachineConfig)
    chardevs: dict[str, ChardevConfig] = field(default_factory=dict)
    serial_specs: list[str] = field(default_factory=list)
    machine_props: dict[str, tuple[str, str]] = field(default_factory=dict)
    monitor_specs: list[tuple[ChardevConfig, bool, str]] = field(default_factory=list)
    incoming: list = field(default_factory=list)  # (Channel, option text)
    pidfile: str | None = None
    show: str | None = None  # "help", "version", "devices" or "machines"


def _where(opt: str, value: str | None) -> str:
    """An option as error messages name it; a huge value is cut short."""
    if value is None:
        return opt
    if len(value) > 120:
        value = f"{value[:100]}...({len(value)} characters)"
    return f"{opt} {value}"


def _size_option(opt: str, value: str) -> int:
    text = value
    if "=" in value:
        props = parse_keyval(value)
        if "size" not in props:
            raise CliError(f"{_where(opt, value)}: missing 'size'")
        text = props["size"]
    return parse_size(text, default_unit="M")


RAM_ALIGN = 8 * KiB  # QEMU rounds -m up to this


def _opt_m(p: _Parsed, opt: str, value: str) -> None:
    size = -(-_size_option(opt, value) // RAM_ALIGN) * RAM_ALIGN
    if size < MIN_RAM:
        raise OptionError(f"guest RAM must be at least {MIN_RAM >> 20} MiB")
    p.config.ram_size = size
    p.config.ram_size_option = value


def _opt_smp(p: _Parsed, opt: str, value: str) -> None:
    props = parse_keyval(value, "cpus")
    unknown = set(props) - {"cpus", "sockets", "cores", "threads", "maxcpus", "dies"}
    if unknown:
        raise OptionError(f"Invalid parameter '{unknown.pop()}'")
    try:
        nums = {k: int(v) for k, v in props.items()}
    except ValueError:
        raise OptionError("CPU counts must be integers") from None
    topology = nums.get("sockets", 1) * nums.get("dies", 1) * nums.get("cores", 1) * nums.get("threads", 1)
    cpus = nums.get("cpus", topology)
    if cpus < 1:
        raise OptionError("Invalid CPU topology: the number of CPUs must be at least 1")
    if "maxcpus" in nums and nums["maxcpus"] != cpus:
        raise OptionError("CPU hotplug is not supported: maxcpus must equal cpus")
    p.config.smp = cpus


def _opt_cpu(p: _Parsed, opt: str, value: str) -> None:
    try:
        p.config.cpu = CpuModel.parse(value)
    except CpuModelError as e:
        raise OptionError(str(e)) from None


def _opt_machine(p: _Parsed, opt: str, value: str) -> None:
    if value in ("help", "?"):  # QEMU's listing of the machine types
        p.show = "machines"
        return
    for key, val in parse_keyval(value, "type").items():
        p.machine_props[key] = (val, _where(opt, value))


def _apply_machine(p: _Parsed) -> None:
    cfg = p.config
    props = sorted(p.machine_props.items(), key=lambda item: item[0] != "type")  # the type first: errors name it
    for key, (value, where) in props:
        try:
            if key == "type":
                machine = machine_types.find(value)
                if machine is None:
                    names = ", ".join(machine_types.MACHINE_TYPES)
                    raise OptionError(
                        f'unsupported machine type: "{value}" (minivmm has {names} and their versioned '
                        "names pc-i440fx-X.Y, pc-q35-X.Y)"
                    )
                cfg.machine = machine
            elif key == "accel":
                if value != "kvm":
                    raise OptionError(f"invalid accelerator '{value}' (minivmm only has kvm)")
            elif key == "memory-backend":
                cfg.memory_backend = value
            elif key == "aux-ram-share":
                cfg.aux_ram_share = parse_bool(key, value)
            elif key == "kernel-irqchip":
                if value == "off":
                    raise OptionError(
                        "kernel-irqchip=off is not supported: minivmm needs KVM's local APICs (use on or split)"
                    )
                if value not in ("on", "split"):
                    raise OptionError(f"Parameter 'kernel-irqchip' expects 'on', 'off' or 'split', not '{value}'")
                cfg.kernel_irqchip = value
            elif key == "pit":
                cfg.pit = parse_bool(key, value)
            else:
                raise OptionError(f"Property '{cfg.machine.name}-machine.{key}' not found")
        except OptionError as e:
            raise CliError(f"{where}: {e}") from None


def _opt_accel(p: _Parsed, opt: str, value: str) -> None:
    props = parse_keyval(value, "accel")
    if props.get("accel") != "kvm":
        raise OptionError(f"invalid accelerator '{props.get('accel')}' (minivmm only has kvm)")
    if "x-run-loop" in props:
        if props["x-run-loop"] not in ("c", "python"):
            raise OptionError(f"Parameter 'x-run-loop' does not accept value '{props['x-run-loop']}' (c or python)")
        p.config.run_loop = props["x-run-loop"]


def _opt_object(p: _Parsed, opt: str, value: str) -> None:
    props = parse_object(value, "qom-type")
    where = _where(opt, value)
    qom_type = props.pop("qom-type", None)
    if qom_type == "iommufd":
        _iommufd_object(p, props, where)
        return
    kinds = {"memory-backend-memfd": "memfd", "memory-backend-file": "file", "memory-backend-ram": "ram"}
    if qom_type not in kinds:
        raise OptionError(f"invalid object type: {qom_type}")
    kind = kinds[qom_type]
    obj_id = props.pop("id", None)
    if not obj_id:
        raise OptionError("Parameter 'id' is missing")
    if obj_id in p.config.backends:
        raise OptionError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
    if "size" not in props:
        raise OptionError("can't create backend with size 0")
    size = parse_size(props.pop("size"))
    if size % PAGE_SIZE:
        raise OptionError(f"size {size} is not a multiple of the page size ({PAGE_SIZE})")
    share = parse_bool("share", props.pop("share", "on" if kind == "memfd" else "off"))
    hugetlb = parse_bool("hugetlb", props.pop("hugetlb", "off")) if kind == "memfd" else False
    mem_path = props.pop("mem-path", None) if kind == "file" else None
    if kind == "file" and not mem_path:
        raise OptionError("mem-path property not set")
    prealloc = parse_bool("prealloc", props.pop("prealloc", "off"))
    if props:
        raise OptionError(f"Property '{qom_type}.{next(iter(props))}' not found")
    p.config.backends[obj_id] = MemoryBackendConfig(obj_id, kind, size, share, hugetlb, mem_path, prealloc, where)


def _iommufd_object(p: _Parsed, props: dict[str, str], where: str) -> None:
    """-object iommufd,id=ID[,fd=N]: opened when a device first uses it, as QEMU does."""
    obj_id = props.pop("id", None)
    if not obj_id:
        raise OptionError("Parameter 'id' is missing")
    if obj_id in p.config.iommufds or obj_id in p.config.backends:
        raise OptionError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
    fd = None
    if "fd" in props:
        text = props.pop("fd")
        if not text.isdigit():
            raise OptionError(f"Parameter 'fd' expects a file descriptor number, not '{text}'")
        fd = int(text)
    if props:
        raise OptionError(f"Property 'iommufd.{next(iter(props))}' not found")
    p.config.iommufds[obj_id] = IommufdConfig(obj_id, fd, where)


_LEGACY_FLAGS = {"server": ("server", "on"), "nowait": ("wait", "off"), "wait": ("wait", "on")}


def _socket_props(text: str, implied: str) -> dict[str, str]:
    """keyval that also takes QEMU's old bare flags: ``unix:p,server,nowait``."""
    parts = text.replace(",,", "\0").split(",")
    fixed = [(_LEGACY_FLAGS[p][0] + "=" + _LEGACY_FLAGS[p][1]) if p in _LEGACY_FLAGS else p for p in parts]
    return parse_keyval(",".join(fixed).replace("\0", ",,"), implied)


def _loopback_port(host: str, port: str) -> tuple[str, int]:
    if host not in ("localhost", "127.0.0.1", "::1", "[::1]"):
        raise OptionError(f"host '{host}' is not loopback: an unauthenticated monitor must only listen locally")
    if not port.isdigit() or int(port) > 65535:
        raise OptionError(f"port '{port}' is not a number from 0 to 65535")
    return host.strip("[]"), int(port)


def _chardev_from_props(chardev_id: str, backend: str, props: dict[str, str], where: str) -> ChardevConfig:
    cc = ChardevConfig(chardev_id, backend, option=where)
    if backend in ("stdio", "null"):
        props.pop("signal", None)
    elif backend == "file":
        cc.path = props.pop("path", None)
        cc.append = parse_bool("append", props.pop("append", "off"))
        if not cc.path:
            raise OptionError("chardev: file: no filename given")
    elif backend == "socket":
        cc.path = props.pop("path", None)
        if "fd" in props:
            text = props.pop("fd")
            if not text.isdigit():
                raise OptionError(f"fd '{text}' is not a number")
            cc.fd = int(text)
        elif cc.path is None:
            if "host" not in props or "port" not in props:
                raise OptionError("chardev: socket: give path=PATH, fd=N, or host=HOST,port=PORT")
            cc.host, cc.port = _loopback_port(props.pop("host"), props.pop("port"))
        cc.server = parse_bool("server", props.pop("server", "off"))
        cc.wait = parse_bool("wait", props.pop("wait", "on"))
        props.pop("telnet", None)
        if not cc.server:
            raise OptionError("chardev: socket: only server=on is supported")
    else:
        raise OptionError(f"'{backend}' is not a valid char driver name")
    if props:
        raise OptionError(f"Invalid parameter '{next(iter(props))}'")
    return cc


def _opt_chardev(p: _Parsed, opt: str, value: str) -> None:
    props = _socket_props(value, "backend")
    chardev_id = props.pop("id", None)
    if not chardev_id:
        raise OptionError("Parameter 'id' is missing")
    if chardev_id in p.chardevs:
        raise OptionError(f"Duplicate chardev ID '{chardev_id}'")
    p.chardevs[chardev_id] = _chardev_from_props(chardev_id, props.pop("backend"), props, _where(opt, value))


def _opt_serial(p: _Parsed, opt: str, value: str) -> None:
    p.serial_specs.append(value)


def _serial_config(p: _Parsed, index: int, value: str) -> ChardevConfig:
    where = _where("-serial", value)
    chardev_id = f"serial{index}"
    if value.startswith("chardev:"):
        name = value[len("chardev:") :]
        if name not in p.chardevs:
            raise CliError(f"{where}: chardev '{name}' not found")
        return p.chardevs[name]
    if value in ("stdio", "null", "none"):
        return ChardevConfig(chardev_id, value, option=where)
    kind, _, rest = value.partition(":")
    try:
        if kind == "file" and rest:
            return _chardev_from_props(chardev_id, "file", {"path": rest}, where)
        if kind == "unix" and rest:
            cc = _chardev_from_props(chardev_id, "socket", _socket_props(rest, "path"), where)
            if cc.path is None:
                raise OptionError("serial ports take unix sockets only")
            return cc
    except OptionError as e:
        raise CliError(f"{where}: {e}") from None
    raise CliError(f"{where}: '{kind}' is not a valid char driver name")


def _opt_qmp(p: _Parsed, opt: str, value: str) -> None:
    kind, _, rest = value.partition(":")
    if kind == "unix" and rest:
        props = _socket_props(rest, "path")
    elif kind == "tcp" and rest:
        first, _, tail = rest.partition(",")
        host, _, port = first.rpartition(":")
        props = _socket_props(tail, "server") if tail else {}
        props.update(host=host, port=port)
    else:
        raise OptionError(f"'{kind}' is not a valid monitor address (use unix:PATH or tcp:HOST:PORT)")
    cc = _chardev_from_props(f"compat_monitor{len(p.monitor_specs)}", "socket", props, _where(opt, value))
    p.monitor_specs.append((cc, False, _where(opt, value)))


def _opt_mon(p: _Parsed, opt: str, value: str) -> None:
    props = parse_keyval(value, "chardev")
    chardev = props.pop("chardev", None)
    mode = props.pop("mode", "readline")
    pretty = parse_bool("pretty", props.pop("pretty", "off"))
    if props:
        raise OptionError(f"Invalid parameter '{next(iter(props))}'")
    if mode != "control":
        raise OptionError(f"mode={mode}: minivmm only has the control (QMP) monitor: use mode=control")
    if chardev not in p.chardevs:
        raise OptionError(f"chardev '{chardev}' not found")
    p.monitor_specs.append((p.chardevs[chardev], pretty, _where(opt, value)))


def _opt_incoming(p: _Parsed, opt: str, value: str) -> None:
    from .migration.channels import ChannelError, parse_channel_text

    try:
        channel = parse_channel_text(value)
    except ChannelError as e:
        raise OptionError(str(e)) from None
    p.config.incoming.append(channel)
    p.incoming.append((channel, _where(opt, value)))


def _opt_action(p: _Parsed, opt: str, value: str) -> None:
    for key, val in parse_keyval(value).items():
        choices = {
            "panic": ("pause", "shutdown", "exit-failure", "none"),
            "reboot": ("reset", "shutdown"),
            "shutdown": ("poweroff", "pause"),
        }
        if key not in choices:
            raise OptionError(f"Invalid parameter '{key}'")
        if val not in choices[key]:
            raise OptionError(f"Parameter '{key}' does not accept value '{val}'")
        if key == "panic":
            p.config.panic_action = val
        elif key == "reboot":
            p.config.no_reboot = val == "shutdown"
        else:
            p.config.no_shutdown = val == "pause"


def _opt_device(p: _Parsed, opt: str, value: str) -> None:
    if value in ("help", "?"):  # QEMU's listing, which test runners grep for device names
        p.show = "devices"
        return
    props = parse_object(value, "driver")  # keyval, or QEMU's JSON form (vfio-user-pci's socket object)
    if not props.get("driver"):
        raise OptionError("Parameter 'driver' is missing")
    p.config.devices.append(DeviceConfig(props.pop("driver"), props, _where(opt, value)))


GLOBALS = ("kvm-pit.lost_tick_policy", "migration.x-listen-remote")


def _opt_global(p: _Parsed, opt: str, value: str) -> None:
    """QEMU's device-property defaults, DRIVER.PROP=VALUE (or driver=,property=,value=)."""
    if value.startswith("driver="):
        props = parse_keyval(value)
        if set(props) != {"driver", "property", "value"}:
            raise OptionError("give DRIVER.PROP=VALUE or driver=D,property=P,value=V")
        name, setting = f"{props['driver']}.{props['property']}", props["value"]
    else:
        name, eq, setting = value.partition("=")
        if not eq or "." not in name:
            raise OptionError("give DRIVER.PROP=VALUE")
    if name == "migration.x-listen-remote":
        p.config.listen_remote = parse_bool(name, setting)
    elif name == "kvm-pit.lost_tick_policy":
        if setting not in ("delay", "discard"):
            raise OptionError(f"Property '{name}' does not accept value '{setting}' (delay or discard)")
        p.config.pit_reinject = setting == "delay"
    else:
        raise OptionError(f"Property '{name}' not found (minivmm knows: {', '.join(GLOBALS)})")


def _opt_overcommit(p: _Parsed, opt: str, value: str) -> None:
    """QEMU's -overcommit: minivmm never locks guest RAM and never hands the guest HLT or MWAIT."""
    for key, val in parse_keyval(value).items():
        if key not in ("mem-lock", "cpu-pm"):
            raise OptionError(f"Invalid parameter '{key}'")
        if parse_bool(key, val):
            raise OptionError(f"{key}=on is not supported by minivmm (only {key}=off)")


def _opt_vnc(p: _Parsed, opt: str, value: str) -> None:
    if value != "none":
        raise OptionError("minivmm has no display: only -vnc none is accepted")


def _opt_display(p: _Parsed, opt: str, value: str) -> None:
    if parse_keyval(value, "type").get("type") != "none":
        raise OptionError(f"Display '{value}' is not available (minivmm has no display: use -display none)")


def _opt_name(p: _Parsed, opt: str, value: str) -> None:
    props = parse_keyval(value, "guest")
    p.config.name = props.get("guest")


def _opt_d(p: _Parsed, opt: str, value: str) -> None:
    for item in value.split(","):
        if item != "postcode":
            raise OptionError(f"unknown log item '{item}' (minivmm knows: postcode)")
        p.config.trace.add(item)


def _setter(attr: str, value: object = None) -> Callable[[_Parsed, str, str | None], None]:
    def set_(p: _Parsed, opt: str, arg: str | None) -> None:
        setattr(p.config, attr, arg if value is None else value)

    return set_


def _set_pidfile(p: _Parsed, opt: str, value: str) -> None:
    p.pidfile = value


def _ignore(p: _Parsed, opt: str, value: str | None) -> None:
    pass


def _show(what: str) -> Callable[[_Parsed, str, None], None]:
    def show(p: _Parsed, opt: str, value: None) -> None:
        p.show = what

    return show


# option name -> (takes a value, handler)
OPTIONS: dict[str, tuple[bool, Callable]] = {
    "m": (True, _opt_m),
    "smp": (True, _opt_smp),
    "cpu": (True, _opt_cpu),
    "machine": (True, _opt_machine),
    "M": (True, _opt_machine),
    "accel": (True, _opt_accel),
    "enable-kvm": (False, _ignore),
    "object": (True, _opt_object),
    "kernel": (True, _setter("kernel")),
    "append": (True, _setter("append")),
    "initrd": (True, _setter("initrd")),
    "bios": (True, _setter("bios")),
    "serial": (True, _opt_serial),
    "chardev": (True, _opt_chardev),
    "device": (True, _opt_device),
    "S": (False, _setter("start_paused", True)),
    "no-reboot": (False, _setter("no_reboot", True)),
    "no-shutdown": (False, _setter("no_shutdown", True)),
    "mem-prealloc": (False, _setter("mem_prealloc", True)),
    "action": (True, _opt_action),
    "qmp": (True, _opt_qmp),
    "incoming": (True, _opt_incoming),
    "mon": (True, _opt_mon),
    "name": (True, _opt_name),
    "pidfile": (True, _set_pidfile),
    "nodefaults": (False, _ignore),
    "display": (True, _opt_display),
    "vnc": (True, _opt_vnc),
    "global": (True, _opt_global),
    "overcommit": (True, _opt_overcommit),
    "nographic": (False, _ignore),
    "d": (True, _opt_d),
    "version": (False, _show("version")),
    "help": (False, _show("help")),
    "h": (False, _show("help")),
}


def printable(text: str) -> str:
    """One line whatever a value holds: line breaks and other unprintable characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


def parse(argv: list[str]) -> _Parsed:
    """The command line as a _Parsed; CliError (one printable line) for anything wrong."""
    try:
        return _parse(argv)
    except CliError as e:
        raise CliError(printable(str(e))) from None


def _parse(argv: list[str]) -> _Parsed:
    p = _Parsed()
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word in ("-", "--"):
            raise CliError(f"{word}: unexpected argument (minivmm takes no disk images)")
        name = word[2:] if word.startswith("--") else word[1:]
        value = None
        if name not in OPTIONS:
            raise CliError(f"{word}: invalid option")
        takes_value, handler = OPTIONS[name]
        if takes_value and value is None:
            if i + 1 >= len(argv):
                raise CliError(f"-{name}: requires an argument")
            i += 1
            value = argv[i]
        try:
            handler(p, f"-{name}", value)
        except OptionError as e:
            raise CliError(f"{_where('-' + name, value)}: {e}") from None
        i += 1
    _apply_machine(p)
    cfg = p.config
    cfg.serials = [_serial_config(p, n, spec) for n, spec in enumerate(p.serial_specs)]
    used = {id(cc) for cc in cfg.serials}
    for cc, pretty, where in p.monitor_specs:
        if id(cc) in used:
            raise CliError(f"{where}: chardev '{cc.id}' is already in use")
        used.add(id(cc))
        if cc.backend != "socket":
            raise CliError(f"{where}: monitors listen on sockets (chardev '{cc.id}' is {cc.backend})")
        cfg.monitors.append(MonitorConfig(cc.id, cc.path, cc.host, cc.port, cc.wait, pretty, cc.fd, where))
    for cc in cfg.serials:
        if cc.backend == "socket" and cc.path is None and cc.fd is None:
            raise CliError(f"{cc.option}: serial ports take unix sockets only")
    from .migration.channels import ChannelError, check_listen, main_of

    try:
        main_of(cfg.incoming)
    except ChannelError as e:
        raise CliError(f"-incoming: {e}") from None

    for channel, option in p.incoming:
        try:
            check_listen(channel.addr, cfg.listen_remote)
        except ChannelError as e:
            raise CliError(f"{option}: {e}") from None
    if cfg.kernel is None and cfg.bios is None:
        for opt in ("append", "initrd"):
            if getattr(cfg, opt) is not None:
                raise CliError(f"-{opt} {getattr(cfg, opt)}: only allowed with -kernel")
    return p


def main(argv: list[str] | None = None) -> int:
    start_ns = time.monotonic_ns()  # a cpr-exec's timeline: the new image begins here
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .demo import main as demo

        return demo(argv[1:])
    from .cpr.incoming import CprError, take_exec_state

    try:
        state = take_exec_state()  # before anything else: the fds of the previous image
    except CprError as e:
        print(f"minivmm: {e}", file=sys.stderr)
        return 1
    from . import process

    try:
        try:
            p = parse(argv)
        except CliError as e:
            return process.fail(str(e), state)
        if p.show == "help":
            print(USAGE, end="")
            return 0
        if p.show == "version":
            print(f"{VERSION_LINE}\nminivmm version {__version__}")
            return 0
        if p.show == "devices":
            from .machine.devices import device_help

            print(device_help(), end="")
            return 0
        if p.show == "machines":
            print(machine_types.machine_help(), end="")
            return 0
        return process.run(p, argv, start_ns, state)
    except Exception as e:  # the last barrier: one line, and an exec'd image's guest RAM kept for a retry
        return process.fail(f"internal error: {type(e).__name__}: {e}", state)

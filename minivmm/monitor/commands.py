"""QMP commands: names, arguments and error wording as QEMU's.

Each command declares its arguments (type and whether required) so that a
bad call gets QEMU's own messages ("Parameter 'x' is missing", "Invalid
parameter type for 'x', expected: integer") before any handler runs.
Handlers run on the main loop with the machine, the monitor and the client.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from minivmm import runstate
from minivmm.files import open_regular
from minivmm.memory import GuestMemoryError

from . import hmp
from .server import Connection, Monitor, QmpError, version_info

_TYPES = {
    "str": (str, "string"),
    "int": (int, "integer"),
    "bool": (bool, "boolean"),
    "list": (list, "array"),
    "object": (dict, "object"),
}
INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_STR = 4096  # characters: PATH_MAX, and more than any name or URI needs
MAX_ITEMS = 1024  # elements of a list argument


@dataclass(frozen=True)
class Arg:
    """One argument's schema, checked before any handler runs."""

    kind: str  # a key of _TYPES
    required: bool = False
    range: tuple[int, int] = INT64  # int: inclusive bounds
    max_len: int | None = None  # str: characters (MAX_STR); list: elements (MAX_ITEMS)
    items: str | None = None  # list: every element's kind

    def check(self, key: str, value: object) -> None:
        python_type, name = _TYPES[self.kind]
        if not isinstance(value, python_type) or (self.kind == "int" and isinstance(value, bool)):
            raise QmpError(f"Invalid parameter type for '{key}', expected: {name}")
        if self.kind == "int" and not self.range[0] <= value <= self.range[1]:
            raise QmpError(f"Parameter '{key}' expects an integer from {self.range[0]} to {self.range[1]}")
        if self.kind == "str":
            _check_string(key, value, self.max_len or MAX_STR)
        if self.kind == "list":
            limit = self.max_len or MAX_ITEMS
            if len(value) > limit:
                raise QmpError(f"Parameter '{key}' takes at most {limit} elements")
            if self.items is not None:
                for i, item in enumerate(value):
                    Arg(self.items).check(f"{key}[{i}]", item)


def _check_string(key: str, value: str, max_len: int) -> None:
    if len(value) > max_len:
        raise QmpError(f"Parameter '{key}' is longer than {max_len} characters")
    if "\0" in value:
        raise QmpError(f"Parameter '{key}' must not contain a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise QmpError(f"Parameter '{key}' is not valid Unicode (a lone surrogate)") from None


def req(kind: str, **kw) -> Arg:
    return Arg(kind, True, **kw)


def opt(kind: str, **kw) -> Arg:
    return Arg(kind, False, **kw)


@dataclass
class Context:
    machine: object  # minivmm.machine.Machine
    migration: object  # minivmm.migration.manager.MigrationManager
    monitor: Monitor
    conn: Connection


@dataclass(frozen=True)
class Command:
    name: str
    handler: Callable[..., object]
    args: dict[str, Arg]


COMMANDS: dict[str, Command] = {}


def command(name: str, **args: Arg):
    def register(fn):
        COMMANDS[name] = Command(name, fn, args)
        return fn

    return register


def check_arguments(cmd: Command, arguments: dict) -> dict:
    """Arguments with dashes turned into underscores, or QEMU's error."""
    for key in arguments:
        if key not in cmd.args:
            raise QmpError(f"Parameter '{key}' is unexpected")
    out = {}
    for key, arg in cmd.args.items():
        if key not in arguments:
            if arg.required:
                raise QmpError(f"Parameter '{key}' is missing")
            continue
        arg.check(key, arguments[key])
        out[key.replace("-", "_")] = arguments[key]
    return out


def dispatch(machine, migration, monitor: Monitor, conn: Connection, name: str, arguments: dict) -> object:
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")
    kwargs = check_arguments(cmd, arguments)
    return cmd.handler(Context(machine, migration, monitor, conn), **kwargs)


# --- the protocol ------------------------------------------------------------------


@command("qmp_capabilities", enable=opt("list", items="str", max_len=16))
def qmp_capabilities(ctx: Context, enable: list | None = None) -> dict:
    if ctx.conn.negotiated:
        raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    for i, cap in enumerate(enable or []):
        if cap != "oob":
            raise QmpError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
    if enable:
        raise QmpError(f"Capability {', '.join(enable)} not available")
    ctx.conn.negotiated = True
    return {}


@command("query-version")
def query_version(ctx: Context) -> dict:
    return version_info()


@command("query-commands")
def query_commands(ctx: Context) -> list:
    return [{"name": name} for name in COMMANDS]


# --- run state ---------------------------------------------------------------------------


@command("query-status")
def query_status(ctx: Context) -> dict:
    state = ctx.machine.control.state
    return {"running": state == runstate.RUNNING, "singlestep": False, "status": state}


@command("stop")
def stop(ctx: Context) -> dict:
    control = ctx.machine.control
    if control.state == runstate.INMIGRATE:
        control.autostart = False
    else:
        control.vm_stop(runstate.PAUSED)
    return {}


@command("cont")
def cont(ctx: Context) -> dict:
    control = ctx.machine.control
    if control.state in runstate.NEEDS_RESET:
        raise QmpError("Resetting the Virtual Machine is required")
    if control.state == runstate.FINISH_MIGRATE:
        raise QmpError("Migration is not finalized yet")
    if control.state == runstate.INMIGRATE:
        control.autostart = True  # QEMU: the VM starts when the incoming migration completes
    else:
        control.vm_start()
    return {}


@command("system_reset")
def system_reset(ctx: Context) -> dict:
    ctx.machine.control.request_reset("host-qmp-system-reset")
    return {}


@command("system_wakeup")
def system_wakeup(ctx: Context) -> dict:
    if not ctx.machine.control.wakeup("qmp"):
        raise QmpError("Unable to wake up: guest is not in suspended state")
    return {}


@command("quit")
def quit_(ctx: Context) -> dict:
    ctx.machine.control.request_shutdown("host-qmp-quit", force=True)
    return {}


# --- the machine -------------------------------------------------------------------------


@command("query-name")
def query_name(ctx: Context) -> dict:
    name = ctx.machine.config.name
    return {"name": name} if name is not None else {}


@command("query-kvm")
def query_kvm(ctx: Context) -> dict:
    return {"enabled": True, "present": True}


@command("query-cpus-fast")
def query_cpus_fast(ctx: Context) -> list:
    return [
        {
            "cpu-index": t.index,
            "qom-path": f"/machine/unattached/device[{t.index}]",
            "thread-id": t.thread.native_id or 0,
            "props": {"core-id": t.index, "thread-id": 0, "socket-id": 0},
            "target": "x86_64",
        }
        for t in ctx.machine.vcpus
    ]


@command("query-pci")
def query_pci(ctx: Context) -> list:
    from minivmm.machine.pci import describe

    return [{"bus": 0, "devices": [describe(f) for f in ctx.machine.devices.pci.functions]}]


@command("query-memdev")
def query_memdev(ctx: Context) -> list:
    ram = ctx.machine.memory.blocks[0]  # the machine's RAM backend
    return [
        {
            "id": ram.name,
            "size": ram.size,
            "merge": True,
            "dump": True,
            "prealloc": False,
            "share": ram.shared,
            "reserve": True,
            "host-nodes": [],
            "policy": "default",
        }
    ]


def _save(filename: str, pieces: list[tuple[object, int, int]]) -> dict:
    try:
        fd = open_regular(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as e:
        raise QmpError(f"Could not open '{filename}': {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for block, offset, length in pieces:
                f.write(memoryview(block.mem)[offset : offset + length])
    except OSError as e:
        raise QmpError(f"Could not write '{filename}': {e.strerror}") from None
    return {}


def _bad_range(addr: int, size: int) -> QmpError:
    return QmpError(f"Invalid addr 0x{addr & (2**64 - 1):016x}/size {size} specified")


@command("pmemsave", val=req("int"), size=req("int"), filename=req("str"))
def pmemsave(ctx: Context, val: int, size: int, filename: str) -> dict:
    """Guest-physical memory to a file; every byte asked for must be RAM."""
    if val < 0 or size < 0:
        raise _bad_range(val, size)
    try:
        pieces = ctx.machine.memory.pieces(val, size)
    except GuestMemoryError:
        raise _bad_range(val, size) from None
    return _save(filename, pieces)


@command(
    "memsave",
    val=req("int"),
    size=req("int"),
    filename=req("str"),
    **{"cpu-index": opt("int")},
)
def memsave(ctx: Context, val: int, size: int, filename: str, cpu_index: int = 0) -> dict:
    """Guest-virtual memory (as the given vCPU maps it) to a file."""
    machine = ctx.machine
    if not 0 <= cpu_index < len(machine.vcpus):
        raise QmpError("Parameter 'cpu-index' expects a CPU number")
    if val < 0 or size < 0:
        raise _bad_range(val, size)
    pieces = []
    with machine.vcpu_paused(cpu_index) as vcpu:
        addr, left = val, size
        while left > 0:
            chunk = min(left, 4096 - addr % 4096)
            tr = vcpu.translate(addr)
            try:
                if not tr.valid:
                    raise GuestMemoryError("unmapped")
                pieces += machine.memory.pieces(tr.physical_address, chunk)
            except GuestMemoryError:
                raise _bad_range(val, size) from None
            addr, left = addr + chunk, left - chunk
    return _save(filename, pieces)


# --- file descriptors -----------------------------------------------------------------------


@command("getfd", fdname=req("str", max_len=255))
def getfd(ctx: Context, fdname: str) -> dict:
    if not ctx.conn.fds:
        raise QmpError("No file descriptor supplied via SCM_RIGHTS")
    if fdname[:1].isdigit():
        os.close(ctx.conn.fds.pop())
        raise QmpError("Parameter 'fdname' expects a name not starting with a digit")
    ctx.machine.fds.close("getfd", fdname)  # one of the same name is replaced
    ctx.machine.fds.save("getfd", fdname, ctx.conn.fds.pop())
    return {}


@command("closefd", fdname=req("str", max_len=255))
def closefd(ctx: Context, fdname: str) -> dict:
    if not ctx.machine.fds.close("getfd", fdname):
        raise QmpError(f"File descriptor named '{fdname}' not found")
    return {}


# --- the human monitor ---------------------------------------------------------------------------


@command("human-monitor-command", **{"command-line": req("str", max_len=65536), "cpu-index": opt("int")})
def human_monitor_command(ctx: Context, command_line: str, cpu_index: int = 0) -> str:
    if not 0 <= cpu_index < len(ctx.machine.vcpus):
        raise QmpError("Parameter 'cpu-index' expects a CPU number")

    def qmp(name: str) -> object:
        return dispatch(ctx.machine, ctx.migration, ctx.monitor, ctx.conn, name, {})

    return hmp.run(ctx, command_line, cpu_index, qmp).replace("\n", "\r\n")


# --- migration -----------------------------------------------------------------------------------


def _main_channel(uri: str | None, channels_arg: list | None, command: str):
    from minivmm.migration.channels import ChannelError, main_of, parse_channel, parse_uri

    if (uri is None) == (channels_arg is None):
        if uri is None:
            raise QmpError("need either 'uri' or 'channels' argument")
        raise QmpError(
            "'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should be present in "
            f"'{command}' qmp command"
        )
    try:
        if uri is not None:
            from minivmm.migration.channels import Channel

            return Channel("main", parse_uri(uri)), []
        parsed = [parse_channel(c) for c in channels_arg]
        main = main_of(parsed)
    except ChannelError as e:
        raise QmpError(str(e)) from None
    if main is None:
        raise QmpError("missing 'main' migration channel")
    return main, [c for c in parsed if c.channel_type != "main"]


@command(
    "migrate",
    uri=opt("str"),
    channels=opt("list", items="object", max_len=8),
    detach=opt("bool"),
    resume=opt("bool"),
)
def migrate(
    ctx: Context, uri: str | None = None, channels: list | None = None, detach: bool = True, resume: bool = False
) -> dict:
    from minivmm.migration.manager import MigrationError

    if resume:
        raise QmpError("Cannot resume if there is no paused migration")
    main, others = _main_channel(uri, channels, "migrate")
    try:
        ctx.migration.start_outgoing(main, others)
    except MigrationError as e:
        raise QmpError(str(e)) from None
    return {}


@command(
    "migrate-incoming",
    uri=opt("str"),
    channels=opt("list", items="object", max_len=8),
    **{"exit-on-error": opt("bool")},
)
def migrate_incoming(
    ctx: Context, uri: str | None = None, channels: list | None = None, exit_on_error: bool = True
) -> dict:
    from minivmm.migration.channels import DEFER, ChannelError

    if DEFER not in ctx.machine.config.incoming:
        raise QmpError("'-incoming' was not specified on the command line")
    if ctx.migration.incoming is not None:
        raise QmpError("The incoming migration has already been started")
    main, _ = _main_channel(uri, channels, "migrate-incoming")
    try:
        ctx.migration.start_incoming(main)
    except ChannelError as e:
        raise QmpError(str(e)) from None
    return {}


@command("query-migrate")
def query_migrate(ctx: Context) -> dict:
    return ctx.migration.info()


@command("migrate_cancel")
def migrate_cancel(ctx: Context) -> dict:
    ctx.migration.cancel()
    return {}


@command(
    "migrate-set-parameters",
    **{
        "downtime-limit": opt("int"),  # ranges: params.py, in QEMU's words
        "max-bandwidth": opt("int"),
        "mode": opt("str", max_len=64),
        "cpr-exec-command": opt("list", items="str"),
    },
)
def migrate_set_parameters(ctx: Context, **kwargs) -> dict:
    from minivmm.migration.params import ParameterError

    try:
        ctx.migration.params.update({k.replace("_", "-"): v for k, v in kwargs.items()})
    except ParameterError as e:
        raise QmpError(str(e)) from None
    return {}


@command("query-migrate-parameters")
def query_migrate_parameters(ctx: Context) -> dict:
    return ctx.migration.params.to_qmp()


@command("migrate-set-capabilities", capabilities=req("list", items="object", max_len=64))
def migrate_set_capabilities(ctx: Context, capabilities: list) -> dict:
    from minivmm.migration.manager import ACTIVE
    from minivmm.migration.params import ParameterError, parse_capabilities

    manager = ctx.migration
    if manager.outgoing is not None and manager.outgoing.status in ACTIVE:
        raise QmpError("There's a migration process in progress")
    try:
        manager.capabilities.update(parse_capabilities(capabilities))
    except ParameterError as e:
        raise QmpError(str(e)) from None
    return {}


@command("query-migrate-capabilities")
def query_migrate_capabilities(ctx: Context) -> list:
    return [{"capability": k, "state": v} for k, v in ctx.migration.capabilities.items()]

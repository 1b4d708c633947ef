"""The VMM process: from a parsed command line to a running machine and its
exit status, in the order QEMU starts up.

1. an incoming CPR's fds are taken first (cpr/incoming.py): from the
   environment (cpr-exec, before anything else) or from the source on the
   ``-incoming cpr`` channel (cpr-transfer, before any device exists);
2. the machine is built (machine/), over those fds if there are any;
3. the monitors bind their sockets (or take theirs over);
4. a cpr-exec's guest resumes as soon as its state file is loaded, and the
   monitors serve after; otherwise the monitors come first (wait=on holds
   the start until a client is there), then an incoming file or socket;
5. the main loop runs until the guest or the host ends the machine.
A failure is one line and exit status 1; a cpr-exec image hands the
guest's RAM to a holder first, so the update can be retried.
"""

from __future__ import annotations

import os
import sys

from . import guests
from .cpr import incoming as cpr
from .migration.channels import ChannelError
from .migration.manager import MigrationManager


def run(parsed, argv: list[str], start_ns: int, state: cpr.CprState | None) -> int:
    """``parsed``: the command line as cli.parse reads it (config, incoming channels, pidfile)."""
    cfg = parsed.config
    if state is not None and not cfg.incoming:  # booting afresh would overwrite the guest's RAM
        return fail("cpr-exec: the new command line needs -incoming (defer, or the state file)", state)
    builtin = cfg.kernel is None and cfg.bios is None
    if builtin:
        cfg.kernel = guests.path(guests.DEFAULT)
    try:
        cpr_conn, state = cpr.take_transfer(state, parsed.incoming)
    except cpr.CprError as e:
        print(f"minivmm: {e}", file=sys.stderr)
        return 1
    from .kvm.system import KvmError
    from .machine import Machine, MachineError
    from .monitor import MonitorError, open_monitors

    try:
        machine = Machine(cfg, fds=state.table if state is not None else None)
    except (MachineError, KvmError) as e:
        return fail(str(e), state)
    migration = MigrationManager(machine, argv)
    migration.start_ns = start_ns
    migration.cpr_state = state
    migration.cpr_channel = cpr_conn  # hung up once the main channel listens (now, or at migrate-incoming)
    try:
        monitors = open_monitors(machine, migration)  # bound (or taken over), not yet serving
    except (MonitorError, MachineError) as e:
        machine.close()
        return fail(str(e), state)
    if state is not None:
        cpr.adopt(state)
    early = state is not None  # an update's guest resumes first; the monitors serve after
    if early:
        try:
            machine.start()
            _start_incoming(migration, parsed.incoming, "file")
        except OSError as e:
            machine.close()
            return fail(str(e), state)
    if builtin:
        print(f"minivmm: no -kernel given: booting the built-in guest {guests.DEFAULT}", file=sys.stderr)
    try:
        if parsed.pidfile:
            _write_pidfile(parsed.pidfile)
        for monitor in monitors:
            monitor.start()  # wait=on: until a client is here
        if not early:
            _start_incoming(migration, parsed.incoming, "file")
        _start_incoming(migration, parsed.incoming, "socket")
        return machine.run()
    except OSError as e:
        print(f"minivmm: {e}", file=sys.stderr)
        return 1
    finally:
        for monitor in monitors:
            monitor.close()
        machine.close()
        if parsed.pidfile:
            try:
                os.unlink(parsed.pidfile)
            except OSError:
                pass


def fail(text: str, state: cpr.CprState | None) -> int:
    """One line and status 1; an exec'd image first hands the guest's RAM to a holder."""
    print(f"minivmm: {cpr.fail_line(text, state, '-incoming <the state file>')}", file=sys.stderr)
    return 1


def _start_incoming(migration: MigrationManager, incoming: list, transport: str) -> None:
    for channel, option in incoming:
        if channel.channel_type == "main" and channel.addr.transport == transport:
            try:
                migration.start_incoming(channel)
            except ChannelError as e:
                raise OSError(f"{option}: {e}") from None


def _write_pidfile(path: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise OSError(f"-pidfile {path}: cannot create pid file: {e.strerror}") from None

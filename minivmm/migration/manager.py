"""A machine's migration state: parameters, capabilities, the current or
last outgoing migration, the incoming one, and what query-migrate says.

``start_outgoing`` picks the kind by the ``mode`` parameter: ``normal`` and
``cpr-reboot`` copy RAM into the stream (outgoing.py); ``cpr-exec`` and
``cpr-transfer`` keep it in place (the cpr package).
"""

from __future__ import annotations

from . import channels, stream
from .incoming import Incoming
from .params import CAPABILITIES, Parameters

ACTIVE = ("setup", "active", "cancelling", "device")


class MigrationError(Exception):
    pass


class MigrationManager:
    def __init__(self, machine, argv: list[str] | None = None) -> None:
        self.machine = machine
        self.argv = list(argv or [])  # this image's command line: a failed cpr-exec restarts the guest with it
        self.params = Parameters()
        self.capabilities = dict.fromkeys(CAPABILITIES, False)
        self.outgoing = None
        self.incoming: Incoming | None = None
        self.handed_over = False  # after cpr-transfer the guest's RAM belongs to the new process
        self.cpr_state = None  # an incoming CPR's state (cpr.state.CprState) until the load completes
        self.cpr_channel = None  # cpr-transfer's connection to the source, hung up once the main channel listens
        self.start_ns = 0  # when this process began: a cpr-exec's timeline

    def named_fd(self, name: str) -> int:
        fd = self.machine.fds.find("getfd", name)
        if fd < 0:
            raise KeyError(f"File descriptor named '{name}' has not been found")
        return fd

    # --- events ---------------------------------------------------------------------
    def set_status(self, migration, status: str) -> None:
        migration.status = status
        if self.capabilities["events"]:
            self.machine.control.emit("MIGRATION", {"status": status})

    def emit_pass(self, n: int) -> None:
        if self.capabilities["events"]:
            self.machine.control.emit("MIGRATION_PASS", {"pass": n})

    # --- outgoing -------------------------------------------------------------------------
    def outgoing_blocks(self) -> list:
        """(block, sent): shared blocks stay out of the stream with x-ignore-shared."""
        ignore_shared = self.capabilities["x-ignore-shared"]
        return [(b, not (ignore_shared and b.shared)) for b in self.machine.memory.blocks]

    def layout(self) -> list[stream.Placement]:
        """Where each block sits in guest-physical memory, as indexes into memory.blocks."""
        blocks = self.machine.memory.blocks
        return [
            stream.Placement(m.gpa, m.size, next(i for i, b in enumerate(blocks) if b is m.block), m.offset)
            for m in self.machine.memory.mappings
        ]

    def start_outgoing(self, main: channels.Channel, others: list[channels.Channel]) -> None:
        """Start ``migrate``: everything that can be refused is refused before the VM stops."""
        if self.outgoing is not None and self.outgoing.status in ACTIVE:
            raise MigrationError("There's a migration process in progress")
        if self.incoming is not None and self.incoming.status != "completed":
            raise MigrationError("Guest is waiting for an incoming migration")
        if self.handed_over:
            raise MigrationError("The VM was handed over with cpr-transfer: only 'cont' or 'quit' apply to it here")
        from minivmm.cpr import outgoing as cpr  # the source side is only needed when migrating out

        mode = self.params.mode
        try:
            cpr_channel = cpr.validate(self.machine, mode, self.params.cpr_exec_command, main, others)
        except cpr.ValidationError as e:
            raise MigrationError(str(e)) from None
        if mode == "cpr-exec":
            from minivmm.cpr.exec import CprExec

            self.outgoing = CprExec(self, main.addr)
        elif mode == "cpr-transfer":
            from minivmm.cpr.transfer import CprTransfer

            self.outgoing = CprTransfer(self, main.addr, cpr_channel.addr)
        else:
            from .outgoing import Outgoing

            self.outgoing = Outgoing(self, main.addr)
        self.outgoing.start()

    def cancel(self) -> None:
        out = self.outgoing
        if out is not None and out.status in ACTIVE:
            self.set_status(out, "cancelling")
            out.cancel()

    # --- incoming ---------------------------------------------------------------------------
    def start_incoming(self, channel: channels.Channel) -> None:
        """Receive a stream: a file is read at once (the vCPU threads must exist), a socket in a thread."""
        channels.check_listen(channel.addr, self.machine.config.listen_remote)
        self.incoming = Incoming(self, channel)
        if self.cpr_channel is not None:  # cpr-transfer: listening now, so hang up the cpr channel
            self.cpr_channel.close()
            self.cpr_channel = None
        if channel.addr.transport == "file":
            self.set_status(self.incoming, "setup")
            self.incoming.run_now()
        else:
            self.incoming.start()

    # --- query-migrate ---------------------------------------------------------------------------
    def info(self) -> dict:
        mig = self.outgoing or self.incoming
        if mig is None:
            return {}
        out = {"status": mig.status, **mig.stats.to_qmp(mig.status)}
        if mig.error:
            out["error-desc"] = mig.error
        return out

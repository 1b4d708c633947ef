"""A machine's migration state: parameters, capabilities, the current or
last outgoing migration, the incoming one, and what query-migrate says."""

from __future__ import annotations

from . import channels, stream
from .incoming import Incoming
from .params import CAPABILITIES, Parameters

ACTIVE = ("setup", "active", "cancelling", "device")


class MigrationError(Exception):
    pass


class MigrationManager:
    def __init__(self, machine) -> None:
        self.machine = machine
        self.params = Parameters()
        self.capabilities = dict.fromkeys(CAPABILITIES, False)
        self.outgoing = None
        self.incoming: Incoming | None = None
        self.named_fd = lambda name: machine.named_fd(name)

    # --- events ---------------------------------------------------------------------
    def set_status(self, migration, status: str) -> None:
        migration.status = status
        if self.capabilities["events"]:
            self.machine.emit("MIGRATION", {"status": status})

    def emit_pass(self, n: int) -> None:
        if self.capabilities["events"]:
            self.machine.emit("MIGRATION_PASS", {"pass": n})

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
        from . import cpr_outgoing  # the source side is only needed when migrating out

        if self.machine.cpr_handed_over:
            raise MigrationError("The VM was handed over with cpr-transfer: only 'cont' or 'quit' apply to it here")
        try:
            cpr = cpr_outgoing.validate(self.machine, main, others)
        except cpr_outgoing.ValidationError as e:
            raise MigrationError(str(e)) from None
        self.outgoing = cpr_outgoing.start(self, main, cpr)
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
        if self.machine.cpr_channel is not None:  # cpr-transfer: listening now, so hang up the cpr channel
            self.machine.cpr_channel.close()
            self.machine.cpr_channel = None
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

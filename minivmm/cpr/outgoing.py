"""The source side of CPR, what cpr-exec and cpr-transfer share: the checks
made before the VM stops, and a stream that keeps every RAM block in place.

Neither mode copies RAM: the stream's header says every block stays where it
is, and the next VMM maps the same memfds.
"""

from __future__ import annotations

import shutil

from minivmm.migration import channels, stream
from minivmm.migration.outgoing import Outgoing

MODES = ("cpr-exec", "cpr-transfer")


class ValidationError(Exception):
    pass


def blockers(machine) -> list[str]:
    """Why this machine cannot do cpr-exec or cpr-transfer (QEMU's wording): RAM another process cannot map."""
    return [
        f"Memory region {b.name} is not compatible with CPR. share=on is required for memory-backend objects, "
        "and aux-ram-share=on is required."
        for b in machine.memory.blocks
        if not b.shared or b.fd < 0
    ]


def validate(
    machine, mode: str, exec_command: list[str], main: channels.Channel, others: list
) -> channels.Channel | None:
    """Refuse what is certain to fail, before the VM stops (QEMU's wording where QEMU has it); the cpr channel.

    Only what this image can know for sure is checked: the new image's command line is the
    new image's to judge (it may know options this one does not), and a new image that
    refuses it keeps the guest's RAM for a retry (holder.py).
    """
    cpr = [c for c in others if c.channel_type == "cpr"]
    if mode != "cpr-transfer" and cpr:
        raise ValidationError("a cpr channel is only valid in mode cpr-transfer")
    if mode in MODES and (found := blockers(machine) + machine.devices.cpr_blockers()):
        raise ValidationError(found[0])
    if mode not in MODES and (found := machine.devices.migration_blockers()):
        raise ValidationError(found[0])  # a device whose state no stream can carry; CPR keeps its fds
    if mode in ("cpr-exec", "cpr-reboot") and main.addr.transport != "file":
        raise ValidationError(f"mode {mode} needs a file: migration URI (the next VMM reads the state from it)")
    if mode == "cpr-exec":
        if not exec_command:
            raise ValidationError("Parameter 'cpr-exec-command' required for cpr-exec")
        if shutil.which(exec_command[0]) is None:
            raise ValidationError(f"cpr-exec-command: '{exec_command[0]}' is not an executable file")
    if mode == "cpr-transfer":
        if not cpr:
            raise ValidationError("missing 'cpr' migration channel")
        if cpr[0].addr.transport != "socket" or cpr[0].addr.type != "unix":
            raise ValidationError("bad cpr channel address; must be unix")
        if main.addr.transport == "file":
            raise ValidationError("Migration requires streamable transport (eg unix)")
        return cpr[0]
    return None


class CprOutgoing(Outgoing):
    """A migration that sends the machine state and no RAM; the new VM binds the same irqfds, and the
    assigned devices' DMA mappings move to the new process (released here, taken there after the load)."""

    def _stop_on_main(self) -> None:
        super()._stop_on_main()
        self.machine.devices.bind_irqfds(False)
        self.machine.devices.cpr_release()

    def _write_state(self, out) -> None:
        writer = stream.Writer(out)
        blocks = self.machine.memory.blocks
        writer.header([stream.BlockInfo(b.name, b.size, False) for b in blocks], self.manager.layout())
        self._send_state(writer)

"""The new image's side of CPR: take the guest's fds before anything is
built, let the machine be built over them, then tidy up.

In order, as ``minivmm.process.run`` calls them:
1. ``take``: the CPR state, from MINIVMM_CPR_STATE_FD (cpr-exec, the first
   thing the new image does) or from the source on the ``-incoming cpr``
   channel (cpr-transfer, before any device exists);
2. the machine is built with ``state.table``: every resource finds its fd
   there (RAM, chardevs, monitors, irqfds) and nothing writes guest RAM;
3. ``adopt``: this image has the guest now (the watchdog stands down),
   fds nobody asked for are closed, the old address space's helper is reaped;
4. the device state is loaded from the main ``-incoming`` channel
   (migration/incoming.py) and the guest resumes.
A failure at any step ends the image with one line (``fail_line``); a
cpr-exec image first hands the guest's RAM to a holder for a retry.
"""

from __future__ import annotations

import os
import threading

from .fdtable import KEEPER
from .state import CprError, CprState, take_exec_state

__all__ = ["CprError", "take_exec_state", "take_transfer", "adopt", "fail_line"]


def take_transfer(state: CprState | None, channels: list) -> tuple[object | None, CprState | None]:
    """cpr-transfer's step 1, when the command line has a cpr channel: (the connection, the state).

    ``channels`` are (Channel, option text) pairs; an image exec'd with CPR state takes no other.
    """
    cpr = [(c, option) for c, option in channels if c.channel_type == "cpr"]
    if not cpr:
        return None, state
    channel, option = cpr[0]
    if state is not None:
        raise CprError(f"{option}: this image was exec'd with CPR state already")
    from .transfer import receive  # only a cpr-transfer target needs it (a cpr-exec image pays for imports)

    try:
        return receive(channel)
    except (CprError, OSError) as e:
        raise CprError(f"{option}: {e}") from None


def adopt(state: CprState) -> None:
    """The machine is built over the fds: this image has the guest."""
    state.report_in()
    state.table.claim(*KEEPER)  # the old image's vCPUs, still running (keeper.py)
    state.table.release_unclaimed()
    for pid in (state.teardown_helper, state.watchdog_pid):  # children of the image this one replaced
        if pid:
            threading.Thread(target=lambda p=pid: os.waitpid(p, 0), name="reap", daemon=True).start()


def fail_line(text: str, state: CprState | None, state_source: str) -> str:
    """The one line for a failure; an exec'd image's guest RAM is first given to a holder."""
    if state is not None and state.mode == "cpr-exec":
        from .holder import hold_for_retry
        from .keeper import halt

        halt(state.table)
        text += hold_for_retry(state, state_source)
    return text

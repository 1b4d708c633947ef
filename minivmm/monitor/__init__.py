"""The QMP monitor: QEMU's monitor protocol over unix and loopback TCP sockets.

``start(machine)`` opens every monitor the machine's config asks for and
forwards the machine's events to their clients.
"""

from __future__ import annotations

from functools import partial

from .server import Monitor, MonitorError, QmpError

__all__ = ["Monitor", "MonitorError", "QmpError", "open_monitors"]


def _dispatch(machine, migration, monitor, conn, name: str, arguments: dict) -> object:
    # The command table is imported at the first command, not at start-up (which a cpr-exec pays for).
    from .commands import dispatch

    return dispatch(machine, migration, monitor, conn, name, arguments)


def open_monitors(machine, migration) -> list[Monitor]:
    """Bind every configured monitor (errors name the option) and subscribe them to events."""
    monitors: list[Monitor] = []
    try:
        for config in machine.config.monitors:
            if config.fd is not None and machine.fds.missing("monitor", config.id):
                raise MonitorError(f"{config.option}: cannot find saved value for fd {config.id}")
            try:
                dispatch = partial(_dispatch, machine, migration)
                monitors.append(Monitor(config, machine.loop, dispatch, machine.fds))
            except MonitorError as e:
                raise MonitorError(f"{config.option}: {e}") from None
    except BaseException:
        for m in monitors:
            m.close()
        raise

    def broadcast(event: str, data: dict | None) -> None:
        for m in monitors:
            m.event(event, data)

    machine.control.add_event_listener(broadcast)
    return monitors

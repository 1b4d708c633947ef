"""QEMU's run states and the transitions between them (system/runstate.c).

The names are QEMU's, so ``query-status`` answers what QEMU's clients
expect. A transition the table does not allow is a bug in minivmm and raises.
"""

from __future__ import annotations

PRELAUNCH = "prelaunch"
RUNNING = "running"
PAUSED = "paused"
SHUTDOWN = "shutdown"
INTERNAL_ERROR = "internal-error"
GUEST_PANICKED = "guest-panicked"
INMIGRATE = "inmigrate"
POSTMIGRATE = "postmigrate"
FINISH_MIGRATE = "finish-migrate"
RESTORE_VM = "restore-vm"
SAVE_VM = "save-vm"
IO_ERROR = "io-error"
SUSPENDED = "suspended"
WATCHDOG = "watchdog"
DEBUG = "debug"
COLO = "colo"

_TRANSITIONS: dict[str, set[str]] = {
    PRELAUNCH: {INMIGRATE, RUNNING, FINISH_MIGRATE},
    DEBUG: {RUNNING, FINISH_MIGRATE, PRELAUNCH, SUSPENDED},
    INMIGRATE: {
        INTERNAL_ERROR,
        IO_ERROR,
        PAUSED,
        RUNNING,
        SHUTDOWN,
        SUSPENDED,
        WATCHDOG,
        GUEST_PANICKED,
        FINISH_MIGRATE,
        PRELAUNCH,
        POSTMIGRATE,
        COLO,
    },
    INTERNAL_ERROR: {PAUSED, FINISH_MIGRATE, PRELAUNCH},
    IO_ERROR: {RUNNING, FINISH_MIGRATE, PRELAUNCH},
    PAUSED: {RUNNING, FINISH_MIGRATE, POSTMIGRATE, PRELAUNCH, COLO},
    POSTMIGRATE: {RUNNING, FINISH_MIGRATE, PRELAUNCH},
    FINISH_MIGRATE: {
        RUNNING,
        PAUSED,
        POSTMIGRATE,
        PRELAUNCH,
        COLO,
        INTERNAL_ERROR,
        IO_ERROR,
        SHUTDOWN,
        SUSPENDED,
        WATCHDOG,
        GUEST_PANICKED,
    },
    RESTORE_VM: {RUNNING, PRELAUNCH},
    COLO: {RUNNING, PRELAUNCH, SHUTDOWN},
    RUNNING: {
        DEBUG,
        INTERNAL_ERROR,
        IO_ERROR,
        PAUSED,
        FINISH_MIGRATE,
        RESTORE_VM,
        SAVE_VM,
        SHUTDOWN,
        WATCHDOG,
        GUEST_PANICKED,
        COLO,
        SUSPENDED,
    },
    SAVE_VM: {RUNNING},
    SHUTDOWN: {PAUSED, FINISH_MIGRATE, PRELAUNCH, COLO},
    SUSPENDED: {RUNNING, FINISH_MIGRATE, PRELAUNCH, COLO},
    WATCHDOG: {RUNNING, FINISH_MIGRATE, PRELAUNCH, COLO},
    GUEST_PANICKED: {RUNNING, FINISH_MIGRATE, PRELAUNCH},
}

# States only a reset leaves: `cont` says "Resetting the Virtual Machine is required".
NEEDS_RESET = {SHUTDOWN, INTERNAL_ERROR}


class RunStateError(RuntimeError):
    pass


def check_transition(old: str, new: str) -> None:
    if old != new and new not in _TRANSITIONS.get(old, set()):
        raise RunStateError(f"invalid runstate transition: '{old}' -> '{new}'")


def is_live(state: str) -> bool:
    """Running (or suspended): what vm_stop acts on."""
    return state in (RUNNING, SUSPENDED)

"""Keeping the guest's RAM and device fds alive when an update goes wrong.

QEMU loses the VM when the image a cpr-exec runs does not take it over.
minivmm starts a small Python process holding copies of the fds, in one of
two modes:

- ``watch`` (started by the source before it stops the VM): waits on a
  pipe whose write end goes through the exec. A minivmm image that has the
  guest writes a byte (``CprState.report_in``). If the pipe closes without
  it (the program exec'd was not minivmm, or it died) or nothing comes
  within MINIVMM_CPR_EXEC_TIMEOUT seconds (a wrapper that hangs, which is
  then killed), the watchdog restarts the guest: it execs minivmm with the
  old image's command line and ``-incoming file:STATE``, handing the fds
  over as cpr-exec does.
- ``hold`` (started by a new image that cannot load): plays the source of a
  cpr-transfer, so that a fixed minivmm started with
  ``-incoming cpr,addr.transport=socket,addr.type=unix,addr.path=SOCKET``
  takes the guest over; it gives up after --timeout seconds.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from minivmm.options import OptionError, seconds_from_env

from .fdtable import FdTable, set_cloexec
from .state import ENV, CprError, CprState, send_state, state_memfd, take_exec_state

HOLD_TIMEOUT = 600
EXEC_TIMEOUT_ENV = "MINIVMM_CPR_EXEC_TIMEOUT"
DEFAULT_EXEC_TIMEOUT = 30.0
READY_TIMEOUT = 10.0  # seconds the source waits for its watchdog to be up (it goes on without, anyway)


def exec_timeout() -> float:
    """Seconds a cpr-exec's new image has to take the guest over (MINIVMM_CPR_EXEC_TIMEOUT)."""
    try:
        return seconds_from_env(EXEC_TIMEOUT_ENV, DEFAULT_EXEC_TIMEOUT)
    except OptionError as e:
        raise CprError(str(e)) from None


def _spawn(mode_args: list[str], state: CprState, extra_fds: tuple[int, ...] = (), stderr=None) -> subprocess.Popen:
    """python -m minivmm.cpr.holder MODE ..., with the table's fds at the same numbers."""
    memfd = state_memfd(state)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "minivmm.cpr.holder", *mode_args],
            pass_fds=[*state.table.fds.values(), memfd, *extra_fds],
            env={**os.environ, ENV: str(memfd)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    finally:
        os.close(memfd)


# --- watch: the source's guard over a cpr-exec ------------------------------------------------------


@dataclass
class Watchdog:
    proc: subprocess.Popen
    pipe: int  # the write end: it goes through the exec

    def cancel(self) -> None:
        """The exec did not happen: stop watching."""
        self.proc.kill()
        self.proc.wait()
        os.close(self.pipe)


def start_watchdog(table: FdTable, rescue_argv: list[str]) -> Watchdog:
    timeout = exec_timeout()
    r, w = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        args = ["watch", "--pipe", str(r), "--ready", str(ready_w), "--pid", str(os.getpid())]
        args += ["--timeout", f"{timeout:g}", "--", *rescue_argv]
        # Its stderr is the VMM's: what it says on a rescue is what the user would have seen from minivmm.
        proc = _spawn(args, CprState("cpr-exec", table), (r, ready_w))
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
        os.close(ready_w)
    try:  # up before the VM stops: a Python starting beside the guest (in a cpr-exec keeper) takes CPU from it
        select.select([ready_r], [], [], READY_TIMEOUT)
    finally:
        os.close(ready_r)
    return Watchdog(proc, w)


def _wait_report(pipe: int, pid: int, timeout: float) -> str | None:
    """None when the new image took the guest over; else why not."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        try:
            os.kill(pid, signal.SIGKILL)  # a wrapper that hangs keeps copies of the fds: it must go
        except ProcessLookupError:
            pass
        return f"did not take the guest over within {timeout:g} s (killed)"
    if os.read(pipe, 1) == b"1":
        return None
    return "ended without taking the guest over"


def watch(pipe: int, pid: int, timeout: float, rescue: list[str], state: CprState) -> int:
    why = _wait_report(pipe, pid, timeout)
    os.close(pipe)
    if why is None:
        return 0
    _say(f"cpr-exec: the new image {why}: restarting the guest with: {' '.join(rescue)}")
    memfd = state_memfd(CprState("cpr-exec", state.table))
    for fd in [*state.table.fds.values(), memfd]:
        set_cloexec(fd, False)
    try:
        os.execvpe(rescue[0], rescue, {**os.environ, ENV: str(memfd)})
    except OSError as e:
        _say(f"cpr-exec: restarting failed: execvp {rescue[0]}: {e.strerror}")
    os.close(memfd)
    for fd in state.table.fds.values():
        set_cloexec(fd, True)
    return hold(_hold_socket(), HOLD_TIMEOUT, state, announce=True)


# --- hold: a failed new image's guest, for a fixed minivmm to pick up ----------------------------------


def _hold_socket() -> str:
    import tempfile

    rundir = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(rundir, f"minivmm-rescue-{os.getpid()}.sock")


def hold_for_retry(state: CprState, state_source: str) -> str:
    """Start a holder for ``state``'s fds; what to tell the user to pick the guest up again (for the error line)."""
    path = _hold_socket()
    try:
        # Not the VMM's stderr: a pipe held open for minutes would hang whoever reads it to the end.
        proc = _spawn(["hold", "--socket", path, "--timeout", str(HOLD_TIMEOUT)], state, stderr=subprocess.DEVNULL)
    except OSError as e:
        return f"; the guest's RAM could not be kept ({e})"
    state.report_in()  # the holder has the guest now: the source's watchdog can stand down
    return (
        f"; the guest's RAM is kept by process {proc.pid} for {HOLD_TIMEOUT} s: retry with "
        f"{_pickup_option(path)} {state_source}"
    )


def _pickup_option(path: str) -> str:
    return f"-incoming cpr,addr.transport=socket,addr.type=unix,addr.path={path}"


def hold(path: str, timeout: float, state: CprState, announce: bool = False) -> int:
    if announce:
        _say(f"cpr-exec: the guest's RAM is kept by process {os.getpid()} for {timeout:g} s: {_pickup_option(path)}")
    deadline = time.monotonic() + timeout
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            break
        except OSError:
            conn.close()
            if time.monotonic() > deadline:
                _say(f"holder: nobody came for the guest's RAM in {timeout:g} s")
                return 1
            time.sleep(0.1)
    with conn:
        send_state(conn, CprState("cpr-transfer", state.table.for_transfer()))
        while conn.recv(64):  # the new VMM hangs up once it holds the fds
            pass
    return 0


def _say(text: str) -> None:
    print(f"minivmm: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minivmm.cpr.holder", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--pipe", type=int, required=True)
    w.add_argument("--ready", type=int, default=-1)  # written to (and closed) once it holds the fds
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--timeout", type=float, required=True)
    w.add_argument("rescue", nargs=argparse.REMAINDER)
    h = sub.add_parser("hold")
    h.add_argument("--socket", required=True)
    h.add_argument("--timeout", type=float, default=HOLD_TIMEOUT)
    args = ap.parse_args(argv)
    state = take_exec_state()
    if state is None:
        _say(f"holder: no CPR state ({ENV}) was given")
        return 1
    if args.mode == "watch":
        if args.ready >= 0:
            os.write(args.ready, b"r")
            os.close(args.ready)
        rescue = args.rescue[1:] if args.rescue[:1] == ["--"] else args.rescue
        return watch(args.pipe, args.pid, args.timeout, rescue, state)
    return hold(args.socket, args.timeout, state)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())

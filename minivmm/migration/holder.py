"""Keeps guest RAM alive after a cpr-exec whose new image could not load.

QEMU loses the VM when the new image fails. minivmm's failing image instead
starts this small process with the preserved fds (the same hand-over as
cpr-exec: MINIVMM_CPR_STATE_FD). It plays the source of a cpr-transfer:
once a fixed minivmm listens with
``-incoming cpr,addr.transport=socket,addr.type=unix,addr.path=SOCKET``,
it connects, sends the fds, waits for the hang-up and exits. It gives up
after --timeout seconds.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from .cpr import CprState, send_state, state_memfd, take_exec_state

DEFAULT_TIMEOUT = 600


def spawn(state: CprState, timeout: int = DEFAULT_TIMEOUT) -> tuple[int, str]:
    """Start a holder for ``state``'s fds; (its pid, the socket to retry with)."""
    import subprocess
    import tempfile

    rundir = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(rundir, f"minivmm-rescue-{os.getpid()}.sock")
    memfd = state_memfd(state)
    fds = [*state.table.fds.values(), memfd]
    proc = subprocess.Popen(
        [sys.executable, "-m", "minivmm.migration.holder", "--socket", path, "--timeout", str(timeout)],
        pass_fds=fds,
        env={**os.environ, "MINIVMM_CPR_STATE_FD": str(memfd)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # a pipe held open for 10 minutes would hang whoever reads ours
    )
    os.close(memfd)
    return proc.pid, path


def retry_hint(state: CprState, state_source: str) -> str:
    """Start a holder and tell the user how to pick the guest up again (appended to the error)."""
    try:
        pid, path = spawn(state)
    except OSError as e:
        return f"; the guest's RAM could not be kept ({e})"
    return (
        f"; the guest's RAM is kept by process {pid} for {DEFAULT_TIMEOUT} s: retry with "
        f"-incoming cpr,addr.transport=socket,addr.type=unix,addr.path={path} {state_source}"
    )


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT)
    args = ap.parse_args()
    state = take_exec_state()
    if state is None:
        print("minivmm holder: no CPR state (MINIVMM_CPR_STATE_FD) was given", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(args.socket)
            break
        except OSError:
            conn.close()
            if time.monotonic() > deadline:
                print(f"minivmm holder: nobody came for the guest's RAM in {args.timeout}s", file=sys.stderr)
                return 1
            time.sleep(0.1)
    with conn:
        send_state(conn, CprState("cpr-transfer", state.table.for_transfer()))
        while conn.recv(64):  # the new VMM hangs up once it holds the fds
            pass
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())

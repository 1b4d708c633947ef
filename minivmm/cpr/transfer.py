"""cpr-transfer: the guest moves to a new VMM process started by the user,
and its RAM and device fds go over a unix socket with SCM_RIGHTS.

Source (``CprTransfer._migrate``), while the guest runs: connect the cpr
channel and send the fd table; the target builds its VM over the fds,
listens on the main channel and hangs up the cpr channel; only then connect
the main channel, stop the VM and send the machine state. With the
return-path capability the source waits for the target's verdict and
resumes if it failed. Every wait has the peer timeout (MINIVMM_STREAM_TIMEOUT)
or ends with migrate_cancel; either way the guest resumes here.

Target (``receive``): accept the source on the cpr channel and take the fd
table before building anything (the handshake's step 1).
"""

from __future__ import annotations

import select
import socket
import time

from minivmm.migration import channels, stream

from .outgoing import CprOutgoing
from .state import CprError, CprState, recv_state, send_state


class CprTransfer(CprOutgoing):
    def __init__(self, manager, addr: channels.Address, cpr_addr: channels.Address) -> None:
        super().__init__(manager, addr)
        self.cpr_addr = cpr_addr

    def _migrate(self) -> None:
        m, loop = self.machine, self.machine.loop
        loop.call_and_wait(lambda: self.manager.set_status(self, "active"))
        # While lent, nothing here may wait for the main loop: it may itself wait for a vCPU
        # that waits for a lent connection.
        with channels.connect(self.cpr_addr, self.manager.named_fd) as cpr_sock, m.devices.lend_connections():
            send_state(cpr_sock, CprState("cpr-transfer", m.fds.for_transfer()))
            self._wait_hangup(cpr_sock)  # built: the target has asked device servers what it needed
        out = channels.connect(self.addr, self.manager.named_fd)
        out.settimeout(stream.timeout())  # a target that stops reading fails the migration: the guest resumes here
        return_path = self.manager.capabilities["return-path"]
        try:
            self._stop_vm()
            try:
                self._write_state(out)
            except OSError:
                if return_path:  # a target that failed early hangs up: its verdict says why
                    self._wait_verdict(out)
                raise
            if return_path:
                self._wait_verdict(out)
        finally:
            out.close()
        m.devices.hand_over_connections()
        loop.call_and_wait(lambda: self._finish("completed", None))

    def _wait_hangup(self, sock: socket.socket) -> None:
        """The new process closes the cpr channel once it listens on the main one."""
        limit = stream.timeout()
        deadline = time.monotonic() + limit
        while True:
            self._check_cancel()
            if time.monotonic() > deadline:
                raise CprError(f"the target did not listen on the main channel within {limit:g} s")
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready and not sock.recv(64):
                return

    def _wait_verdict(self, out: socket.socket) -> None:
        """The target's answer, within the peer timeout; a cancel ends the wait (the guest resumes here)."""
        limit = stream.timeout()
        deadline = time.monotonic() + limit
        verdict = b""
        while not verdict.endswith(b"\n"):
            self._check_cancel()
            if time.monotonic() > deadline:
                raise CprError(f"the target did not report its load within {limit:g} s (return path)")
            ready, _, _ = select.select([out], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = out.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise CprError("the target closed the return path before loading the state")
            verdict += chunk
        if verdict != stream.VERDICT_OK:
            raise CprError(f"the target failed to load the state: {verdict.decode(errors='replace').strip()}")

    def _finish(self, status: str, error: str | None) -> None:
        super()._finish(status, error)
        if status == "completed":
            self.manager.handed_over = True  # the RAM now belongs to the new process


def receive(channel: channels.Channel) -> tuple[socket.socket, CprState]:
    """The target's step 1: the source's connection on the cpr channel and the fd table it sent."""
    addr = channel.addr
    if addr.transport != "socket" or addr.type not in ("unix", "fd"):
        raise CprError("bad cpr channel address; must be unix")
    try:
        listener = channels.Listener(addr, inherited_fd=True)
        conn = listener.accept()
    except channels.ChannelError as e:
        raise CprError(str(e)) from None
    try:
        return conn, recv_state(conn, stream.timeout())
    except BaseException:
        conn.close()
        raise

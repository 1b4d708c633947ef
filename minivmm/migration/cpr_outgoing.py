"""The source side of CPR live update: cpr-exec and cpr-transfer.

Neither copies RAM: the stream says every block stays where it is, and the
next VMM maps the same memfds. Everything that can be refused is refused in
``validate``, before the VM stops.

cpr-exec: stop, write the machine state to the file, put the fd table in a
memfd named by MINIVMM_CPR_STATE_FD, clear FD_CLOEXEC on exactly those fds,
exec the new image: same PID. If exec fails, every fd gets FD_CLOEXEC back,
the memfd is closed, and the VM runs on here.

cpr-transfer: send the fd table by SCM_RIGHTS over the cpr channel while the
guest runs; the new process builds its VM over the fds, listens on the main
channel and hangs up the cpr channel; only then connect the main channel,
stop the VM and send the machine state. With the return-path capability
the source waits for the target's verdict and resumes if it failed.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import sys
import time

from . import channels, stream
from .cpr import CprError, CprState, now_ns, send_state, set_cloexec, state_memfd
from .outgoing import Outgoing
from .progress import VERDICT_OK, on_main


class ValidationError(Exception):
    pass


def validate(machine, main: channels.Channel, others: list[channels.Channel]) -> channels.Channel | None:
    """Refuse what cannot work (QEMU's wording where QEMU has it); the cpr channel, if any."""
    params = machine.migration.params
    mode = params.mode
    cpr = [c for c in others if c.channel_type == "cpr"]
    if mode != "cpr-transfer" and cpr:
        raise ValidationError("a cpr channel is only valid in mode cpr-transfer")
    if mode in ("cpr-exec", "cpr-transfer"):
        blockers = machine.cpr_blockers()
        if blockers:
            raise ValidationError(blockers[0])
    if mode in ("cpr-exec", "cpr-reboot") and main.addr.transport != "file":
        raise ValidationError(f"mode {mode} needs a file: migration URI (the next VMM reads the state from it)")
    if mode == "cpr-exec":
        argv = params.cpr_exec_command
        if not argv:
            raise ValidationError("Parameter 'cpr-exec-command' required for cpr-exec")
        if shutil.which(argv[0]) is None:
            raise ValidationError(f"cpr-exec-command: '{argv[0]}' is not an executable file")
        # The rest of the command line is the new image's to judge: it may know options this one does
        # not. A new image that refuses it keeps the guest's RAM in a holder (see holder.py).
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
    """What both modes share: a stream that keeps every RAM block in place."""

    def _stop_on_main(self) -> None:
        super()._stop_on_main()
        self.machine.bind_irqfds(False)  # the new VM binds the same eventfds

    def _write_state(self, out) -> None:
        writer = stream.Writer(out)
        blocks = self.machine.memory.blocks
        writer.header([stream.BlockInfo(b.name, b.size, False) for b in blocks], self.manager.layout())
        self._send_state(writer)


_CLONE_VM = 0x100
_SIGCHLD = 17
_TEARDOWN_DELAY_S = 1


def defer_teardown() -> int:
    """Keep this address space alive in a sleeping helper across the exec.

    exec tears down the old address space before the new image runs, and
    on this kind of host that takes time in proportion to the guest RAM
    mapped (about 0.1 s per GiB here; the KVM VM goes with it). A helper
    made with clone(CLONE_VM) shares the address space and holds copies of
    the fds, so exec merely drops a reference; the helper runs nothing but
    libc's sleep() on its own small stack, then exits, and the teardown
    happens then, after the new image has resumed the guest. Its pid goes
    to the new image in the CPR state, which reaps it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    stack = ctypes.create_string_buffer(64 * 1024)
    defer_teardown.stack = stack  # must outlive this call: the helper runs on it
    libc.clone.restype = ctypes.c_int
    libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    entry = ctypes.cast(libc.sleep, ctypes.c_void_p).value
    pid = libc.clone(entry, ctypes.addressof(stack) + len(stack) - 64, _CLONE_VM | _SIGCHLD, _TEARDOWN_DELAY_S)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone of the teardown helper failed")
    return pid


class CprExec(CprOutgoing):
    def _migrate(self) -> None:
        loop = self.machine.loop
        on_main(loop, lambda: self.manager.set_status(self, "active"))
        self._stop_vm()
        with channels.connect(self.addr, self.manager.named_fd) as out:
            self._write_state(out)
        on_main(loop, self._exec)  # returns only if exec failed

    def _exec(self) -> None:
        """On the main thread, with everything else quiet: become the new image."""
        m = self.machine
        argv = self.manager.params.cpr_exec_command
        helper = defer_teardown()
        self.times["exec"] = now_ns()
        state = CprState("cpr-exec", m.cpr_table, dict(self.times), teardown_helper=helper)
        memfd = state_memfd(state)
        fds = list(m.cpr_table.fds.values())
        env = {**os.environ, "MINIVMM_CPR_STATE_FD": str(memfd)}
        for chardev in m.chardevs:
            chardev.suspend()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in [*fds, memfd]:
            set_cloexec(fd, False)  # only now, and only these
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.kill(helper, signal.SIGKILL)
            os.waitpid(helper, 0)
            for fd in fds:
                set_cloexec(fd, True)
            os.close(memfd)
            for chardev in m.chardevs:
                chardev.resume()
            raise CprError(f"execvp {argv[0]} failed: {e.strerror}") from None


class CprTransfer(CprOutgoing):
    def __init__(self, manager, addr: channels.Address, cpr_addr: channels.Address) -> None:
        super().__init__(manager, addr)
        self.cpr_addr = cpr_addr

    def _migrate(self) -> None:
        m, loop = self.machine, self.machine.loop
        with channels.connect(self.cpr_addr, self.manager.named_fd) as cpr_sock:
            send_state(cpr_sock, CprState("cpr-transfer", m.cpr_table.for_transfer()))
            on_main(loop, lambda: self.manager.set_status(self, "active"))
            self._wait_hangup(cpr_sock)
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
        on_main(loop, lambda: self._finish("completed", None))

    def _wait_hangup(self, sock: socket.socket) -> None:
        """The new process closes the cpr channel once it listens on the main one."""
        while True:
            self._check_cancel()
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
        if verdict != VERDICT_OK:
            raise CprError(f"the target failed to load the state: {verdict.decode(errors='replace').strip()}")

    def _finish(self, status: str, error: str | None) -> None:
        super()._finish(status, error)
        if status == "completed":
            self.machine.cpr_handed_over = True  # the RAM now belongs to the new process


def start(manager, main: channels.Channel, cpr: channels.Channel | None) -> Outgoing:
    mode = manager.params.mode
    if mode == "cpr-exec":
        return CprExec(manager, main.addr)
    if mode == "cpr-transfer":
        return CprTransfer(manager, main.addr, cpr.addr)
    return Outgoing(manager, main.addr)

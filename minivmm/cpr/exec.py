"""cpr-exec, the source side: the VMM execs a new image of itself (same PID)
and the guest's RAM and device fds go with it.

In order (``CprExec._migrate`` then ``_exec``):
1. the VM stops and its state (no RAM) goes to the file;
2. a running guest runs on in the keeper's tasks (keeper.py) while the exec
   and the new image's start-up go by; the new image takes it over;
3. (before 1, in fact, so that the guest does not share the CPUs with its
   start-up) a watchdog starts with copies of the fds (holder.py): if the
   program exec'd never takes the guest over, it restarts it;
4. on the main thread, with nothing else running: without a keeper, a
   helper keeps the old address space alive so exec does not pay for
   tearing it down (``defer_teardown``); the fd table goes into a memfd
   named by MINIVMM_CPR_STATE_FD, FD_CLOEXEC is cleared on exactly those
   fds, and ``execvpe`` runs the new image (cpr/incoming.py takes it from
   there).
If exec itself fails, every step is undone and the guest runs on here.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from minivmm import runstate
from minivmm.migration import channels

from . import holder, keeper
from .fdtable import set_cloexec
from .outgoing import CprOutgoing
from .state import ENV, CprError, CprState, state_memfd

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


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class CprExec(CprOutgoing):
    def _migrate(self) -> None:
        loop = self.machine.loop
        table = self.machine.fds
        kept = -1
        watchdog = None
        try:
            loop.call_and_wait(lambda: self.manager.set_status(self, "active"))
            keeper.reaped()  # the previous update's, if it was one
            kept = loop.call_and_wait(self._prepare_keeper)
            watchdog = holder.start_watchdog(table, self._rescue_command())  # with the keeper's block
            self._stop_vm()
            with channels.connect(self.addr, self.manager.named_fd) as out:
                self._write_state(out)
            if kept >= 0:
                loop.call_and_wait(lambda: keeper.start(kept, self.machine))
                self.times["kept"] = time.monotonic_ns()
            loop.call_and_wait(lambda: self._exec(watchdog, kept >= 0))  # returns only if exec failed
        finally:  # still here: exec failed, or the migration did
            if watchdog is not None:
                watchdog.cancel()
            if kept >= 0:
                loop.call_and_wait(lambda: keeper.take_back(self.machine, kept))

    def _prepare_keeper(self) -> int:
        """On the main thread: the keeper's control block, so that the guest can run on in its tasks
        while the exec and the new image's start-up go by (cpr/keeper.py); -1 for no keeper."""
        if self.old_state != runstate.RUNNING or keeper.unusable(self.machine) is not None:
            return -1  # a paused guest stays paused; a machine the keeper cannot serve waits
        return keeper.prepare(self.machine)

    def _rescue_command(self) -> list[str]:
        """This image's own command line, resuming from the state file: the watchdog's way back."""
        kept, words = [], iter(self.manager.argv)
        for word in words:
            if word.lstrip("-") == "incoming":
                next(words, None)  # the old image's incoming channel, if it had one, is spent
            elif word.lstrip("-") != "S":  # the guest resumes as it was, not paused
                kept.append(word)
        return [sys.executable, "-m", "minivmm", *kept, "-incoming", self.addr.describe()]

    def _exec(self, watchdog: holder.Watchdog, kept: bool) -> None:
        """On the main thread, with everything else quiet: become the new image."""
        m = self.machine
        argv = self.manager.params.cpr_exec_command
        helper = 0 if kept else defer_teardown()  # the keeper's tasks hold the address space already
        self.times["exec"] = time.monotonic_ns()
        watchdog_fd = watchdog.pipe
        state = CprState(
            "cpr-exec", m.fds, dict(self.times), helper, watchdog_fd=watchdog_fd, watchdog_pid=watchdog.proc.pid
        )
        memfd = state_memfd(state)
        fds = list(m.fds.fds.values())
        env = {**os.environ, ENV: str(memfd)}
        for chardev in m.devices.chardevs:
            chardev.suspend()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in [*fds, memfd, watchdog_fd]:
            set_cloexec(fd, False)  # only now, and only these
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            if helper:
                _kill(helper)
            for fd in [*fds, watchdog_fd]:
                set_cloexec(fd, True)
            os.close(memfd)
            for chardev in m.devices.chardevs:
                chardev.resume()
            raise CprError(f"execvp {argv[0]} failed: {e.strerror}") from None

"""The C run loop's Python side: one ``RunLoop`` per vCPU, driven by VcpuThread._run.

runloop.c runs KVM_RUN until an exit it does not handle itself (see there),
so the Python loop's handling of every other exit stays the one reference.
The compiled module (minivmm.kvm._runloop) is built by ``pip install`` when
a C compiler is there; ``UNAVAILABLE`` says why it is not, and the caller
falls back to the Python loop.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import partial

try:
    from ._runloop import ffi, lib
except ImportError as e:  # not built (no compiler at install time), or cffi missing
    ffi = lib = None
    UNAVAILABLE: str | None = f"the C run loop is not built ({e})"
else:
    UNAVAILABLE = None


class Latch(ctypes.Structure):
    """A latch port's registers (struct minivmm_latch): the last value written and the count of writes.

    The device owns it and reads it; the C loop stores into it on the writes it handles.
    """

    _fields_ = [("last", ctypes.c_uint32), ("count", ctypes.c_uint64)]


class RunLoop:
    """The C loop's state for one vCPU (struct minivmm_loop)."""

    def __init__(self, vcpu_fd: int) -> None:
        if lib is None:
            raise RuntimeError(UNAVAILABLE)
        self._loop = ffi.new("struct minivmm_loop *")
        self._loop.fd = vcpu_fd
        self._loop.hot = 1
        self._latches: list[Latch] = []  # kept alive while C holds their addresses
        self._run = None

    def add_latch(self, port: int, latch: Latch) -> None:
        """OUTs to ``port`` store into ``latch`` in C, as the device's own write does."""
        if lib.minivmm_add_latch(self._loop, port, ffi.cast("struct minivmm_latch *", ctypes.addressof(latch))):
            raise ValueError(f"no room for a latch at port {port:#x}")
        self._latches.append(latch)

    @property
    def hot(self) -> bool:
        return bool(self._loop.hot)

    @hot.setter
    def hot(self, value: bool) -> None:
        """False: C returns every exit to Python (work to do before each KVM_RUN)."""
        self._loop.hot = int(value)

    def enter(self, run: memoryview) -> Callable[[], int]:
        """Hold ``run`` (the vCPU's kvm_run) until ``leave``; the returned call runs the loop.

        It returns 0 with an exit for Python in kvm_run, or -1 when KVM_RUN failed (``errno``).
        """
        self._run = ffi.from_buffer(run)
        self._loop.run = ffi.cast("struct kvm_run *", self._run)
        return partial(lib.minivmm_run, self._loop)

    def leave(self) -> int:
        """Let go of kvm_run (so it can be unmapped); the exits C handled since ``enter``."""
        self._loop.run = ffi.NULL
        if self._run is not None:
            ffi.release(self._run)
            self._run = None
        handled, self._loop.hot_exits = self._loop.hot_exits, 0
        return handled

    @staticmethod
    def errno() -> int:
        """errno after the last failed KVM_RUN in this thread."""
        return ffi.errno

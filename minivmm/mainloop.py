"""The main thread's event loop: fds, timers and calls from other threads.

vCPU threads never block on it: they hand work over with
``call_soon_threadsafe`` (a byte on a pipe wakes the loop). A selector loop
of our own keeps start-up cheap (asyncio costs milliseconds to import, and a
CPR update pays for every import).
"""

from __future__ import annotations

import heapq
import os
import selectors
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable


class MainLoop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, (self._drain_wakeups, None))
        self._calls: deque[tuple[Callable, tuple]] = deque()
        self._timers: list[tuple[float, int, Callable, tuple]] = []
        self._timer_seq = 0
        self._running = False
        self._always_ready: dict[int, tuple[Callable | None, Callable | None]] = {}
        self.thread_id = threading.get_ident()

    # --- fds -----------------------------------------------------------------
    def _update(self, fd: int, reader: Callable | None, writer: Callable | None) -> None:
        if fd in self._always_ready or not self._pollable(fd):
            self._always_ready[fd] = (reader, writer)
            if not reader and not writer:
                del self._always_ready[fd]
            return
        events = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        if fd in self.selector.get_map():
            if events:
                self.selector.modify(fd, events, (reader, writer))
            else:
                self.selector.unregister(fd)
        elif events:
            self.selector.register(fd, events, (reader, writer))

    @staticmethod
    def _pollable(fd: int) -> bool:
        """Regular files (and /dev/null) cannot be polled: they are always ready."""
        mode = os.fstat(fd).st_mode
        return not (stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and os.major(os.fstat(fd).st_rdev) == 1))

    def _handlers(self, fd: int) -> tuple[Callable | None, Callable | None]:
        if fd in self._always_ready:
            return self._always_ready[fd]
        key = self.selector.get_map().get(fd)
        return key.data if key else (None, None)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._update(fd, callback, self._handlers(fd)[1])

    def remove_reader(self, fd: int) -> None:
        self._update(fd, None, self._handlers(fd)[1])

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._update(fd, self._handlers(fd)[0], callback)

    def remove_writer(self, fd: int) -> None:
        self._update(fd, self._handlers(fd)[0], None)

    def forget(self, fd: int) -> None:
        self._update(fd, None, None)

    # --- calls and timers ----------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable, *args: object) -> None:
        self._calls.append((fn, args))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def call_and_wait(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the main loop and wait for its result (from another thread); its exception is raised here."""
        done, box = threading.Event(), {}

        def call() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # handed back to the waiting thread
                box["error"] = e
            finally:
                done.set()

        self.call_soon_threadsafe(call)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def call_later(self, delay: float, fn: Callable, *args: object) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, fn, args))

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # --- running -----------------------------------------------------------------
    def stop(self) -> None:
        self._running = False
        self.call_soon_threadsafe(lambda: None)

    def run(self) -> None:
        self._running = True
        while self._running:
            timeout = None
            if self._calls or self._always_ready:
                timeout = 0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, events in self.selector.select(timeout):
                reader, writer = key.data
                if events & selectors.EVENT_READ and reader:
                    self._call(reader)
                if events & selectors.EVENT_WRITE and writer and key.fd in self.selector.get_map():
                    self._call(writer)
            for reader, writer in list(self._always_ready.values()):
                for handler in (reader, writer):
                    if handler:
                        self._call(handler)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._timers)
                self._call(fn, *args)
            for _ in range(len(self._calls)):
                fn, args = self._calls.popleft()
                self._call(fn, *args)

    def _call(self, fn: Callable, *args: object) -> None:
        """The main thread's barrier: a failing callback is reported and the loop (and guest) go on."""
        try:
            fn(*args)
        except Exception as e:
            self.on_error(fn, e)

    @staticmethod
    def on_error(fn: Callable, error: Exception) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        print(f"minivmm: internal error in {name}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

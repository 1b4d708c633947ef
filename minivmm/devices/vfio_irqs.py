"""The interrupts of a PCI function outside minivmm (vfio_function.py): which of INTx, MSI and
MSI-X the guest has on, the eventfds the device signals for them, and how each reaches the guest
without passing through minivmm, as QEMU's vfio-pci wires them with KVM:

- MSI and MSI-X: an eventfd per vector, given to the device (SET_IRQS) and bound as a KVM irqfd on
  the vector's own GSI, routed to the message the guest wrote. A masked MSI-X vector's irqfd is
  unbound: what the device signals meanwhile waits in the eventfd (the vector's pending bit), and
  binding it again delivers it.
- INTx: an eventfd bound as a level-triggered irqfd on the pin's GSI, with a second eventfd that KVM
  signals at the guest's EOI and the device takes as its unmask (SET_IRQS ACTION_UNMASK): the device
  masks itself when it fires (VFIO's automask) and fires again after the EOI if still asserted. It
  needs KVM's own IOAPIC; with kernel-irqchip=split the function shows no interrupt pin.
- one mode at a time, as in VFIO: MSI-X, else MSI, else INTx.

Every eventfd is made with the function and kept in the CPR table under QEMU's names
(``<device>_interrupt`` by vector, ``<device>_intx-interrupt``, ``<device>_intx-unmask``): a kept
kernel device still signals them after an update, so the new image tells it nothing until the
guest changes something (``quiet``).
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from dataclasses import dataclass

from minivmm.log import message as say
from minivmm.vfio import constants as vc

INTX, MSI, MSIX = vc.VFIO_PCI_INTX_IRQ_INDEX, vc.VFIO_PCI_MSI_IRQ_INDEX, vc.VFIO_PCI_MSIX_IRQ_INDEX
TRIGGER, UNMASK = vc.VFIO_IRQ_SET_ACTION_TRIGGER, vc.VFIO_IRQ_SET_ACTION_UNMASK
Message = tuple[int, int]  # an MSI's (address, data)


@dataclass
class Vector:
    fd: int  # the eventfd the device signals
    gsi: int
    route: Message | None = None  # bound as an irqfd with this message, or unbound


@dataclass
class Intx:
    gsi: int
    fd: int  # the device's trigger
    unmask: int  # KVM signals it at the guest's EOI; the device unmasks on it


class Interrupts:
    """One function's interrupt wiring. ``call(fn)`` runs ``fn(transport)`` on the device (a failure
    fails that call alone); its eventfds are ``<fd_prefix>_<kind>`` in the CPR table, by vector. A route
    or irqfd KVM refuses is one line naming the function and the vector, which stays undelivered:
    whatever the guest writes, the guest runs on."""

    def __init__(self, label: str, wiring, call: Callable, fd_prefix: str, vectors: int, quiet: bool):
        self.label, self.wiring, self.call, self.fd_prefix = label, wiring, call, fd_prefix
        gsis = wiring.gsis(vectors)
        self.vectors = [Vector(self._eventfd("interrupt", n), gsi) for n, gsi in enumerate(gsis)]
        self.intx: Intx | None = None
        self.mode: int | None = None  # the interrupt index the device has eventfds for
        self.quiet = quiet

    def _eventfd(self, name: str, n: int = 0) -> int:
        fd, _ = self.wiring.fds.open(f"{self.fd_prefix}_{name}", str(n), lambda: os.eventfd(0, os.EFD_CLOEXEC))
        return fd

    def wire_intx(self, gsi: int) -> None:
        """The pin's GSI, once the function has its slot: INTx can be on from now."""
        self.intx = Intx(gsi, self._eventfd("intx-interrupt"), self._eventfd("intx-unmask"))

    def sync(self, mode: int | None, messages: list[Message | None]) -> None:
        """Make the wiring what the guest's configuration says: ``mode`` the index on (None: none),
        ``messages`` each MSI or MSI-X vector's message, None where it is masked."""
        if mode != self.mode:
            self._leave()
            self.mode = mode
            self._enter()
        if mode in (MSI, MSIX):
            for vector, message in zip(self.vectors, messages):
                self._route(vector, message)
        self.quiet = False

    def _device(self, fn: Callable) -> None:
        if not self.quiet:
            self.call(fn)

    def _leave(self) -> None:
        w = self.wiring
        if self.mode == INTX:
            w.remove_irqfd(self.intx.fd)
        else:
            for vector in self.vectors:
                self._route(vector, None)
        if self.mode is not None:
            index = self.mode
            self._device(lambda t: t.set_irqs(index, TRIGGER, count=0))

    def _enter(self) -> None:
        index = self.mode
        if index == INTX:  # as QEMU: the irqfd, the device's trigger and unmask eventfds, then an unmask
            i = self.intx
            try:
                self.wiring.add_irqfd(i.gsi, i.fd, i.unmask)
            except OSError as e:
                say(f"{self.label}: INTx on GSI {i.gsi}: {e}")
            self._device(lambda t: t.set_irqs(INTX, TRIGGER, [i.fd]))
            self._device(lambda t: t.set_irqs(INTX, UNMASK, [i.unmask]))
            self.call(lambda t: t.set_irqs(INTX, UNMASK))  # also after an update: an edge may have been lost
        elif index in (MSI, MSIX):
            count = 1 if index == MSI else len(self.vectors)
            fds = [v.fd for v in self.vectors[:count]]
            self._device(lambda t: t.set_irqs(index, TRIGGER, fds))

    def route(self, n: int, message: Message | None) -> None:
        """Vector ``n`` alone to ``message`` (None: masked), its mode being on."""
        self._route(self.vectors[n], message)

    def _route(self, vector: Vector, message: Message | None) -> None:
        if message == vector.route:
            return
        w = self.wiring
        try:
            if message is None:
                w.remove_irqfd(vector.fd)
                w.set_route(vector.gsi, None)
            else:
                w.set_route(vector.gsi, message)
                if vector.route is None:
                    w.add_irqfd(vector.gsi, vector.fd)  # a signal that waited while masked is delivered now
            vector.route = message
        except OSError as e:
            n = self.vectors.index(vector)
            say(f"{self.label}: vector {n} (GSI {vector.gsi}) to {message}: {e}")
            w.remove_irqfd(vector.fd)  # unbound, as a masked vector: the next message the guest writes binds it
            vector.route = None

    def pending(self, n: int) -> bool:
        """MSI-X's pending bit: vector ``n`` is masked (its irqfd unbound) and its device has signalled it."""
        vector = self.vectors[n]
        if vector.route is not None:
            return False
        poll = select.poll()  # not select(): a device's eventfds can be past fd 1024
        poll.register(vector.fd, select.POLLIN)
        return bool(poll.poll(0))

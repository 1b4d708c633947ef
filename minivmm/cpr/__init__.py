"""CPR live update: the VMM is replaced under a running guest, whose RAM and
device fds stay where they are (QEMU's cpr-exec and cpr-transfer).

- fdtable.py: the table of fds that outlive the process (used by the machine core)
- state.py: that table as a blob, and its way to the next process
- outgoing.py: the checks made before the VM stops; the RAM-less stream
- exec.py: cpr-exec, the source: persist, exec, and every recovery step
- transfer.py: cpr-transfer, both ends of the cpr channel
- incoming.py: the new image's side, from taking the fds to adopting the guest
- holder.py: a process that keeps the guest's fds when an update goes wrong

This package's __init__ imports nothing: the core imports fdtable alone.
"""

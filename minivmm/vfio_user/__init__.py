"""vfio-user: the VFIO device model over a unix socket (QEMU's docs/interop/vfio-user.rst)."""

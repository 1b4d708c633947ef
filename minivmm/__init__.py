"""minivmm: a small KVM hypervisor in Python, with QEMU's command line and CPR live update."""

__version__ = "0.1.0"

"""Emulated devices and the bus that routes port I/O and MMIO to them."""

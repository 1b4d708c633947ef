"""Vendored KVM bindings: structures, ioctl numbers and thin fd wrappers (no policy)."""

"""VFIO and iommufd: vendored bindings for <linux/vfio.h> and <linux/iommufd.h>, and what this host's kernel offers."""

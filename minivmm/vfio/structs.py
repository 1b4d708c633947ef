"""ctypes mirrors of the <linux/vfio.h> and <linux/iommufd.h> structures minivmm uses.

Field names and layout follow the kernel's uapi headers; tests/test_vfio_abi.py
checks every size and offset against the installed headers (and skips, saying
so, the structures a header lacks). Every VFIO and iommufd ioctl takes one of
these with its size in the first field (``argsz``, ``size``): ``sized`` fills it.
Structures ending in a flexible array are built by the ``*_with(n)`` helpers.
"""

from __future__ import annotations

from ctypes import Structure, c_int32, c_uint8, c_uint16, c_uint32, c_uint64, sizeof
from functools import cache

u8, u16, u32, u64, s32 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32


# --- <linux/vfio.h>: container, group, device ------------------------------------------------------
class vfio_info_cap_header(Structure):
    _fields_ = [("id", u16), ("version", u16), ("next", u32)]


class vfio_group_status(Structure):
    _fields_ = [("argsz", u32), ("flags", u32)]


class vfio_device_info(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("num_regions", u32), ("num_irqs", u32), ("cap_offset", u32)]


class vfio_region_info(Structure):
    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("index", u32),
        ("cap_offset", u32),
        ("size", u64),
        ("offset", u64),
    ]


class vfio_region_sparse_mmap_area(Structure):
    _fields_ = [("offset", u64), ("size", u64)]


class vfio_region_info_cap_sparse_mmap(Structure):
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", u32), ("reserved", u32)]


class vfio_irq_info(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("count", u32)]


class vfio_irq_set(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("start", u32), ("count", u32)]


class vfio_iommu_type1_info(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova_pgsizes", u64), ("cap_offset", u32)]


class vfio_iommu_type1_dma_map(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("vaddr", u64), ("iova", u64), ("size", u64)]


class vfio_iommu_type1_dma_unmap(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("iova", u64), ("size", u64)]


class vfio_device_feature(Structure):
    _fields_ = [("argsz", u32), ("flags", u32)]


# --- <linux/vfio.h>, Linux 6.6: the device cdev bound to an iommufd ---------------------------------
# The layouts of 6.6; later kernels append fields (pasid, a token pointer) that argsz lets us leave out.
class vfio_device_bind_iommufd(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("iommufd", s32), ("out_devid", u32)]


class vfio_device_attach_iommufd_pt(Structure):
    _fields_ = [("argsz", u32), ("flags", u32), ("pt_id", u32)]


class vfio_device_detach_iommufd_pt(Structure):
    _fields_ = [("argsz", u32), ("flags", u32)]


VFIO_CDEV_STRUCTS = ("vfio_device_bind_iommufd", "vfio_device_attach_iommufd_pt", "vfio_device_detach_iommufd_pt")


# --- <linux/iommufd.h> -----------------------------------------------------------------------------
class iommu_destroy(Structure):
    _fields_ = [("size", u32), ("id", u32)]


class iommu_ioas_alloc(Structure):
    _fields_ = [("size", u32), ("flags", u32), ("out_ioas_id", u32)]


class iommu_iova_range(Structure):
    _fields_ = [("start", u64), ("last", u64)]


class iommu_ioas_iova_ranges(Structure):
    _fields_ = [
        ("size", u32),
        ("ioas_id", u32),
        ("num_iovas", u32),
        ("__reserved", u32),
        ("allowed_iovas", u64),
        ("out_iova_alignment", u64),
    ]


class iommu_ioas_map(Structure):
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("ioas_id", u32),
        ("__reserved", u32),
        ("user_va", u64),
        ("length", u64),
        ("iova", u64),
    ]


class iommu_ioas_map_file(Structure):
    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("ioas_id", u32),
        ("fd", s32),
        ("start", u64),
        ("length", u64),
        ("iova", u64),
    ]


class iommu_ioas_unmap(Structure):
    _fields_ = [("size", u32), ("ioas_id", u32), ("iova", u64), ("length", u64)]


class iommu_option(Structure):
    _fields_ = [
        ("size", u32),
        ("option_id", u32),
        ("op", u16),
        ("__reserved", u16),
        ("object_id", u32),
        ("val64", u64),
    ]


class iommu_vfio_ioas(Structure):
    _fields_ = [("size", u32), ("ioas_id", u32), ("op", u16), ("__reserved", u16)]


class iommu_ioas_change_process(Structure):
    _fields_ = [("size", u32), ("__reserved", u32)]


# --- helpers ---------------------------------------------------------------------------------------
def sized(struct: type[Structure], **fields: int) -> Structure:
    """An instance with its first field (argsz or size) set to its size, as every ioctl here wants."""
    value = struct(**fields)
    setattr(value, struct._fields_[0][0], sizeof(struct))
    return value


@cache
def irq_set_with(n: int) -> type[Structure]:
    """vfio_irq_set followed by ``n`` bytes of data (``n // 4`` eventfds, or ``n`` booleans)."""
    return type(f"vfio_irq_set_{n}", (Structure,), {"_fields_": [*vfio_irq_set._fields_, ("data", u8 * n)]})


@cache
def sparse_mmap_with(n: int) -> type[Structure]:
    """The sparse-mmap capability with ``n`` areas."""
    fields = [*vfio_region_info_cap_sparse_mmap._fields_, ("areas", vfio_region_sparse_mmap_area * n)]
    return type(f"vfio_region_info_cap_sparse_mmap_{n}", (Structure,), {"_fields_": fields})

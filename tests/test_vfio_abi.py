"""The vendored VFIO and iommufd bindings against the kernel's own headers: every
structure's size and field offsets, every ioctl number and constant, as a C
compiler sees them in <linux/vfio.h> and <linux/iommufd.h>.

Three groups, each checked where the installed headers have it and skipped,
saying which header lacks what, where they do not: the VFIO base (container,
group, device), the VFIO device cdev (Linux 6.6) and iommufd (Linux 6.2; its
MAP_FILE and CHANGE_PROCESS 6.13).
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sysconfig

import pytest

from minivmm.vfio import constants, ioctls, structs

cffi = pytest.importorskip("cffi", reason="cffi is not installed (the C side of this check is built with it)")
_CC = (sysconfig.get_config_var("CC") or "cc").split()[0]
pytestmark = pytest.mark.skipif(shutil.which(_CC) is None, reason=f"no C compiler ({_CC})")

# group: (header, a macro that tells whether the header has the group, the kernel that added it)
GROUPS = {
    "vfio": ("linux/vfio.h", "VFIO_DEVICE_GET_INFO", "Linux 3.6"),
    "vfio-cdev": ("linux/vfio.h", "VFIO_DEVICE_BIND_IOMMUFD", "Linux 6.6"),
    "iommufd": ("linux/iommufd.h", "IOMMU_IOAS_ALLOC", "Linux 6.2"),
    "iommufd-cpr": ("linux/iommufd.h", "IOMMU_IOAS_CHANGE_PROCESS", "Linux 6.13"),
}
_IOMMUFD_CPR = ("iommu_ioas_map_file", "iommu_ioas_change_process", "IOMMU_IOAS_MAP_FILE", "IOMMU_IOAS_CHANGE_PROCESS")


def _group_of(name: str) -> str:
    if name in _IOMMUFD_CPR:
        return "iommufd-cpr"
    if name.startswith("iommu") or name.startswith("IOMMU_"):
        return "iommufd"
    if name in structs.VFIO_CDEV_STRUCTS or name in ioctls.VFIO_CDEV_IOCTLS:
        return "vfio-cdev"
    return "vfio"


def _structs(group: str) -> list[type]:
    return [
        v
        for k, v in vars(structs).items()
        if k.startswith(("vfio_", "iommu_"))
        and isinstance(v, type)
        and issubclass(v, ctypes.Structure)
        and _group_of(k) == group
    ]


def _constants(group: str) -> list[str]:
    return [
        n
        for n in dir(constants)
        if n.startswith(("VFIO_", "IOMMU_")) and isinstance(getattr(constants, n), int) and _group_of(n) == group
    ]


def _compiles(text: str, tmp) -> bool:
    src = tmp / "probe.c"
    src.write_text(text + "\nint x;\n")
    return subprocess.run([_CC, "-c", str(src), "-o", str(tmp / "probe.o")], capture_output=True).returncode == 0


def _why_unchecked(group: str, tmp) -> str | None:
    """None when the installed header has ``group``; else the reason, naming the header and the kernel."""
    header, macro, kernel = GROUPS[group]
    if not _compiles(f"#include <{header}>", tmp):
        return f"there is no <{header}> ({kernel}) on this host: the {group} bindings go unchecked"
    if not _compiles(f"#include <{header}>\n#ifndef {macro}\n#error {macro}\n#endif", tmp):
        return f"the installed <{header}> has no {macro} ({kernel}): the {group} bindings go unchecked"
    return None


def _expressions(group: str) -> dict[str, str]:
    exprs = {}
    for struct in _structs(group):
        name = struct.__name__
        exprs[f"sizeof {name}"] = f"sizeof(struct {name})"
        for field, *_ in struct._fields_:
            exprs[f"offsetof {name} {field}"] = f"offsetof(struct {name}, {field})"
    for name in ioctls.NAMES.values():
        if _group_of(name) == group:
            exprs[name] = f"(unsigned long){name}"
    for name in _constants(group):
        exprs[name] = f"(unsigned long){name}"
    return exprs


_cache: dict[str, dict[str, int] | str] = {}


@pytest.fixture(params=list(GROUPS))
def group(request, tmp_path_factory) -> tuple[str, dict[str, int]]:
    """(group, every expression's value from a table compiled against its header), or a skip."""
    name = request.param
    if name not in _cache:
        header = GROUPS[name][0]
        tmp = tmp_path_factory.mktemp(f"abi-{name}")
        reason = _why_unchecked(name, tmp)
        if reason:
            _cache[name] = reason
        else:
            exprs = _expressions(name)
            table = ",\n".join(f"    {v}" for v in exprs.values())
            module_name = f"_vfio_abi_{name.replace('-', '_')}"
            ffi = cffi.FFI()
            ffi.cdef("unsigned long abi_value(size_t i);")
            ffi.set_source(
                module_name,
                f"#include <stddef.h>\n#include <{header}>\n"
                f"static const unsigned long values[] = {{\n{table}\n}};\n"
                "unsigned long abi_value(size_t i) { return values[i]; }\n",
            )
            so = ffi.compile(tmpdir=str(tmp))
            spec = importlib.util.spec_from_file_location(module_name, so)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _cache[name] = {key: module.lib.abi_value(i) for i, key in enumerate(exprs)}
    values = _cache[name]
    if isinstance(values, str):
        pytest.skip(values)
    return name, values


def test_struct_layouts_match_header(group):
    name, values = group
    for struct in _structs(name):
        sname = struct.__name__
        assert ctypes.sizeof(struct) == values[f"sizeof {sname}"], f"sizeof({sname})"
        for field, *_ in struct._fields_:
            offset = getattr(struct, field).offset
            assert offset == values[f"offsetof {sname} {field}"], f"offsetof({sname}, {field})"


def test_ioctl_numbers_match_header(group):
    name, values = group
    checked = [n for n in ioctls.NAMES.values() if _group_of(n) == name]
    assert checked
    for ioctl in checked:
        assert getattr(ioctls, ioctl) == values[ioctl], ioctl


def test_constants_match_header(group):
    name, values = group
    for constant in _constants(name):
        assert getattr(constants, constant) == values[constant], constant


def test_flexible_arrays_follow_the_fixed_part():
    assert structs.irq_set_with(8).data.offset == ctypes.sizeof(structs.vfio_irq_set)
    assert structs.sparse_mmap_with(2).areas.offset == ctypes.sizeof(structs.vfio_region_info_cap_sparse_mmap)
    assert structs.sized(structs.iommu_ioas_map).size == 40
    assert structs.sized(structs.vfio_region_info, index=7).argsz == 32

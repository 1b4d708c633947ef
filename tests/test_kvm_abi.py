"""The vendored bindings against the kernel's own headers: every structure's
size and every field's offset, every ioctl number and constant, as a C
compiler sees them in <linux/kvm.h> (a cffi module built for the test)."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import sysconfig

import pytest

from minivmm.kvm import constants, ioctls, structs

cffi = pytest.importorskip("cffi", reason="cffi is not installed (the C side of this check is built with it)")
_CC = (sysconfig.get_config_var("CC") or "cc").split()[0]
pytestmark = pytest.mark.skipif(shutil.which(_CC) is None, reason=f"no C compiler ({_CC})")

# Structures whose C declaration wraps a member in an anonymous union.
_ANONYMOUS = {("kvm_run", "exit")}
# Flexible-array structures: (C name, our header class, helper, array field)
_FLEX = [
    ("kvm_msrs", structs.msrs_with, "entries"),
    ("kvm_msr_list", structs.msr_list_with, "indices"),
    ("kvm_cpuid2", structs.cpuid2_with, "entries"),
    ("kvm_irq_routing", structs.irq_routing_with, "entries"),
    ("kvm_coalesced_mmio_ring", structs.coalesced_mmio_ring_with, "coalesced_mmio"),
]


def _fields(struct: type, c_prefix: str = "", py_prefix: str = "", top: str = ""):
    for name, ftype, *_ in struct._fields_:
        offset = getattr(struct, name).offset
        c_name = c_prefix if (top, name) in _ANONYMOUS else f"{c_prefix}{name}"
        if (top, name) not in _ANONYMOUS:
            yield c_name, py_prefix + name, offset
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            inner = "" if (top, name) in _ANONYMOUS else f"{c_name}."
            for cn, pn, off in _fields(ftype, inner, f"{py_prefix}{name}.", top):
                yield cn, pn, offset + off


def _top_level_structs() -> list[type]:
    return [
        v
        for k, v in vars(structs).items()
        if k.startswith("kvm_") and isinstance(v, type) and issubclass(v, ctypes.Structure)
    ]


def _c_expressions() -> dict[str, str]:
    """What to ask the compiler, by the key the tests look up: sizes, offsets, ioctl numbers, constants."""
    exprs = {}
    for struct in _top_level_structs():
        name = struct.__name__
        exprs[f"sizeof {name}"] = f"sizeof(struct {name})"
        for c_field, _py, _off in _fields(struct, top=name):
            exprs[f"offsetof {name} {c_field}"] = f"offsetof(struct {name}, {c_field})"
    for c_name, _helper, array in _FLEX:
        exprs[f"offsetof {c_name} {array}"] = f"offsetof(struct {c_name}, {array})"
    for name in sorted(set(ioctls.NAMES.values())):
        exprs[name] = f"(unsigned long){name}"
    for name in dir(constants):
        if name.startswith("KVM_") and isinstance(getattr(constants, name), int) and name != "KVM_API_VERSION":
            exprs[name] = f"(unsigned long){name}"
    return exprs


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    """Every expression's value, from one table compiled against <linux/kvm.h>."""
    exprs = _c_expressions()
    table = ",\n".join(f"    {value}" for value in exprs.values())
    ffi = cffi.FFI()
    ffi.cdef("unsigned long abi_value(size_t i);")
    ffi.set_source(
        "_kvm_abi_check",
        "#include <stddef.h>\n#include <linux/kvm.h>\n"
        f"static const unsigned long values[] = {{\n{table}\n}};\n"
        "unsigned long abi_value(size_t i) { return values[i]; }\n",
    )
    so = ffi.compile(tmpdir=str(tmp_path_factory.mktemp("abi")))
    spec = importlib.util.spec_from_file_location("_kvm_abi_check", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {key: module.lib.abi_value(i) for i, key in enumerate(exprs)}


@pytest.mark.parametrize("struct", _top_level_structs(), ids=lambda s: s.__name__)
def test_struct_layout_matches_header(struct, c_values):
    name = struct.__name__
    assert ctypes.sizeof(struct) == c_values[f"sizeof {name}"], f"sizeof({name})"
    for c_field, py_field, offset in _fields(struct, top=name):
        assert offset == c_values[f"offsetof {name} {c_field}"], f"offsetof({name}, {c_field}) [{py_field}]"


@pytest.mark.parametrize("c_name,helper,array", _FLEX, ids=[f[0] for f in _FLEX])
def test_flexible_arrays_start_where_the_header_says(c_name, helper, array, c_values):
    for n in (0, 1, 7):
        assert getattr(helper(n), array).offset == c_values[f"offsetof {c_name} {array}"]


def test_ioctl_numbers_match_header(c_values):
    for number, name in ioctls.NAMES.items():
        assert number == c_values[name], name


def test_constants_match_header(c_values):
    for name in dir(constants):
        value = getattr(constants, name)
        if name.startswith("KVM_") and isinstance(value, int) and name in c_values:
            assert value == c_values[name], name
    missing = [n for n in dir(constants) if n.startswith("KVM_") and n != "KVM_API_VERSION" and n not in c_values]
    assert not missing, f"constants the header does not define: {missing}"

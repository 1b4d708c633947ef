"""The shipped guests in minivmm/guests/ are exactly what guests/build.py builds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_PY = REPO / "guests" / "build.py"
SHIPPED = REPO / "minivmm" / "guests"


def _load_build():
    spec = importlib.util.spec_from_file_location("_guests_build", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = _load_build()


def shipped_binaries() -> set[str]:
    """Every file in minivmm/guests/ except the package's Python files."""
    return {p.name for p in SHIPPED.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")}


def run_build(out: Path) -> None:
    missing = build.missing_tools()
    if missing:
        pytest.skip(f"{missing[0]} not found (guests/build.py needs gcc and GNU binutils)")
    proc = subprocess.run([sys.executable, str(BUILD_PY), "--out", str(out)], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shipped_guests_match_a_fresh_build(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_build(out)
    built = {p.name for p in out.iterdir()}
    assert built == {g.output for g in build.GUESTS}
    for name in sorted(built):
        shipped = SHIPPED / name
        assert shipped.is_file(), f"{name} is built but not shipped: run python guests/build.py"
        assert (out / name).read_bytes() == shipped.read_bytes(), (
            f"minivmm/guests/{name} differs from a fresh build: run python guests/build.py"
        )


def test_build_does_not_depend_on_the_output_path(tmp_path):
    first = tmp_path / "a"
    second = tmp_path / "some" / "other" / "directory"
    first.mkdir()
    second.mkdir(parents=True)
    run_build(first)
    run_build(second)
    for guest in build.GUESTS:
        assert (first / guest.output).read_bytes() == (second / guest.output).read_bytes()


def test_every_shipped_binary_has_a_source():
    known = {g.output: g for g in build.GUESTS}
    for name in sorted(shipped_binaries()):
        assert name in known, f"minivmm/guests/{name} is not built by guests/build.py"
        guest = known[name]
        assert (BUILD_PY.parent / guest.source).is_file(), f"{name}: guests/{guest.source} missing"
        assert (BUILD_PY.parent / guest.script).is_file(), f"{name}: guests/{guest.script} missing"
    assert shipped_binaries() == set(known), "some guests are not shipped: run python guests/build.py"


def test_hello16_is_a_64k_image_with_a_reset_vector():
    image = (SHIPPED / "hello16.bin").read_bytes()
    assert len(image) == 64 * 1024
    assert image[0xFFF0] == 0xEA  # ljmp ptr16:16 at the reset vector

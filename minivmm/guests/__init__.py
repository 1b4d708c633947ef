"""The tiny guests shipped with minivmm (built from guests/ in the source tree).

``path("abwalk.elf")`` gives the file to pass to ``-kernel``; the README in
guests/ says what each one does.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
DEFAULT = "long64.elf"  # what `minivmm` boots when given no -kernel or -bios


def path(name: str) -> str:
    p = HERE / name
    if not p.is_file():
        raise FileNotFoundError(f"no shipped guest named {name!r} (have: {', '.join(names())})")
    return str(p)


def names() -> list[str]:
    return sorted(p.name for p in HERE.iterdir() if p.suffix in (".elf", ".bin"))

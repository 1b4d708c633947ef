"""The tiny guests shipped with minivmm (built from guests/ in the source tree).

``path("abwalk.elf")`` gives the file to pass to ``-kernel``; the README in
guests/ says what each one does.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = "long64.elf"  # what `minivmm` boots when given no -kernel or -bios


def path(name: str) -> str:
    p = os.path.join(HERE, name)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no shipped guest named {name!r} (have: {', '.join(names())})")
    return p


def names() -> list[str]:
    return sorted(n for n in os.listdir(HERE) if n.endswith((".elf", ".bin")))

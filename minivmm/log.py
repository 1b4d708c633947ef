"""minivmm's one way to tell the user something: a line on stderr, as QEMU's error_report."""

from __future__ import annotations

import sys


def message(text: str) -> None:
    print(f"minivmm: {text}", file=sys.stderr, flush=True)

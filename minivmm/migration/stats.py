"""What a migration reports in query-migrate: times, bytes, pages, passes and phases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import stream


@dataclass
class Stats:
    start: float = field(default_factory=time.monotonic)
    setup_end: float | None = None
    stop: float | None = None
    end: float | None = None
    transferred: int = 0
    total: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    passes: int = 0
    remaining: int = 0
    downtime_ms: float | None = None  # the target's: from the source's stop to its own resume
    phases: dict[str, float] = field(default_factory=dict)  # phase -> milliseconds

    def to_qmp(self, status: str) -> dict:
        now = time.monotonic()
        end = self.end or now
        out: dict = {"total-time": int((end - self.start) * 1000)}
        if self.setup_end is not None:
            out["setup-time"] = int((self.setup_end - self.start) * 1000)
        if self.downtime_ms is not None:
            out["downtime"] = round(self.downtime_ms)
        elif self.stop is not None:
            out["downtime"] = int(((self.end or now) - self.stop) * 1000)
        elapsed = max(end - (self.setup_end or self.start), 1e-6)
        out["ram"] = {
            "transferred": self.transferred,
            "total": self.total,
            "remaining": 0 if status == "completed" else self.remaining,
            "duplicate": self.zero_pages,
            "normal": self.normal_pages,
            "normal-bytes": self.normal_pages * stream.PAGE_SIZE,
            "dirty-sync-count": self.passes,
            "page-size": stream.PAGE_SIZE,
            "mbps": round(self.transferred * 8 / elapsed / 1e6, 3),
        }
        if self.phases:
            out["x-phase-times"] = {k: round(v, 3) for k, v in self.phases.items()}
        return out

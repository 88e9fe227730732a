"""Bar charts of throughput and failures over time, computed here and drawn as inline SVG by
the templates (no chart library, no script). Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

BUCKETS = 40
# Bucket widths to choose from: the smallest that covers the span in BUCKETS bars.
STEPS = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1),
         timedelta(hours=6), timedelta(days=1), timedelta(days=7))
WIDTH, HEIGHT, GAP = 400, 60, 1


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    bucket: timedelta

    def label(self) -> str:
        minutes = int(self.bucket.total_seconds() // 60)
        unit = (f"{minutes // 1440} day" if minutes >= 1440 else
                f"{minutes // 60} h" if minutes >= 60 else f"{minutes} min")
        return f"{BUCKETS} bars of {unit} since {self.start:%Y-%m-%d %H:%M} UTC"


def window(first: datetime | None, last: datetime | None) -> Window | None:
    """The chart's window: BUCKETS buckets ending with the one that holds ``last``."""
    if first is None or last is None:
        return None
    span = last - first
    bucket = next((s for s in STEPS if s * BUCKETS > span), STEPS[-1])
    seconds = int(bucket.total_seconds())
    end = datetime.fromtimestamp((int(last.timestamp()) // seconds + 1) * seconds, last.tzinfo)
    return Window(end - bucket * BUCKETS, bucket)


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    width: float
    ok_y: float
    ok_height: float
    failed_y: float
    failed_height: float
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    bars: tuple[Bar, ...]
    peak: int
    total: int
    failed: int
    width: int = WIDTH
    height: int = HEIGHT


def chart(w: Window, counts: Iterable[Mapping[str, Any]]) -> Chart:
    """Stacked bars (failed on top of the rest) from rows with ``bucket``, ``created`` and
    ``failed``, scaled to the tallest bar."""
    by_index: dict[int, tuple[int, int]] = {}
    for row in counts:
        i = int((row["bucket"] - w.start) / w.bucket)
        if 0 <= i < BUCKETS:
            created, failed = by_index.get(i, (0, 0))
            by_index[i] = (created + int(row["created"]), failed + int(row["failed"]))
    peak = max((c for c, _ in by_index.values()), default=0)
    bar_width = WIDTH / BUCKETS
    bars = []
    for i, (created, failed) in sorted(by_index.items()):
        total_h = HEIGHT * created / peak if peak else 0.0
        failed_h = HEIGHT * failed / peak if peak else 0.0
        at = w.start + w.bucket * i
        bars.append(Bar(
            x=round(i * bar_width, 2), width=round(bar_width - GAP, 2),
            ok_y=round(HEIGHT - total_h, 2), ok_height=round(total_h - failed_h, 2),
            failed_y=round(HEIGHT - total_h, 2), failed_height=round(failed_h, 2),
            title=f"{at:%Y-%m-%d %H:%M}: {created} created, {failed} failed"))
    return Chart(tuple(bars), peak, sum(c for c, _ in by_index.values()),
                 sum(f for _, f in by_index.values()))

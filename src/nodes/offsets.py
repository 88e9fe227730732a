"""Which offset may be committed: the one just past the longest finished prefix. Pure.

The orchestrator runs many workflows at once, so records of one partition finish out of
order. A partition's committable offset only moves over records that are all finished, so a
crash re-delivers every record whose work might not be done, and nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PartitionKey = tuple[str, int]  # (topic, partition)


@dataclass(slots=True)
class _Partition:
    # Offsets arrive in increasing order, so insertion order is offset order and the first
    # key is the lowest unfinished offset.
    pending: dict[int, None] = field(default_factory=dict)
    last_started: int = -1


class OffsetTracker:
    """Tracks started and finished offsets per partition."""

    def __init__(self) -> None:
        self._parts: dict[PartitionKey, _Partition] = {}

    def started(self, key: PartitionKey, offset: int) -> None:
        part = self._parts.setdefault(key, _Partition())
        if offset <= part.last_started:
            raise ValueError(f"{key}: offset {offset} started after {part.last_started}")
        part.pending[offset] = None
        part.last_started = offset

    def finished(self, key: PartitionKey, offset: int) -> None:
        part = self._parts.get(key)
        if part is not None:
            part.pending.pop(offset, None)

    def committable(self) -> dict[PartitionKey, int]:
        """Per partition, the offset to commit: the lowest unfinished one, or past the last."""
        out: dict[PartitionKey, int] = {}
        for key, part in self._parts.items():
            if part.last_started < 0:
                continue
            out[key] = next(iter(part.pending)) if part.pending else part.last_started + 1
        return out

    def in_flight(self, key: PartitionKey | None = None) -> int:
        if key is not None:
            part = self._parts.get(key)
            return len(part.pending) if part else 0
        return sum(len(p.pending) for p in self._parts.values())

    def forget(self, key: PartitionKey) -> None:
        """The partition was revoked: its offsets are another consumer's business now."""
        self._parts.pop(key, None)

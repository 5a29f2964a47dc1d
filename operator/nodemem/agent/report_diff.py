"""When a new report status is worth a write: an item's state, or a byte figure moving
by more than 1 % and 1 MiB. Everything else waits for the heartbeat, so that API load
per node stays near one write a minute on a busy node."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIN_BYTES = 1 << 20
MIN_FRACTION = 0.01

# Churn that is not a change of state: times, the holders of an object, process counts
# that move with every short-lived process, and the victim preview (derived from RSS).
VOLATILE_KEYS = frozenset(
    {
        "lastUpdateTime",
        "lastTransitionTime",
        "pids",
        "unreadable",
        "unreadableProcesses",
        "predictedVictims",
        "matched",
        "unchanged",
        "adjusted",
        "planned",
        "vanished",
        "lastRun",
        "nextRun",
        # The node's general memory figures move with every process start; they are
        # context for the Shmem figures and are refreshed by the heartbeat.
        "availableBytes",
        "processRssBytes",
        "slabBytes",
        "slabReclaimableBytes",
        "slabUnreclaimableBytes",
        "kernelStackBytes",
        "pageTablesBytes",
        "vmallocUsedBytes",
    }
)


# How list items are told apart, so that a reordering (two objects of similar size
# swapping places in top[]) is not a change.
IDENTITY_KEYS = ("kind", "name", "path", "type", "node", "pid", "rule")


def _identity(item: Any) -> tuple[Any, ...] | None:
    if not isinstance(item, Mapping):
        return None
    identity = tuple(item.get(key) for key in IDENTITY_KEYS)
    return identity if any(part is not None for part in identity) else None


def _bytes_moved(old: int | float, new: int | float) -> bool:
    delta = abs(new - old)
    return delta > MIN_BYTES and delta > MIN_FRACTION * max(abs(old), abs(new))


def meaningful_change(old: Any, new: Any, key: str = "") -> bool:
    """Whether `new` differs from `old` in a way a reader of the report must see."""
    if key in VOLATILE_KEYS:
        return False
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return any(meaningful_change(old.get(k), new.get(k), k) for k in old.keys() | new.keys())
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return True
        old_ids, new_ids = [_identity(i) for i in old], [_identity(i) for i in new]
        if None not in old_ids and None not in new_ids and len(set(old_ids)) == len(old):
            if set(old_ids) != set(new_ids):
                return True
            by_id = dict(zip(old_ids, old, strict=True))
            return any(
                meaningful_change(by_id[i], n, key) for i, n in zip(new_ids, new, strict=True)
            )
        return any(meaningful_change(a, b, key) for a, b in zip(old, new, strict=True))
    both_numbers = isinstance(old, int | float) and isinstance(new, int | float)
    if both_numbers and (key == "bytes" or key.endswith("Bytes")) and not isinstance(old, bool):
        return _bytes_moved(old, new)
    return bool(old != new)

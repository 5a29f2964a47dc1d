"""A report status is rewritten on a state change or a real byte movement, not on churn."""

from __future__ import annotations

from typing import Any

from nodemem.agent.report_diff import meaningful_change

MiB = 1 << 20


def status(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "policies": [{"name": "p", "generation": 1}],
        "shmem": {
            "totalBytes": 1000 * MiB,
            "unaccountedBytes": 10 * MiB,
            "top": [
                {"kind": "tmpfs", "name": "/dev/shm", "bytes": 500 * MiB, "pids": [{"pid": 1}]}
            ],
        },
        "tmpfs": [{"path": "/dev/shm", "state": "Applied", "usedBytes": 500 * MiB}],
        "conditions": [{"type": "Applied", "status": "True", "lastTransitionTime": "t0"}],
        "lastUpdateTime": "t0",
        "oom": {"matched": 4, "forbidden": 0},
    }
    for path, value in changes.items():
        target = base
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return base


def test_identical_and_churn_only_are_not_meaningful() -> None:
    assert not meaningful_change(status(), status())
    assert not meaningful_change(status(), status(lastUpdateTime="t1"))
    assert not meaningful_change(status(), status(**{"oom.matched": 9}))
    assert not meaningful_change(status(), status(**{"shmem.top.0.pids": [{"pid": 2}]}))


def test_bytes_must_move_by_1_percent_and_1_mib() -> None:
    # 2 MiB of 1000 MiB: over 1 MiB but under 1 %.
    assert not meaningful_change(status(), status(**{"shmem.totalBytes": 1002 * MiB}))
    # 900 KiB of 10 MiB: over 1 % but under 1 MiB.
    assert not meaningful_change(
        status(), status(**{"shmem.unaccountedBytes": 10 * MiB + 900 * 1024})
    )
    assert meaningful_change(status(), status(**{"shmem.totalBytes": 1020 * MiB}))


def test_states_conditions_and_policies_are_meaningful() -> None:
    assert meaningful_change(status(), status(**{"tmpfs.0.state": "Refused"}))
    assert meaningful_change(status(), status(**{"conditions.0.status": "False"}))
    assert meaningful_change(status(), status(policies=[{"name": "p", "generation": 2}]))
    assert meaningful_change(status(), status(**{"oom.forbidden": 1}))
    assert meaningful_change(status(), status(tmpfs=[]))


def test_object_sizes_in_top_follow_the_byte_rule() -> None:
    assert not meaningful_change(status(), status(**{"shmem.top.0.bytes": 501 * MiB}))
    assert meaningful_change(status(), status(**{"shmem.top.0.bytes": 600 * MiB}))


def test_reordered_items_are_not_a_change() -> None:
    two = [
        {"kind": "tmpfs", "name": "/a", "bytes": 500 * MiB},
        {"kind": "memfd", "name": "memfd:b", "bytes": 499 * MiB},
    ]
    assert not meaningful_change(status(**{"shmem.top": two}), status(**{"shmem.top": two[::-1]}))
    other = [two[0], {"kind": "memfd", "name": "memfd:c", "bytes": 499 * MiB}]
    assert meaningful_change(status(**{"shmem.top": two}), status(**{"shmem.top": other}))


def test_general_memory_figures_wait_for_the_heartbeat() -> None:
    old = status(memory={"processRssBytes": 100 * MiB, "shmemBytes": 100 * MiB})
    busier = status(memory={"processRssBytes": 300 * MiB, "shmemBytes": 100 * MiB})
    assert not meaningful_change(old, busier)
    more_shmem = status(memory={"processRssBytes": 100 * MiB, "shmemBytes": 300 * MiB})
    assert meaningful_change(old, more_shmem)

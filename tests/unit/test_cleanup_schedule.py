"""Cleanup rules run on their cron schedule, not all at once at start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nodemem.policy.schedule import CleanupClock, next_run

T0 = datetime(2026, 11, 26, 10, 7, 30, tzinfo=UTC)


def test_next_run_is_strictly_after() -> None:
    fire = next_run("*/15 * * * *", T0)
    assert fire > T0
    assert fire - T0 <= timedelta(minutes=15)
    assert fire.minute % 15 == 0 and fire.second == 0
    assert next_run("*/15 * * * *", fire) - fire == timedelta(minutes=15)


def test_a_new_rule_waits_for_its_first_cron_time() -> None:
    clock = CleanupClock()
    clock.track({"logs": "0 * * * *"}, T0)
    assert clock.due_now(T0) == []
    deadline = clock.next_deadline()
    assert deadline is not None and deadline > T0
    assert clock.due_now(deadline) == ["logs"]


def test_running_moves_the_rule_to_its_next_time() -> None:
    clock = CleanupClock()
    clock.track({"logs": "*/5 * * * *"}, T0)
    first = clock.due["logs"]
    clock.ran("logs", first)
    assert clock.last_run["logs"] == first
    assert clock.due["logs"] - first == timedelta(minutes=5)
    assert clock.due_now(first) == []


def test_changed_schedule_restarts_and_removed_rules_are_forgotten() -> None:
    clock = CleanupClock()
    clock.track({"a": "0 * * * *", "b": "0 * * * *"}, T0)
    clock.track({"a": "*/10 * * * *"}, T0)
    assert set(clock.due) == {"a"}
    assert clock.due["a"] - T0 <= timedelta(minutes=10)

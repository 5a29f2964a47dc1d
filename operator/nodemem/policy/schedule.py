"""When cleanup rules are due: 5-field cron evaluated in the agent's own loop.

Cron, not kopf timers: timers put finalizers on shared objects (docs/testing.md#the-control-plane).
Times are aware datetimes; cron fields are read in the node's local time zone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from cronsim import CronSim


def next_run(schedule: str, after: datetime) -> datetime:
    """The first time strictly after `after` that `schedule` fires."""
    fire: datetime = next(CronSim(schedule, after.astimezone()))
    return fire


@dataclass
class CleanupClock:
    """Due times per rule. A rule is first due at its first cron time after it appeared,
    so that starting (or restarting) the agent does not run every cleanup at once."""

    due: dict[str, datetime] = field(default_factory=dict)
    schedules: dict[str, str] = field(default_factory=dict)
    last_run: dict[str, datetime] = field(default_factory=dict)

    def track(self, rules: dict[str, str], now: datetime) -> None:
        """Follow exactly these rules (name -> schedule); a changed schedule restarts."""
        for name in list(self.due):
            if name not in rules:
                del self.due[name], self.schedules[name]
                self.last_run.pop(name, None)
        for name, schedule in rules.items():
            if self.schedules.get(name) != schedule:
                self.schedules[name] = schedule
                self.due[name] = next_run(schedule, now)

    def due_now(self, now: datetime) -> list[str]:
        return sorted(name for name, when in self.due.items() if when <= now)

    def ran(self, name: str, now: datetime) -> None:
        self.last_run[name] = now
        self.due[name] = next_run(self.schedules[name], now)

    def next_deadline(self) -> datetime | None:
        return min(self.due.values(), default=None)

"""Cleanup rules that cannot do their work are reported, and one rule's failure stays its own.

`nodemem apply --run-cleanup` (a real process) names every pattern that could do nothing (a
base on the root filesystem, a typo, a glob into other mounts) and exits 1; a rule whose run
raises is Failed with the reason, in `apply` and in the agent's loop, while the other rules and
the loop go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemem.agent import loop
from nodemem.agent.loop import AgentSettings, NodeAgent
from nodemem.agent.policy_file import PolicyFile
from nodemem.cli import main
from nodemem.host.cleanup import CleanupResult, CleanupSpec
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import Holder
from nodemem.policy import apply
from samples import FakeWallClock, write

pytestmark = pytest.mark.privileged

HOUR = 3600.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def gone(path: Path) -> Callable[[], bool]:
    return lambda: not path.exists()


def ran_each(ran: list[str], names: Sequence[str], *, times: int) -> Callable[[], bool]:
    return lambda: all(ran.count(name) == times for name in names)


def policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "cleanups"},
        "spec": {"cleanup": list(rules)},
    }


def rule(name: str, *paths: str) -> dict[str, Any]:
    return {"name": name, "paths": list(paths), "schedule": "0 * * * *", "olderThan": "1h"}


def fstype_of(path: Path) -> str:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def apply_process(policy_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodemem.cli", "apply", "-f", str(policy_file), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_apply_run_cleanup_reports_patterns_that_can_do_nothing_and_exits_1(
    mount_tmpfs, tmp_path
) -> None:
    point = mount_tmpfs(options="size=16m")
    mount_tmpfs(options="size=1m", at=point / "users" / "1000")  # a separate tmpfs
    disk = tmp_path / "disk"  # on the root filesystem
    old_on_disk = write(disk / "old.log", age=2 * HOUR)
    in_other_mount = write(point / "users" / "1000" / "x.log", age=2 * HOUR)
    old = write(point / "old.log", age=2 * HOUR)
    document = policy(
        rule(
            "logs",
            f"{point}/*.log",  # does its work
            f"{disk}/*.log",
            f"{point}/lgos/*.log",
            f"{point}/users/*/x.log",
        )
    )
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(document))
    fstype = fstype_of(disk)

    text = apply_process(policy_file, "--run-cleanup")

    assert text.returncode == 1, text.stderr
    assert "Traceback" not in text.stderr
    assert not old.exists()  # the pattern that can work still did
    assert old_on_disk.exists() and in_other_mount.exists()
    lines = text.stdout.splitlines()
    assert f"  logs: {disk}/*.log: Skipped: not on tmpfs: {disk} is on {fstype}" in lines
    assert f"  logs: {point}/lgos/*.log: Skipped: {point}/lgos does not exist" in lines
    assert (
        f"  logs: {point}/users/*/x.log: Incomplete: crosses into another mount at "
        f"{point}/users/1000: not entered (give each mount its own pattern, or exclude it)"
    ) in lines
    assert any(line.split()[:3] == ["logs", "cleanups", "Incomplete"] for line in lines)

    as_json = apply_process(policy_file, "--run-cleanup", "--json")

    assert as_json.returncode == 1
    [status] = json.loads(as_json.stdout)["cleanup"]
    assert status["state"] == "Incomplete"
    assert [(p["pattern"], p["state"]) for p in status["patterns"]] == [
        (f"{point}/*.log", "Walked"),
        (f"{disk}/*.log", "Skipped"),
        (f"{point}/lgos/*.log", "Skipped"),
        (f"{point}/users/*/x.log", "Incomplete"),
    ]


def test_apply_run_cleanup_exits_0_when_every_pattern_was_walked(mount_tmpfs, tmp_path) -> None:
    point = mount_tmpfs(options="size=16m")
    old = write(point / "logs" / "old.log", age=2 * HOUR)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy(rule("logs", f"{point}/logs/*.log"))))

    done = apply_process(policy_file, "--run-cleanup", "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    [status] = json.loads(done.stdout)["cleanup"]
    assert (status["state"], status["patterns"][0]["state"]) == ("Completed", "Walked")
    assert not old.exists()


RunCleanup = Callable[..., CleanupResult]


@pytest.fixture
def failing_rule(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[str]]:
    """failing_rule(name): the engine raises for that rule only; returns the rules it ran."""
    ran: list[str] = []

    def arm(name: str) -> list[str]:
        real: RunCleanup = apply.run_cleanup

        def run_cleanup(
            paths: HostPaths,
            spec: CleanupSpec,
            held_open: dict[tuple[int, int], Sequence[Holder]],
            **options: Any,
        ) -> CleanupResult:
            ran.append(spec.name)
            if spec.name == name:
                raise ValueError(f"injected fault in {name}")
            return real(paths, spec, held_open, **options)

        monkeypatch.setattr(apply, "run_cleanup", run_cleanup)
        return ran

    return arm


def test_apply_reports_a_rule_that_raises_as_failed_and_runs_the_others(
    mount_tmpfs, tmp_path, capsys, failing_rule
) -> None:
    point = mount_tmpfs(options="size=16m")
    old = write(point / "old.log", age=2 * HOUR)
    failing_rule("bad")
    policy_file = tmp_path / "policy.yaml"
    document = policy(rule("bad", f"{point}/*.log"), rule("good", f"{point}/*.log"))
    policy_file.write_text(yaml.safe_dump(document))

    assert main(["apply", "-f", str(policy_file), "--run-cleanup", "--json"]) == 1

    statuses = {c["name"]: c for c in json.loads(capsys.readouterr().out)["cleanup"]}
    assert statuses["bad"]["state"] == "Failed"
    assert statuses["bad"]["message"] == "ValueError: injected fault in bad"
    assert (statuses["good"]["state"], statuses["good"]["filesRemoved"]) == ("Completed", 1)
    assert not old.exists()


@pytest.fixture
def agent_thread() -> Iterator[Callable[[NodeAgent], None]]:
    started: list[tuple[NodeAgent, threading.Thread]] = []

    def start(agent: NodeAgent) -> None:
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        started.append((agent, thread))
        wait_for(lambda: agent.state.resyncs >= 1)

    yield start
    for agent, thread in started:
        agent.stop()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the agent did not stop"


def test_agent_loop_goes_on_when_one_rules_cleanup_raises(
    mount_tmpfs, tmp_path, failing_rule, agent_thread
) -> None:
    point = mount_tmpfs(options="size=16m")
    ran = failing_rule("bad")
    policy_file = tmp_path / "policy.yaml"
    document = policy(rule("bad", f"{point}/*.log"), rule("good", f"{point}/*.log"))
    policy_file.write_text(yaml.safe_dump(document))
    clock = FakeWallClock()
    agent = NodeAgent(
        HostPaths(),
        PolicyFile(policy_file),
        settings=AgentSettings(resync_seconds=3600, poll_seconds=0.05, use_proc_connector=False),
        wall_clock=clock,
    )
    agent_thread(agent)

    for hour in (1, 2):  # the failing rule's cron time comes twice: the loop survives both
        old = write(point / f"old-{hour}.log", age=2 * HOUR)
        clock.now += timedelta(hours=1)
        wait_for(gone(old))  # the other rule ran
        wait_for(ran_each(ran, ("bad", "good"), times=hour))
        # Both rules' states are recorded after the run, one after the other: wait for both.
        stamp = clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")
        cleanups = agent.state.cleanups
        wait_for(lambda: all(n in cleanups and cleanups[n].last_run == stamp for n in ran))  # noqa: B023
        assert agent.state.cleanups["bad"].state == "Failed"
        assert agent.state.cleanups["bad"].message == "ValueError: injected fault in bad"
        assert agent.state.cleanups["bad"].next_run is not None  # rescheduled, not retried
        assert agent.state.cleanups["good"].state == "Completed"

    # The loop still enforces everything else: a policy edit is applied at once.
    resyncs = agent.state.resyncs
    policy_file.write_text(yaml.safe_dump(policy(rule("good", f"{point}/*.log"))))
    wait_for(lambda: agent.state.resyncs > resyncs)


def test_agent_loop_goes_on_when_the_held_open_scan_fails(
    mount_tmpfs, tmp_path, monkeypatch, agent_thread
) -> None:
    point = mount_tmpfs(options="size=16m")
    real_scan = loop.scan_node
    calls = 0

    def scan_once_broken(paths: HostPaths) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected scan fault")
        return real_scan(paths)

    monkeypatch.setattr(loop, "scan_node", scan_once_broken)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy(rule("good", f"{point}/*.log"))))
    clock = FakeWallClock()
    agent = NodeAgent(
        HostPaths(),
        PolicyFile(policy_file),
        settings=AgentSettings(resync_seconds=3600, poll_seconds=0.05, use_proc_connector=False),
        wall_clock=clock,
    )
    agent_thread(agent)
    kept = write(point / "old.log", age=2 * HOUR)

    clock.now += timedelta(hours=1)
    wait_for(lambda: "good" in agent.state.cleanups)
    assert agent.state.cleanups["good"].state == "Failed"
    assert "injected scan fault" in agent.state.cleanups["good"].message
    assert kept.exists()  # without the held-open scan nothing is removed

    clock.now += timedelta(hours=1)
    wait_for(lambda: not kept.exists())
    wait_for(lambda: agent.state.cleanups["good"].state == "Completed")

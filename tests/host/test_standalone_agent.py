"""`nodemem agent --policy-file`: the loop on a real host, without a cluster.

It applies the policy, gives every new process its oom_score_adj at exec (proc
connector, no rescan), runs cleanups when their cron time comes, re-reads the file
when it changes, keeps the last good policy when an edit is invalid, and stops cleanly.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemem.agent.loop import AgentSettings, NodeAgent
from nodemem.agent.policy_file import PolicyFile
from nodemem.host.oom_adj import read_oom_score_adj
from nodemem.host.paths import HostPaths
from samples import FakeWallClock

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def adj(pid: int) -> int:
    return read_oom_score_adj(HostPaths(), pid)  # one read(2): see its docstring


def manifest(point: Path, token: str, oom_adj: int = 700) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "agent-test"},
        "spec": {
            "tmpfs": [{"path": str(point), "size": "16Mi"}],
            "cleanup": [
                {
                    "name": "old",
                    "paths": [f"{point}/*.log"],
                    "schedule": "0 * * * *",
                    "olderThan": "1h",
                }
            ],
            "oom": [{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": oom_adj}],
        },
    }


@pytest.fixture
def running_agent(mount_tmpfs, tmp_path) -> Iterator[Callable[..., tuple[NodeAgent, Path]]]:
    threads: list[tuple[NodeAgent, threading.Thread]] = []

    def start(
        document: dict[str, Any], clock: FakeWallClock, **settings: Any
    ) -> tuple[NodeAgent, Path]:
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(document))
        agent = NodeAgent(
            HostPaths(),
            PolicyFile(policy),
            settings=AgentSettings(resync_seconds=3600, poll_seconds=0.05, **settings),
            wall_clock=clock,
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        threads.append((agent, thread))
        wait_for(lambda: agent.state.resyncs >= 1)
        return agent, policy

    yield start
    for agent, thread in threads:
        agent.stop()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the agent did not stop"


def test_agent_enforces_then_follows_exec_events_cron_and_file_edits(
    mount_tmpfs, running_agent, processes
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = f"{secrets.randbelow(10**6) + 10**6}"
    clock = FakeWallClock()
    agent, policy = running_agent(manifest(point, token), clock)

    # The tmpfs limit is applied at start.
    assert os.statvfs(point).f_blocks * os.statvfs(point).f_frsize == 16 * MiB
    assert agent.state.connector_active

    # A process exec'd now gets its adj from the exec event: the resync is an hour away.
    processes.append(subprocess.Popen(["sleep", f"{token}.1"]))
    pid = processes[-1].pid
    wait_for(lambda: adj(pid) == 700)
    assert agent.state.resyncs == 1
    wait_for(lambda: agent.state.exec_oom.matched >= 1)  # counted just after the write

    # The cleanup runs when its cron time comes (the wall clock moves to 01:00).
    old = point / "old.log"
    old.write_bytes(b"x" * MiB)
    os.utime(old, (0, 0))
    assert old.exists()
    clock.now += timedelta(minutes=30)
    wait_for(lambda: not old.exists())

    # An edit of the file is applied to running processes at once.
    resyncs = agent.state.resyncs
    policy.write_text(yaml.safe_dump(manifest(point, token, oom_adj=800)))
    # The resync that writes the new adj is counted when it ends: wait for both.
    wait_for(lambda: adj(pid) == 800 and agent.state.resyncs > resyncs)

    # An invalid edit keeps the policy in force.
    resyncs = agent.state.resyncs
    policy.write_text("spec: [this is not a policy")
    source = agent.policies
    assert isinstance(source, PolicyFile)
    wait_for(lambda: source.last_error is not None)  # read and rejected
    assert agent.state.resyncs == resyncs
    processes.append(subprocess.Popen(["sleep", f"{token}.2"]))
    wait_for(lambda: adj(processes[-1].pid) == 800)


def test_a_dry_run_cleanup_logs_what_it_would_remove_and_removes_nothing(
    mount_tmpfs, running_agent, caplog
) -> None:
    point = mount_tmpfs(options="size=64m")
    clock = FakeWallClock()
    agent, _ = running_agent(manifest(point, "nodemem-no-such-token"), clock, dry_run=True)
    old = point / "old.log"
    old.write_bytes(b"x" * MiB)
    os.utime(old, (0, 0))
    with caplog.at_level("INFO", logger="nodemem.agent"):
        clock.now += timedelta(minutes=30)
        wait_for(lambda: "old" in agent.state.cleanups)
    assert old.exists()
    assert agent.state.cleanups["old"].files_removed == 1  # counted as "would remove"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cleanup old")]
    assert "1 files, 1048576 bytes would be removed (dry run)" in line


def test_agent_command_stops_cleanly_on_sigint(mount_tmpfs, tmp_path) -> None:
    point = mount_tmpfs(options="size=64m")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(manifest(point, "nodemem-no-such-token")))
    agent = subprocess.Popen(
        [sys.executable, "-m", "nodemem.cli", "agent", "--policy-file", str(policy)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: os.statvfs(point).f_blocks * os.statvfs(point).f_frsize == 16 * MiB)
        agent.send_signal(signal.SIGINT)
        assert agent.wait(timeout=5) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.stderr is not None
    log = agent.stderr.read()
    assert "policies in force: agent-test/1" in log
    assert "Traceback" not in log


def test_a_non_utf8_byte_in_the_policy_file_keeps_the_policy_in_force(
    mount_tmpfs, tmp_path, processes
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = f"{secrets.randbelow(10**6) + 10**6}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(manifest(point, token)))
    log = tmp_path / "agent.log"
    with open(log, "wb") as stderr:
        agent = subprocess.Popen(
            [sys.executable, "-m", "nodemem.cli", "agent", "--policy-file", str(policy)],
            stderr=stderr,
        )
    try:
        wait_for(lambda: "policies in force: agent-test/1" in log.read_text())
        with open(policy, "ab") as file:
            file.write(b"# caf\xe9\n")
        wait_for(lambda: "not valid UTF-8: byte 0xe9" in log.read_text())
        assert agent.poll() is None, "the agent died of one byte"
        # The policy read before the edit is still the one in force.
        processes.append(subprocess.Popen(["sleep", f"{token}.1"]))
        wait_for(lambda: adj(processes[-1].pid) == 700)
        agent.send_signal(signal.SIGINT)
        assert agent.wait(timeout=5) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert "Traceback" not in log.read_text()


def test_resyncs_reread_only_new_processes_while_exec_events_flow(
    mount_tmpfs, tmp_path, processes
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = f"{secrets.randbelow(10**6) + 10**6}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(manifest(point, token)))
    processes.append(subprocess.Popen(["sleep", f"{token}.1"]))
    pid = processes[-1].pid
    agent = NodeAgent(
        HostPaths(),
        PolicyFile(policy),
        settings=AgentSettings(resync_seconds=0.05, poll_seconds=0.05, full_oom_rescan_every=10**6),
        wall_clock=FakeWallClock(),
    )
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: adj(pid) == 700)
        # Someone resets it behind the agent's back: no exec, so no event; the settled
        # process is not re-read by the next resyncs, which still count it.
        Path(f"/proc/{pid}/oom_score_adj").write_text("0")
        resyncs = agent.state.resyncs
        wait_for(lambda: agent.state.resyncs >= resyncs + 5)
        assert adj(pid) == 0
        last = agent.state.last_apply
        assert last is not None and last.oom.matched == 1
        assert last.oom.states["Unchanged"] == 1
        # A policy change re-reads everything.
        policy.write_text(yaml.safe_dump(manifest(point, token, oom_adj=701)))
        wait_for(lambda: adj(pid) == 701)
    finally:
        agent.stop()
        thread.join(5)

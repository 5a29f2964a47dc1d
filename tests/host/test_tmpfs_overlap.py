"""Overlapping tmpfs items: an exact path and a glob (or two items) covering one mount.

Items are resolved to mounts first and merged per mount: the higher priority wins, ties
go to the alphabetically first policy name, and within one policy the earlier item wins.
The winner alone is applied; every other item covering that mount is Overridden there,
so a second run changes nothing (no remount flip-flop between the two sizes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemem.agent.loop import AgentSettings, NodeAgent
from nodemem.agent.policy_file import PolicyFile
from nodemem.cli import main
from nodemem.host.paths import HostPaths
from nodemem.host.shmem import scan_node
from nodemem.policy.report import host_report, node_report_status

pytestmark = pytest.mark.privileged

MiB = 1 << 20
AgentRun = Callable[[list[dict[str, Any]]], tuple[NodeAgent, list[list[str]]]]


def policy(name: str, priority: int, *items: tuple[Path | str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": {
            "priority": priority,
            "tmpfs": [{"path": str(path), "size": size} for path, size in items],
        },
    }


def size_of(point: Path) -> int:
    stat = os.statvfs(point)
    return stat.f_blocks * stat.f_frsize


def states(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(t["policy"], t["pattern"], t["path"], t["state"]) for t in report["tmpfs"]]


@pytest.fixture
def two_mounts(mount_tmpfs: Callable[..., Path]) -> tuple[Path, Path]:
    """<tmp>/m/a and <tmp>/m/b, 64 MiB tmpfs each."""
    return mount_tmpfs("m/a", options="size=64m"), mount_tmpfs("m/b", options="size=64m")


def nodemem_apply(policy_file: Path) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "nodemem.cli", "apply", "-f", str(policy_file), "--json"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def run_apply(tmp_path: Path, documents: list[dict[str, Any]], capsys: Any) -> dict[str, Any]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump_all(documents))
    assert main(["apply", "-f", str(policy_file), "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def test_higher_priority_exact_path_wins_over_a_glob_without_flip_flop(
    two_mounts: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = two_mounts
    glob = f"{a.parent}/*"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump_all([policy("b", 0, (glob, "4Mi")), policy("a", 100, (a, "16Mi"))])
    )

    code, first = nodemem_apply(policy_file)
    assert code == 0, first
    assert (size_of(a), size_of(b)) == (16 * MiB, 4 * MiB)
    assert states(first) == [
        ("a", str(a), str(a), "Applied"),
        ("b", glob, str(a), "Overridden"),
        ("b", glob, str(b), "Applied"),
    ]
    overridden = first["tmpfs"][1]
    assert overridden["message"] == f"overridden on {a} by policy a (priority 100): size 16Mi"
    assert (overridden["sizeBytes"], overridden["desiredBytes"]) == (16 * MiB, 4 * MiB)

    # The second run remounts nothing: both limits are already in force.
    code, second = nodemem_apply(policy_file)
    assert code == 0, second
    assert (size_of(a), size_of(b)) == (16 * MiB, 4 * MiB)
    assert states(second) == [
        ("a", str(a), str(a), "Unchanged"),
        ("b", glob, str(a), "Overridden"),
        ("b", glob, str(b), "Unchanged"),
    ]

    # With use between the two sizes the losing 4Mi is not tried (it was Refused, exit 1).
    (a / "data").write_bytes(b"x" * (8 * MiB))
    code, third = nodemem_apply(policy_file)
    assert code == 0, third
    assert [t["state"] for t in third["tmpfs"]] == ["Unchanged", "Overridden", "Unchanged"]
    assert size_of(a) == 16 * MiB


def test_text_report_shows_the_overridden_item(
    two_mounts: tuple[Path, Path], tmp_path: Path, capsys: Any
) -> None:
    a, _ = two_mounts
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump_all(
            [policy("b", 0, (f"{a.parent}/*", "4Mi")), policy("a", 100, (a, "16Mi"))]
        )
    )
    assert main(["apply", "-f", str(policy_file)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "Overridden" in line)
    # PATH is cut to the table's cell width (tmp_path is long); the rest is whole.
    cells = row.split("  ")
    assert [c.strip() for c in cells if c.strip()][1:6] == [
        "Overridden",
        "16 MiB",
        "0 B",
        "4 MiB",
        "b",
    ]
    assert "overridden on" in row


def test_within_one_policy_the_earlier_item_wins(
    two_mounts: tuple[Path, Path], tmp_path: Path, capsys: Any
) -> None:
    a, b = two_mounts
    glob = f"{a.parent}/*"
    documents = [policy("p", 0, (glob, "4Mi"), (a, "16Mi"))]
    report = run_apply(tmp_path, documents, capsys)
    assert (size_of(a), size_of(b)) == (4 * MiB, 4 * MiB)
    assert states(report) == [
        ("p", glob, str(a), "Applied"),
        ("p", glob, str(b), "Applied"),
        ("p", str(a), str(a), "Overridden"),
    ]
    assert report["tmpfs"][2]["message"] == (
        f"overridden on {a} by policy p (priority 0), item {glob}: size 4Mi"
    )
    again = run_apply(tmp_path, documents, capsys)
    assert [t["state"] for t in again["tmpfs"]] == ["Unchanged", "Unchanged", "Overridden"]
    assert (size_of(a), size_of(b)) == (4 * MiB, 4 * MiB)


def test_priority_ties_go_to_the_alphabetically_first_policy(
    two_mounts: tuple[Path, Path], tmp_path: Path, capsys: Any
) -> None:
    a, b = two_mounts
    glob = f"{a.parent}/*"
    # Listed first and more specific, but "beta" sorts after "alpha" at equal priority.
    documents = [policy("beta", 5, (a, "16Mi")), policy("alpha", 5, (glob, "8Mi"))]
    report = run_apply(tmp_path, documents, capsys)
    assert (size_of(a), size_of(b)) == (8 * MiB, 8 * MiB)
    assert states(report) == [
        ("alpha", glob, str(a), "Applied"),
        ("alpha", glob, str(b), "Applied"),
        ("beta", str(a), str(a), "Overridden"),
    ]
    assert report["tmpfs"][2]["message"] == (
        f"overridden on {a} by policy alpha (priority 5), item {glob}: size 8Mi"
    )


@pytest.fixture
def agent_resyncs(tmp_path: Path) -> Iterator[AgentRun]:
    """Run the agent loop on a policy file until three resyncs: it, and their tmpfs states."""
    stops: list[tuple[NodeAgent, threading.Thread]] = []

    def run(documents: list[dict[str, Any]]) -> tuple[NodeAgent, list[list[str]]]:
        policy_file = tmp_path / "agent-policy.yaml"
        policy_file.write_text(yaml.safe_dump_all(documents))
        seen: list[list[str]] = []

        def record(agent: NodeAgent) -> None:
            if agent.state.last_apply is not None and len(seen) < agent.state.resyncs:
                seen.append([o.result.state.value for o in agent.state.last_apply.tmpfs])

        agent = NodeAgent(
            HostPaths(),
            PolicyFile(policy_file),
            settings=AgentSettings(resync_seconds=0.05, poll_seconds=0.05),
            on_cycle=record,
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        stops.append((agent, thread))
        deadline = time.monotonic() + 20
        while len(seen) < 3:
            assert time.monotonic() < deadline, f"only {len(seen)} resyncs: {seen}"
            time.sleep(0.01)
        return agent, seen

    yield run
    for agent, thread in stops:
        agent.stop()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the agent did not stop"


def test_agent_resyncs_keep_the_winner_in_force(
    two_mounts: tuple[Path, Path], agent_resyncs: AgentRun
) -> None:
    a, b = two_mounts
    documents = [policy("b", 0, (f"{a.parent}/*", "4Mi")), policy("a", 100, (a, "16Mi"))]
    agent, (first, *later) = agent_resyncs(documents)
    assert first == ["Applied", "Overridden", "Applied"]
    assert later == [["Unchanged", "Overridden", "Unchanged"]] * len(later)
    assert (size_of(a), size_of(b)) == (16 * MiB, 4 * MiB)

    # Overridden is informational: the node report is Applied, not Degraded.
    assert agent.state.effective is not None and agent.state.last_apply is not None
    status = node_report_status(
        agent.state.effective, agent.state.last_apply, host_report(scan_node()), []
    )
    assert [t.state for t in status.tmpfs] == ["Unchanged", "Overridden", "Unchanged"]
    conditions = {c.type: (c.status, c.reason) for c in status.conditions}
    assert conditions["Applied"] == ("True", "AllItemsApplied")
    assert conditions["Degraded"] == ("False", "NoFailures")

"""The agent's policy feed: what watch events and LISTs do to the policies in force, and
what survives a restart or an API outage (the state directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodemem.agent.policy_feed import ClusterPolicies
from nodemem.agent.state_dir import StateDir


def policy(name: str, size: str = "1Gi", generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name, "generation": generation, "uid": "u", "resourceVersion": "7"},
        "spec": {"tmpfs": [{"path": "/dev/shm", "size": size}]},
        "status": {"observedGeneration": 1},
    }


def names(source: ClusterPolicies) -> list[str] | None:
    policies = source()
    return None if policies is None else [p.name for p in policies]


def test_events_add_change_and_delete_policies(tmp_path: Path) -> None:
    source = ClusterPolicies(StateDir(tmp_path))
    assert names(source) == []  # nothing saved, nothing seen: no policies yet
    assert names(source) is None  # unchanged since
    source.on_event("ADDED", policy("a"))
    source.on_event("ADDED", policy("b"))
    assert names(source) == ["a", "b"]
    source.on_event("MODIFIED", policy("a"))  # no change in content
    assert names(source) is None
    source.on_event("MODIFIED", policy("a", "2Gi", 2))
    assert names(source) == ["a", "b"]
    source.on_event("DELETED", policy("b"))
    assert names(source) == ["a"]


def test_an_invalid_policy_is_not_applied(tmp_path: Path) -> None:
    source = ClusterPolicies(StateDir(tmp_path))
    source.on_event("ADDED", policy("a"))
    assert names(source) == ["a"]
    broken = policy("a", size="lots")
    source.on_event("MODIFIED", broken)
    assert names(source) == []


def test_policies_in_force_survive_a_restart(tmp_path: Path) -> None:
    first = ClusterPolicies(StateDir(tmp_path))
    first.on_event("ADDED", policy("a", "3Gi"))
    assert names(first) == ["a"]  # in force, and saved
    restarted = ClusterPolicies(StateDir(tmp_path))  # the API is not reachable yet
    loaded = restarted()
    assert loaded is not None
    assert [(p.name, str(p.spec.tmpfs[0].size)) for p in loaded] == [("a", "3Gi")]


def test_a_list_drops_saved_policies_deleted_meanwhile(tmp_path: Path) -> None:
    ClusterPolicies(StateDir(tmp_path)).on_event("ADDED", policy("gone"))
    saver = ClusterPolicies(StateDir(tmp_path))
    saver.on_event("ADDED", policy("gone"))
    saver()  # saved
    restarted = ClusterPolicies(StateDir(tmp_path))
    assert names(restarted) == ["gone"]
    restarted.replace_all([policy("kept")])
    assert names(restarted) == ["kept"]


def test_an_unusable_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text("kind: [broken")
    assert names(ClusterPolicies(StateDir(tmp_path))) == []


def test_a_non_utf8_byte_in_saved_policies_sets_the_file_aside(tmp_path: Path) -> None:
    saver = ClusterPolicies(StateDir(tmp_path))
    saver.replace_all([policy("saved")])
    saver()  # saved
    saved = tmp_path / "policies.yaml"
    saved.write_bytes(saved.read_bytes() + b"# caf\xe9\n")
    assert names(ClusterPolicies(StateDir(tmp_path))) == []  # starts, without them
    assert b"\xe9" not in saved.read_bytes()  # what is saved now is what is in force
    (aside,) = tmp_path.glob("policies.yaml.corrupt-*")
    assert aside.read_bytes().endswith(b"# caf\xe9\n")  # the bytes stay for a look


def test_a_non_utf8_byte_in_saved_node_labels_sets_the_file_aside(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save_node_labels({"role": "db"})
    (tmp_path / "node-labels.yaml").write_bytes(b"role: caf\xe9\n")
    assert state.load_node_labels() is None
    (aside,) = tmp_path.iterdir()  # nothing else: the agent starts without labels
    assert aside.name.startswith("node-labels.yaml.corrupt-")


def test_saved_node_labels_that_are_not_strings_are_set_aside(tmp_path: Path) -> None:
    (tmp_path / "node-labels.yaml").write_text("role: [a, b]\n")
    assert StateDir(tmp_path).load_node_labels() is None
    assert list(tmp_path.glob("node-labels.yaml.corrupt-*"))


def test_a_list_drops_a_policy_deleted_before_the_watch_began(tmp_path: Path) -> None:
    # Saved, then deleted while the agent was down and before the watch began:
    # no DELETED event ever comes; the next LIST is what shows it gone.
    saver = ClusterPolicies(StateDir(tmp_path))
    saver.replace_all([policy("gone"), policy("kept")])
    saver()
    restarted = ClusterPolicies(StateDir(tmp_path))
    restarted.on_event("ADDED", policy("kept"))
    restarted.replace_all([policy("kept")], since=restarted.events_seen())
    assert names(restarted) == ["kept"]


def test_a_list_answered_before_an_event_does_not_undo_it(tmp_path: Path) -> None:
    source = ClusterPolicies(StateDir(tmp_path))
    source.replace_all([policy("old"), policy("changed", size="1Gi")])
    since = source.events_seen()  # the LIST is sent now ...
    source.on_event("ADDED", policy("new"))  # ... events arrive ...
    source.on_event("DELETED", policy("old"))
    source.on_event("MODIFIED", policy("changed", size="2Gi"))
    # ... and its answer, from before them, comes last.
    source.replace_all([policy("old"), policy("changed", size="1Gi")], since=since)
    policies = source()
    assert policies is not None
    assert {p.name: p.spec.tmpfs[0].size.text for p in policies} == {"changed": "2Gi", "new": "1Gi"}

"""`nodemem apply` on a real tmpfs: states, exit codes, dry-run, and invalid policies.

Exit status: 0 every item applied or unchanged, 1 an item refused or failed, 2 the
policy is invalid — in which case nothing at all was changed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemem.cli import main

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def manifest(point: Path, size: str = "32Mi") -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "test-policy"},
        "spec": {
            "tmpfs": [{"path": str(point), "size": size}],
            "cleanup": [
                {
                    "name": "old",
                    "paths": [f"{point}/*.log"],
                    "schedule": "*/5 * * * *",
                    "olderThan": "1h",
                }
            ],
            "oom": [{"name": "batch", "match": {"comm": "^nodemem-none$"}, "oomScoreAdj": 500}],
        },
    }


def run_apply(tmp_path: Path, document: object, *args: str) -> int:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document))
    return main(["apply", "-f", str(policy), *args])


def mount_state(point: Path) -> tuple[int, str]:
    options = next(
        line.split(" - ")[1]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(point)
    )
    return os.statvfs(point).f_blocks, options


def test_applies_then_reports_unchanged(mount_tmpfs, tmp_path, capsys) -> None:
    point = mount_tmpfs(options="size=64m")
    assert run_apply(tmp_path, manifest(point), "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert [(t["path"], t["state"]) for t in first["tmpfs"]] == [(str(point), "Applied")]
    assert os.statvfs(point).f_blocks * os.statvfs(point).f_frsize == 32 * MiB
    assert "size=32768k" in mount_state(point)[1]
    assert run_apply(tmp_path, manifest(point), "--json") == 0
    second = json.loads(capsys.readouterr().out)
    assert second["tmpfs"][0]["state"] == "Unchanged"


def test_shrink_below_use_is_refused_with_exit_1(mount_tmpfs, tmp_path, capsys) -> None:
    point = mount_tmpfs(options="size=64m")
    (point / "data").write_bytes(b"x" * (16 * MiB))
    before = mount_state(point)
    assert run_apply(tmp_path, manifest(point, size="8Mi")) == 1
    out = capsys.readouterr().out
    assert "Refused" in out
    assert "below current use" in out
    assert mount_state(point) == before


def test_dry_run_plans_and_changes_nothing(mount_tmpfs, tmp_path, capsys) -> None:
    point = mount_tmpfs(options="size=64m")
    old = point / "old.log"
    old.write_bytes(b"x" * MiB)
    os.utime(old, (0, 0))
    before = mount_state(point)
    assert run_apply(tmp_path, manifest(point), "--dry-run", "--run-cleanup", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dryRun"] is True
    assert report["tmpfs"][0]["state"] == "Planned"
    assert report["cleanup"][0]["wouldRemove"] == [str(old)]
    assert mount_state(point) == before
    assert old.exists()


def test_run_cleanup_removes_old_files_and_keeps_held_ones(mount_tmpfs, tmp_path, capsys) -> None:
    point = mount_tmpfs(options="size=64m")
    old, held, new = point / "old.log", point / "held.log", point / "new.log"
    for path in (old, held, new):
        path.write_bytes(b"x" * MiB)
    os.utime(old, (0, 0))
    os.utime(held, (0, 0))
    with open(held, "rb"):  # this test process holds it open: removing it frees nothing
        assert run_apply(tmp_path, manifest(point), "--run-cleanup", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    cleanup = report["cleanup"][0]
    assert (cleanup["filesRemoved"], cleanup["bytesRemoved"]) == (1, MiB)
    assert [f["path"] for f in cleanup["heldOpen"]] == [str(held)]
    assert os.getpid() in [p["pid"] for p in cleanup["heldOpen"][0]["pids"]]
    assert not old.exists()
    assert held.exists() and new.exists()


def test_node_labels_decide_whether_a_policy_applies(mount_tmpfs, tmp_path, capsys) -> None:
    point = mount_tmpfs(options="size=64m")
    document = manifest(point)
    document["spec"]["nodeSelector"] = {"matchLabels": {"pool": "batch"}}
    before = mount_state(point)
    assert run_apply(tmp_path, document, "--json", "--node-labels", "pool=web") == 0
    assert json.loads(capsys.readouterr().out)["tmpfs"] == []
    assert mount_state(point) == before
    assert run_apply(tmp_path, document, "--json", "--node-labels", "pool=batch,zone=a") == 0
    assert json.loads(capsys.readouterr().out)["tmpfs"][0]["state"] == "Applied"


# (field path as the error names it, how to set it in the manifest, invalid values)
letters = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
CORRUPTIONS: list[tuple[str, tuple[Any, ...], st.SearchStrategy[Any]]] = [
    (
        "spec.tmpfs[0].size",
        ("spec", "tmpfs", 0, "size"),
        st.one_of(st.integers(max_value=0), letters, st.just("0Mi"), st.just("101%")),
    ),
    (
        "spec.tmpfs[0].path",
        ("spec", "tmpfs", 0, "path"),
        st.one_of(letters, st.just("/run/../etc"), st.just("")),
    ),
    (
        "spec.tmpfs[0].nrInodes",
        ("spec", "tmpfs", 0, "nrInodes"),
        st.one_of(st.integers(max_value=0), letters),
    ),
    (
        "spec.cleanup[0].schedule",
        ("spec", "cleanup", 0, "schedule"),
        st.one_of(letters, st.just("61 * * * *"), st.just("* * * *"), st.just("* * * * * *")),
    ),
    (
        "spec.cleanup[0].olderThan",
        ("spec", "cleanup", 0, "olderThan"),
        st.one_of(letters, st.just("5d"), st.just("-1h"), st.integers()),
    ),
    (
        "spec.cleanup[0].paths[0]",
        ("spec", "cleanup", 0, "paths", 0),
        st.one_of(letters, st.just("/tmp/../../etc/*")),
    ),
    (
        "spec.oom[0].oomScoreAdj",
        ("spec", "oom", 0, "oomScoreAdj"),
        st.one_of(st.integers(max_value=-1001), st.integers(min_value=1001), st.just(-1000)),
    ),
    (
        "spec.oom[0].match.comm",
        ("spec", "oom", 0, "match", "comm"),
        st.sampled_from(["(", "[a", "*x", "a{2,1}", "(?P<", "\\"]),
    ),
    ("spec.priority", ("spec", "priority"), st.one_of(letters, st.floats(0.1, 0.9))),
    ("metadata.name", ("metadata", "name"), st.from_regex(r"[A-Z_]{1,8}", fullmatch=True)),
]


def corrupt(document: dict[str, Any], where: tuple[Any, ...], value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(document)
    target = broken
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return broken


def test_invalid_policies_exit_2_name_the_field_and_change_nothing(
    mount_tmpfs, tmp_path, capsys
) -> None:
    point = mount_tmpfs(options="size=64m")
    before = mount_state(point)
    valid = manifest(point)

    @settings(
        max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(st.sampled_from(CORRUPTIONS).flatmap(lambda c: st.tuples(st.just(c), c[2])))
    def check(case: tuple[tuple[str, tuple[Any, ...], Any], Any]) -> None:
        (field, where, _), value = case
        assert run_apply(tmp_path, corrupt(valid, where, value)) == 2
        err = capsys.readouterr().err
        assert f"{field}:" in err, err
        assert mount_state(point) == before

    check()


def test_wrong_kind_and_unreadable_file_exit_2(tmp_path, capsys) -> None:
    assert run_apply(tmp_path, {"apiVersion": "v1", "kind": "ConfigMap"}) == 2
    assert "kind" in capsys.readouterr().err
    assert main(["apply", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_memory_emptydirs_of_selected_pods_only(mount_tmpfs, tmp_path, capsys) -> None:
    batch_uid, web_uid = (
        "0a1b2c3d-0000-4000-8000-00000000000a",
        "0a1b2c3d-0000-4000-8000-00000000000b",
    )
    volume = "volumes/kubernetes.io~empty-dir/scratch"
    batch = mount_tmpfs(at=tmp_path / "kubelet/pods" / batch_uid / volume, options="size=64m")
    web = mount_tmpfs(at=tmp_path / "kubelet/pods" / web_uid / volume, options="size=64m")
    pods = {
        "kind": "List",
        "items": [
            {"metadata": {"uid": uid, "name": name, "namespace": "jobs", "labels": {"app": name}}}
            for uid, name in ((batch_uid, "batch"), (web_uid, "web"))
        ],
    }
    pods_file = tmp_path / "pods.json"
    pods_file.write_text(json.dumps(pods))
    document = manifest(tmp_path)
    document["spec"] = {
        "tmpfs": [
            {
                "path": f"{tmp_path}/kubelet/pods/*/volumes/kubernetes.io~empty-dir/*",
                "size": "16Mi",
                "pods": {"namespace": "jobs", "labelSelector": {"matchLabels": {"app": "batch"}}},
            }
        ]
    }
    assert run_apply(tmp_path, document, "--json", "--pods-file", str(pods_file)) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(t["path"], t["state"]) for t in report["tmpfs"]] == [(str(batch), "Applied")]
    assert os.statvfs(batch).f_blocks * os.statvfs(batch).f_frsize == 16 * MiB
    assert os.statvfs(web).f_blocks * os.statvfs(web).f_frsize == 64 * MiB
    # Without knowing the pods, no volume is selected (and none is touched).
    assert run_apply(tmp_path, document, "--json") == 0
    assert json.loads(capsys.readouterr().out)["tmpfs"][0]["state"] == "NotFound"


@pytest.mark.parametrize(
    ("junk", "message"),
    [
        (b"# caf\xe9\n", "not valid UTF-8: byte 0xe9"),
        (b"metadata: {name: twice}\n", 'found duplicate key "metadata"'),
        (b"#" * (2 << 20) + b"\n", "larger than"),
    ],
    ids=["non-utf8", "duplicate-key", "oversize"],
)
def test_a_corrupt_policy_file_exits_2_and_changes_nothing(
    mount_tmpfs, tmp_path, junk, message
) -> None:
    point = mount_tmpfs(options="size=64m")
    before = mount_state(point)
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(yaml.safe_dump(manifest(point)).encode() + junk)
    done = subprocess.run(
        [sys.executable, "-m", "nodemem.cli", "apply", "-f", str(policy)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert mount_state(point) == before


def test_an_unlimited_tmpfs_reports_what_it_holds(mount_tmpfs, tmp_path, capsys) -> None:
    # statfs of a size=0 tmpfs counts no blocks: USED must come from its files.
    point = mount_tmpfs(options="size=0")
    (point / "data").write_bytes(b"x" * (12 << 20))
    assert run_apply(tmp_path, manifest(point, size="4Mi"), "--json") == 1
    (item,) = json.loads(capsys.readouterr().out)["tmpfs"]
    assert item["state"] == "Refused"
    assert item["usedBytes"] == 12 << 20


def test_a_newline_in_a_file_name_cannot_forge_a_report_line(mount_tmpfs, tmp_path, capsys) -> None:
    point = mount_tmpfs(options="size=64m")
    forged = point / "x\n  old: would remove important\x1b[1A.log"  # no "/" in a name
    forged.write_bytes(b"x")
    os.utime(forged, (0, 0))
    assert run_apply(tmp_path, manifest(point), "--run-cleanup", "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [line for line in lines if "would remove" in line]
    assert line == f"  old: would remove {point}/x\\n  old: would remove important\\x1b[1A.log"
    assert forged.exists()

"""OOM rules applied by `nodemem apply` to real processes: comm, cmdline, cgroup, pod
criteria; first match wins; refusals become states, never crashes."""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from memcg_helpers import joining

from nodemem.api.manifest import load_policies
from nodemem.cli import main
from nodemem.host.oom_adj import read_oom_score_adj
from nodemem.host.paths import HostPaths
from nodemem.policy.effective import effective_policy
from nodemem.policy.oom import apply_to_process
from nodemem.policy.pods import PodDirectory
from samples import exec_done

pytestmark = pytest.mark.privileged


@pytest.fixture
def sleeper() -> Iterator[Callable[..., int]]:
    """sleeper(token, cgroup=None) -> pid of a `sleep` whose cmdline carries the token."""
    started: list[subprocess.Popen[bytes]] = []

    def start(cgroup: Path | None = None) -> tuple[int, str]:
        token = f"{secrets.randbelow(10**6) + 10**6}.{len(started) + 1}"
        join = joining(cgroup) if cgroup else None
        process = subprocess.Popen(["sleep", token], preexec_fn=join)  # noqa: PLW1509 - no threads
        started.append(process)
        exec_done(process.pid, ["sleep", token])  # rules match on the new cmdline
        return process.pid, token

    yield start  # type: ignore[misc]
    for process in started:
        process.kill()
        process.wait()


def adj(pid: int) -> int:
    return read_oom_score_adj(HostPaths(), pid)  # one read(2): see its docstring


def policy(rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "oom-test"},
        "spec": {"oom": rules, **spec},
    }


def apply(tmp_path: Path, document: dict[str, Any], *args: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["apply", "-f", str(path), "--json", *args])
    return code, json.loads(buffer.getvalue())


def test_comm_and_cmdline_rules_first_match_wins(sleeper, tmp_path) -> None:
    (first, token1), (second, token2) = sleeper(), sleeper()
    rules = [
        {"name": "one", "match": {"comm": "^sleep$", "cmdline": token1}, "oomScoreAdj": 300},
        {"name": "two", "match": {"cmdline": f"{token1}|{token2}"}, "oomScoreAdj": 600},
    ]
    code, report = apply(tmp_path, policy(rules))
    assert code == 0
    assert (adj(first), adj(second)) == (300, 600)  # first is matched by both: "one" wins
    by_rule = {r["name"]: r for r in report["oom"]["rules"]}
    assert (by_rule["one"]["adjusted"], by_rule["two"]["adjusted"]) == (1, 1)
    # Applying again changes nothing.
    code, report = apply(tmp_path, policy(rules))
    assert (code, report["oom"]["unchanged"], report["oom"]["adjusted"]) == (0, 2, 0)


def test_negative_adj_without_cap_sys_resource_is_forbidden(sleeper, tmp_path) -> None:
    pid, token = sleeper()
    rules = [{"name": "protect", "match": {"cmdline": token}, "oomScoreAdj": -500}]
    code, report = apply(tmp_path, policy(rules))
    caps = int(
        next(
            line
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("CapEff:")
        ).split()[1],
        16,
    )
    if caps & (1 << 24):  # CAP_SYS_RESOURCE: the write is allowed
        assert (code, adj(pid)) == (0, -500)
        return
    assert code == 1
    assert adj(pid) == 0
    failure = report["oom"]["failures"][0]
    assert (failure["pid"], failure["state"]) == (pid, "Forbidden")
    assert "CAP_SYS_RESOURCE" in failure["message"]


def test_dry_run_plans_and_writes_nothing(sleeper, tmp_path) -> None:
    pid, token = sleeper()
    rules = [{"name": "r", "match": {"cmdline": token}, "oomScoreAdj": 700}]
    code, report = apply(tmp_path, policy(rules), "--dry-run")
    assert (code, report["oom"]["planned"], adj(pid)) == (0, 1, 0)


def test_cgroup_qos_and_pod_criteria(memcg_root, sleeper, tmp_path) -> None:
    pod_uid, container_id = str(uuid.uuid4()), secrets.token_hex(32)
    cgroup = memcg_root / "kubepods" / "burstable" / f"pod{pod_uid}" / container_id
    cgroup.mkdir(parents=True)
    in_pod, _ = sleeper(cgroup)
    outside, token = sleeper()
    pods = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "kind": "Pod",
                "metadata": {
                    "uid": pod_uid,
                    "name": "batch-1",
                    "namespace": "team-a",
                    "labels": {"app": "batch"},
                },
                "status": {
                    "containerStatuses": [
                        {"name": "worker", "containerID": f"containerd://{container_id}"}
                    ]
                },
            }
        ],
    }
    pods_file = tmp_path / "pods.json"
    pods_file.write_text(json.dumps(pods))
    rules = [
        {
            "name": "batch-pods",
            "match": {
                "namespace": "team-a",
                "labelSelector": {"matchLabels": {"app": "batch"}},
                "container": "worker",
                "qosClass": "Burstable",
            },
            "oomScoreAdj": 800,
        },
        # A process outside any pod never matches a pod criterion:
        {"name": "other-ns", "match": {"namespace": "team-b", "cmdline": token}, "oomScoreAdj": 5},
        {
            "name": "by-cgroup",
            "match": {"cgroup": f"{memcg_root.name}/kubepods/"},
            "oomScoreAdj": 9,
        },
    ]
    assert apply(tmp_path, policy(rules), "--pods-file", str(pods_file))[0] == 0
    assert adj(in_pod) == 800
    assert adj(outside) == 0
    # Without the pods file, pod criteria cannot match; the cgroup rule then applies.
    assert apply(tmp_path, policy(rules))[0] == 0
    assert adj(in_pod) == 9


def test_pid_1_and_kernel_threads_are_never_touched() -> None:
    comm = Path("/proc/1/comm").read_text().strip()
    text = yaml.safe_dump(
        policy([{"name": "all", "match": {"comm": f"^{comm}$|^kthreadd$"}, "oomScoreAdj": 1000}])
    )
    effective = effective_policy(load_policies(text), {}, 1 << 30)
    paths = HostPaths()
    for pid in (1, 2):  # init and kthreadd: refused before anything is read or written
        assert apply_to_process(paths, pid, effective.oom, PodDirectory(), dry_run=False) is None
    assert adj(2) == 0


def test_a_catastrophic_regex_against_a_hostile_cmdline_finishes(sleeper, tmp_path) -> None:
    """Any user picks their own argv[0]; a backtracking engine would take 2^40 steps on
    this one. RE2 answers in linear time, so the apply ends and the rest is enforced."""
    hostile = subprocess.Popen(["m-x" + "a" * 40 + "!", "300"], executable=shutil.which("sleep"))
    try:
        exec_done(hostile.pid, ["m-x" + "a" * 40 + "!", "300"])
        pid, token = sleeper()
        rules = [
            {"name": "evil", "match": {"cmdline": "^m-x(a+)+$"}, "oomScoreAdj": 500},
            {"name": "mine", "match": {"cmdline": token}, "oomScoreAdj": 600},
        ]
        path = tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(policy(rules)))
        done = subprocess.run(
            [sys.executable, "-m", "nodemem.cli", "apply", "-f", str(path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert (adj(pid), adj(hostile.pid)) == (600, 0)
    finally:
        hostile.kill()
        hostile.wait()


def test_a_pods_sandbox_process_is_not_matched_by_pod_criteria(memcg_root, tmp_path) -> None:
    """The runtime's `pause` keeps the kubelet's value (-998 on real nodes): a rule for the
    pod's processes must not make it an OOM victim, which would end the whole pod. A new
    container not yet in the pod's status is matched."""
    pod_uid = str(uuid.uuid4())
    app, sandbox, new = (secrets.token_hex(32) for _ in range(3))
    pod_cgroup = memcg_root / "kubepods" / "besteffort" / f"pod{pod_uid}"
    pause = tmp_path / "pause"
    shutil.copy("/bin/sleep", pause)  # comm "pause", as the runtimes' sandbox shows
    started: list[subprocess.Popen[bytes]] = []
    try:
        pids = {}
        for container, program in ((sandbox, str(pause)), (app, "sleep"), (new, "sleep")):
            (pod_cgroup / container).mkdir(parents=True)
            process = subprocess.Popen(
                [program, "1000"],
                preexec_fn=joining(pod_cgroup / container),  # noqa: PLW1509 - no threads
            )
            started.append(process)
            exec_done(process.pid, [program, "1000"])
            pids[container] = process.pid
        pod = {
            "kind": "Pod",
            "metadata": {
                "uid": pod_uid,
                "name": "batch-1",
                "namespace": "team-a",
                "labels": {"app": "batch"},
            },
            "status": {
                "containerStatuses": [{"name": "worker", "containerID": f"containerd://{app}"}]
            },
        }
        pods_file = tmp_path / "pods.json"
        pods_file.write_text(json.dumps({"kind": "List", "items": [pod]}))
        rules = [
            {
                "name": "batch",
                "match": {"labelSelector": {"matchLabels": {"app": "batch"}}},
                "oomScoreAdj": 700,
            }
        ]
        before = adj(pids[sandbox])
        assert apply(tmp_path, policy(rules), "--pods-file", str(pods_file))[0] == 0
        assert adj(pids[app]) == 700
        assert adj(pids[new]) == 700  # not listed yet, but not the sandbox
        assert adj(pids[sandbox]) == before
    finally:
        for process in started:
            process.kill()
            process.wait()

"""The chart's PrometheusRule and Grafana dashboard against what a real agent serves.

The rules are rendered by Helm, checked by a real `promtool check rules`, and unit-tested
by `promtool test rules` on input series built from a real scrape of `nodemem agent
--policy-file ... --metrics-port` (names, labels and values as served: a tmpfs near its
limit, a limit the kernel refused, the node's unaccounted Shmem and OOM-kill counter).
promtool comes from Debian's prometheus package (`make tools`). The dashboard's queries
must parse and name only series the agent serves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from metrics_helpers import Series, policy, standalone_agent

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "nodemem"
PROMTOOL = REPO / ".venv" / "tools" / "promtool"
MiB = 1 << 20
NODE = {"instance": "10.0.0.7:8080", "job": "nodemem", "node": "node-a"}  # as scraped


def promtool(*args: str, cwd: Path, stdin: str | None = None) -> str:
    if not PROMTOOL.exists():
        if os.environ.get("NODEMEM_REQUIRE_PRIVILEGED") == "1" or os.environ.get("CI"):
            pytest.fail(f"{PROMTOOL} is missing: `make tools` fetches it", pytrace=False)
        pytest.skip("promtool is missing: run `make tools`")
    result = subprocess.run(
        [str(PROMTOOL), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def rendered(values: dict[str, Any], suffix: str) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="nodemem", namespace="nodemem-system")
    (text,) = [text for path, text in manifests.items() if path.endswith(suffix)]
    document: dict[str, Any] = yaml.safe_load(text)
    return document


@dataclass
class Recorded:
    series: Series
    text: str
    full: Path
    refused: Path


@pytest.fixture
def recorded(mount_tmpfs, tmp_path: Path) -> Iterator[Recorded]:
    """A scrape of a real agent: one tmpfs 95 % full, one whose limit is refused."""
    full = mount_tmpfs("full", options="size=4m")
    (full / "data").write_bytes(b"\xa5" * (4 * MiB - 200 * 1024))
    refused = mount_tmpfs("refused", options="size=64m")
    (refused / "data").write_bytes(b"\xa5" * (2 * MiB))
    spec = {"tmpfs": [{"path": str(full), "size": "4Mi"}, {"path": str(refused), "size": "1Mi"}]}
    with standalone_agent(tmp_path, policy("rules", spec)) as agent:
        yield Recorded(agent.series(), agent.text(), full, refused)


def selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def ours(recorded: Recorded) -> list[tuple[str, dict[str, str], float]]:
    """The recorded samples the alerts read, of this test's mounts and the node."""
    picked = []
    paths = {str(recorded.full), str(recorded.refused)}
    for (name, frozen), sample in recorded.series.items():
        labels = dict(frozen)
        if name in ("nodemem_shmem_unaccounted_bytes", "nodemem_oom_kills_total") or (
            name.startswith("nodemem_tmpfs_") and labels.get("path") in paths
        ):
            picked.append((name, labels, sample))
    return picked


def go_float(sample: float) -> str:
    return str(int(sample)) if sample == int(sample) else repr(sample)


def test_rules_pass_promtool_check_and_unit_tests_on_recorded_series(
    recorded: Recorded, tmp_path: Path
) -> None:
    rule = rendered({"metrics": {"prometheusRule": {"enabled": True}}}, "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    assert "SUCCESS: 4 rules found" in promtool("check", "rules", "rules.yaml", cwd=tmp_path)

    growing, steady = [], []
    sizes: dict[str, float] = {}
    used: dict[str, float] = {}
    for name, labels, sample in ours(recorded):
        key = selector(name, labels | NODE)
        if name == "nodemem_shmem_unaccounted_bytes":  # the real value, then a leak
            growing.append({"series": key, "values": f"{go_float(sample)}+{40 * MiB}x90"})
        elif name == "nodemem_oom_kills_total":  # the real count, then a kill a minute
            growing.append({"series": key, "values": f"{go_float(sample)}+1x90"})
        else:
            growing.append({"series": key, "values": f"{go_float(sample)}x90"})
            if name == "nodemem_tmpfs_mount_size_bytes":
                sizes[labels["path"]] = sample
            if name == "nodemem_tmpfs_mount_used_bytes":
                used[labels["path"]] = sample
        steady.append({"series": key, "values": f"{go_float(sample)}x90"})
    full, refused = str(recorded.full), str(recorded.refused)
    ratio = used[full] / sizes[full]
    assert 0.9 < ratio < 1 and used[refused] / sizes[refused] < 0.1  # as made, really served
    st_dev = recorded.full.stat().st_dev

    node = {**NODE, "severity": "warning"}
    near = {
        "exp_labels": {**node, "path": full, "dev": f"{os.major(st_dev)}:{os.minor(st_dev)}"},
        "exp_annotations": {
            "summary": f"tmpfs {full} on node-a is {ratio * 100:.4g}% full",
            "description": "Writers get ENOSPC soon; its pages are Shmem that no process shows.",
        },
    }
    refusal = {
        "exp_labels": {**node, "path": refused, "policy": "rules", "state": "Refused"},
        "exp_annotations": {
            "summary": f"tmpfs limit of {refused} on node-a not in force: Refused",
            "description": "Policy rules sets a size that the kernel refused (more in use than "
            "that size) or that failed; the NodeMemoryReport (or nodemem apply) says why.",
        },
    }
    leak = {
        "exp_labels": node,
        "exp_annotations": {
            "summary": "Unaccounted Shmem keeps growing on node-a",
            "description": "Shmem that no object explains grew by more than 1073741824 bytes "
            "in an hour: memory of processes nodemem cannot read, of kernel users of shmem, or "
            "swapped. The node's report lists the processes it could not read.",
        },
    }
    kills = {
        "exp_labels": node,
        "exp_annotations": {
            "summary": "OOM kills keep coming on node-a",
            "description": "More than 3 processes killed for memory in 15 minutes: a workload "
            "restarting into the same OOM, or a node short of memory. nodemem report shows "
            "where the memory is.",
        },
    }

    def case(name: str, at: str, alerts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": alerts}

    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": growing,
                "alert_rule_test": [
                    case("NodememTmpfsNearLimit", "3m", []),  # pending: `for: 5m`
                    case("NodememTmpfsNearLimit", "10m", [near]),  # only the full mount
                    case("NodememTmpfsLimitRefused", "10m", [refusal]),
                    case("NodememShmemUnaccountedGrowing", "20m", []),  # not yet 1 GiB
                    case("NodememShmemUnaccountedGrowing", "60m", [leak]),
                    case("NodememOOMKills", "2m", []),
                    case("NodememOOMKills", "30m", [kills]),
                ],
            },
            {
                "interval": "1m",
                "input_series": steady,
                "alert_rule_test": [
                    case("NodememShmemUnaccountedGrowing", "80m", []),
                    case("NodememOOMKills", "80m", []),
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert "SUCCESS" in promtool("test", "rules", "tests.yaml", cwd=tmp_path)


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_dashboard_queries_parse_and_use_only_served_series(
    recorded: Recorded, tmp_path: Path
) -> None:
    config = rendered(
        {"metrics": {"grafanaDashboard": {"enabled": True}}}, "grafana-dashboard.yaml"
    )
    assert config["kind"] == "ConfigMap"
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default
    dashboard = json.loads(config["data"]["nodemem.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    queries = dashboard_queries(dashboard)
    served = {name for name, _ in recorded.series}
    psi = Path("/proc/pressure/memory").exists()
    used_names: set[str] = set()
    expressions = []
    for query in queries:
        used_names |= set(re.findall(r"\bnodemem_[a-z_]+\b", query))
        if not query.startswith("label_values("):  # Grafana's, not PromQL
            # Grafana's variables as Prometheus would get them.
            expr = query.replace("$__rate_interval", "5m").replace("$instance", ".*")
            expressions.append(expr)
    missing = used_names - served
    if not psi:  # documented: no PSI on this kernel, no pressure series
        missing.discard("nodemem_memory_pressure_seconds_total")
    assert missing == set(), f"the dashboard queries series the agent does not serve: {missing}"
    assert {"nodemem_memory_bytes", "nodemem_tmpfs_mount_used_bytes"} <= used_names
    rules = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(expressions)]
    (tmp_path / "queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    promtool("check", "rules", "queries.yaml", cwd=tmp_path)  # every query parses


def test_the_scrape_is_valid_exposition_for_promtool(recorded: Recorded, tmp_path: Path) -> None:
    # Parses, and promtool's lint (names, units, counters' _total) finds nothing.
    assert promtool("check", "metrics", cwd=tmp_path, stdin=recorded.text) == ""

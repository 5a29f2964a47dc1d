"""The generated CRDs: in step with the models, accepted by Kubernetes 1.30-1.37, structural,
accepting every valid policy and report, and showing the right `kubectl get` columns."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from test_policy_fuzz import manifests

from kube.crd_schema import CrdValidator, structural_errors
from nodemem.api.crd import (
    POLICY_CRD_FILE,
    REPORT_CRD_FILE,
    policy_crd,
    render_crds,
    report_crd,
)
from nodemem.api.manifest import policy_to_manifest, validate_policy
from nodemem.api.report import (
    CleanupStatus,
    DeletedOpenFile,
    HeldOpenFile,
    MemorySummary,
    OomFailure,
    OomRuleStatus,
    OomStatus,
    PolicyRef,
    PredictedVictim,
    ProcessRef,
    ShmemByKind,
    ShmemItem,
    ShmemSummary,
    TmpfsStatus,
)
from nodemem.api.status import (
    NodeCounts,
    NodeFailure,
    NodeMemoryPolicyStatus,
    NodeMemoryReportStatus,
    NodeUnaccounted,
    PolicyShmemSummary,
    set_condition,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]

POLICY = CrdValidator(policy_crd())
REPORT = CrdValidator(report_crd())
CREATED = "2025-03-01T08:00:00Z"
NOW = datetime(2025, 3, 1, 11, 25, tzinfo=UTC)  # 3h25m later


# --- the files -------------------------------------------------------------------------


def test_committed_crds_are_what_the_models_generate() -> None:
    rendered = render_crds()
    assert sorted(path.name for path in CRDS.glob("*")) == sorted(rendered)
    for name, text in rendered.items():
        assert (CRDS / name).read_bytes() == text.encode(), (
            f"crds/{name} drifted from the models: regenerate with `nodemem crds --output-dir crds`"
        )


def test_committed_files_parse_back_to_the_generated_crds() -> None:
    assert yaml.safe_load((CRDS / POLICY_CRD_FILE).read_text()) == policy_crd()
    assert yaml.safe_load((CRDS / REPORT_CRD_FILE).read_text()) == report_crd()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("crd", [policy_crd(), report_crd()], ids=["policy", "report"])
def test_crd_is_a_valid_object_for_kubernetes(crd: dict[str, Any], version: str) -> None:
    # kubernetes-validate falls back to an older schema for a version it lacks: insist on it.
    assert kubernetes_validate.validate(crd, version, strict=True) == version


@pytest.mark.parametrize("crd", [policy_crd(), report_crd()], ids=["policy", "report"])
def test_schema_is_structural(crd: dict[str, Any]) -> None:
    [version] = crd["spec"]["versions"]
    assert structural_errors(version["schema"]["openAPIV3Schema"]) == []


@pytest.mark.parametrize(
    ("crd", "kind", "short_name"),
    [(policy_crd(), "NodeMemoryPolicy", "nmp"), (report_crd(), "NodeMemoryReport", "nmr")],
    ids=["policy", "report"],
)
def test_crd_identity(crd: dict[str, Any], kind: str, short_name: str) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.nodemem.dev"
    assert spec["group"] == "nodemem.dev"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["shortNames"] == [short_name]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_list_items_merge_by_their_keys() -> None:
    spec = _schema(policy_crd())["properties"]["spec"]["properties"]
    keys = {
        name: (spec[name]["x-kubernetes-list-type"], spec[name].get("x-kubernetes-list-map-keys"))
        for name in ("tmpfs", "cleanup", "oom")
    }
    assert keys == {
        # podShm items have no path, and a map key must be required: unique paths are a
        # CEL rule on the spec instead.
        "tmpfs": ("atomic", None),
        "cleanup": ("map", ["name"]),
        "oom": ("map", ["name"]),
    }
    assert spec["cleanup"]["items"]["properties"]["age"]["x-kubernetes-list-type"] == "set"
    for crd in (policy_crd(), report_crd()):
        conditions = _schema(crd)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_quantities_are_int_or_string_with_a_pattern() -> None:
    size = _schema(policy_crd())["properties"]["spec"]["properties"]["tmpfs"]["items"]
    size = size["properties"]["size"]
    assert size["x-kubernetes-int-or-string"] is True
    assert size["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert "type" not in size
    assert re.search(size["pattern"], "512Mi") and re.search(size["pattern"], "10%")


def test_simple_defaults_are_kept_in_the_spec_and_none_in_the_status() -> None:
    defaulted = POLICY.apply_defaults(_policy({"oom": [_oom_rule()]}))
    assert defaulted["spec"]["priority"] == 0
    assert defaulted["spec"]["dryRun"] is False
    assert defaulted["spec"]["oom"][0]["allowUnkillable"] is False
    assert "default" not in yaml.safe_dump(_schema(report_crd())["properties"]["status"])


# --- what the CRDs accept --------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_validates_against_the_crd(path: Path) -> None:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
    assert documents
    for document in documents:
        assert POLICY.validate(document) == []


def _cleanup(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "paths": ["/dev/shm/*"], "schedule": "*/5 * * * *", **fields}


def _oom_rule(**fields: Any) -> dict[str, Any]:
    return {"name": "o", "match": {"comm": "^x$"}, "oomScoreAdj": 0, **fields}


def _policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    }


# Edges the models accept: bounds, spellings of quantities and percents, optional parts.
VALID_SPECS: list[dict[str, Any]] = [
    {},
    {"priority": -(2**31), "dryRun": True, "nodeSelector": {}},
    {"tmpfs": [{"path": "/", "size": 1}, {"path": "/run/user/*", "size": "100%"}]},
    {"tmpfs": [{"path": "/dev/shm", "size": "1.5Gi", "nrInodes": 2**63 - 1, "headroom": 0}]},
    {"tmpfs": [{"path": "/dev/shm", "size": "1e9"}, {"path": "/x", "size": "0.5%"}]},
    {"shmem": {"unaccountedThreshold": "2Gi"}},
    {"shmem": {"unaccountedThreshold": 1}},
    {"oom": [_oom_rule(oomScoreAdj=-1000, allowUnkillable=True)]},
    {"oom": [_oom_rule(match={"labelSelector": {}}, oomScoreAdj=1000)]},
    {"oom": [_oom_rule(match={"qosClass": "BestEffort", "container": "c"})]},
    {"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}},
    {"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": [""]}]}},
    {"cleanup": [_cleanup(whenUsageAbove="9%", targetUsage="8.99%")]},
    {"cleanup": [_cleanup(whenUsageAbove="100%", targetUsage="99.5%")]},
    {"cleanup": [_cleanup(whenUsageAbove="10%", targetUsage="9.999%")]},
    {"cleanup": [_cleanup(whenUsageAbove="12.5%", targetUsage="12.25%")]},
    {"cleanup": [_cleanup(whenUsageAbove="50%", targetUsage="012%")]},  # leading zero
    {"cleanup": [_cleanup(whenUsageAbove="50.50%", targetUsage="50.25%")]},  # trailing zero
    {"cleanup": [_cleanup(whenUsageAbove="0050%", targetUsage="49%")]},  # not judged by CEL
    {"cleanup": [_cleanup(olderThan="1h30m", age=["atime", "mtime", "ctime"])]},
    {"cleanup": [_cleanup(olderThan="500µs", exclude=["keep.log", "/abs/*"])]},
]


@pytest.mark.parametrize("spec", VALID_SPECS)
def test_valid_policy_is_accepted_by_models_and_crd(spec: dict[str, Any]) -> None:
    manifest = _policy(spec)
    policy = validate_policy(manifest)
    assert POLICY.validate(manifest) == []
    assert POLICY.validate(policy_to_manifest(policy)) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests)
def test_every_policy_the_models_accept_the_crd_accepts(manifest: dict[str, Any]) -> None:
    policy = validate_policy(manifest)  # the strategy makes valid policies: this checks it
    assert POLICY.validate(manifest) == []
    assert POLICY.validate(policy_to_manifest(policy)) == []


# --- status and reports ----------------------------------------------------------------


def _report_status() -> NodeMemoryReportStatus:
    conditions = set_condition([], "Applied", "True", "AllApplied", now=CREATED)
    conditions = set_condition(conditions, "Degraded", "False", "NoFailures", now=CREATED)
    return NodeMemoryReportStatus(
        policies=[PolicyRef(name="shm-limits", generation=3)],
        memory=MemorySummary(
            total_bytes=16 << 30,
            available_bytes=4 << 30,
            shmem_bytes=6 << 30,
            slab_bytes=1 << 30,
            slab_reclaimable_bytes=600 << 20,
            slab_unreclaimable_bytes=424 << 20,
            kernel_stack_bytes=20 << 20,
            page_tables_bytes=80 << 20,
            vmalloc_used_bytes=60 << 20,
            process_rss_bytes=3 << 30,
        ),
        shmem=ShmemSummary(
            total_bytes=6 << 30,
            attributed_bytes=5 << 30,
            unaccounted_bytes=1 << 30,
            by_kind=ShmemByKind(tmpfs=4 << 30, sysv=1 << 30, memfd=1 << 20),
            top=[
                ShmemItem(
                    kind="tmpfs",
                    name="/dev/shm",
                    bytes=4 << 30,
                    pids=[ProcessRef(pid=4242, comm="postgres")],
                    pod="0c1d2e3f-0000-4000-8000-000000000001",
                ),
                ShmemItem(kind="sysv", name="shmid 7", bytes=1 << 30, note="no attached process"),
            ],
            deleted_open_files=[
                DeletedOpenFile(path="/dev/shm/old.log", bytes=1 << 20, pid=4242, comm="postgres")
            ],
        ),
        unreadable_processes=2,
        tmpfs=[
            TmpfsStatus(
                path="/dev/shm",
                pattern="/dev/shm",
                policy="shm-limits",
                state="Applied",
                size_bytes=4 << 30,
                used_bytes=3 << 30,
                desired_bytes=4 << 30,
            ),
            TmpfsStatus(path="/run/x", pattern="/run/*", policy="shm-limits", state="NotTmpfs"),
        ],
        cleanup=[
            CleanupStatus(
                name="old-logs",
                policy="logs",
                last_run=CREATED,
                next_run=CREATED,
                files_removed=3,
                bytes_removed=3 << 20,
                held_open_files=1,
                held_open_bytes=1 << 20,
                held_open=[
                    HeldOpenFile(
                        path="/run/app/a.log", bytes=1 << 20, pids=[ProcessRef(pid=9, comm="app")]
                    )
                ],
                errors=["/run/app/b.log: permission denied"],
            )
        ],
        oom=OomStatus(
            matched=3,
            adjusted=2,
            failed=1,
            rules=[OomRuleStatus(name="db", policy="oom", matched=3, adjusted=2, failed=1)],
            failures=[OomFailure(pid=7, comm="x", rule="db", state="Failed", message="gone")],
            predicted_victims=[
                PredictedVictim(
                    pid=9,
                    comm="app",
                    oom_score_adj=0,
                    score=1000,
                    rss_bytes=1 << 30,
                    oom_group="/kubepods.slice/pod.slice/ctr.scope",
                    killed_with=[10, 11],
                    group_rss_bytes=3 << 30,
                )
            ],
        ),
        conditions=conditions,
        last_update_time=CREATED,
    )


def _report(status: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": "node-a", "creationTimestamp": CREATED},
    }
    return report | ({"status": status} if status is not None else {})


def test_report_status_from_the_models_validates() -> None:
    status = _report_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    assert REPORT.validate(_report(status), _report(None), subresource="status") == []


def test_nulls_from_a_model_dump_are_pruned_like_the_api_server_does() -> None:
    status = _report_status().model_dump(by_alias=True, mode="json")  # pod: null, ...
    assert status["tmpfs"][1]["sizeBytes"] is None
    assert REPORT.validate(_report(status), _report(None), subresource="status") == []
    assert "sizeBytes" not in REPORT.prune(_report(status))["status"]["tmpfs"][1]


def test_report_status_schema_is_not_permissive() -> None:
    status = _report_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    status["shmem"]["byKind"]["tmpfs"] = "4Gi"
    status["tmpfs"][0]["state"] = "Done"
    status["oom"]["extra"] = 1
    errors = REPORT.validate(_report(status), _report(None), subresource="status")
    assert any(e.startswith("status.shmem.byKind.tmpfs: Invalid value") for e in errors)
    assert any(e.startswith("status.tmpfs[0].state: Unsupported value") for e in errors)
    assert any(e.startswith("status.oom.extra:") for e in errors)


def test_policy_status_from_the_models_validates() -> None:
    policy = _policy({}) | {"status": _policy_status()}
    assert POLICY.validate(policy, _policy({}), subresource="status") == []


def _policy_status() -> dict[str, Any]:
    status = NodeMemoryPolicyStatus(
        observed_generation=3,
        conditions=set_condition([], "Accepted", "True", "Valid", now=CREATED),
        nodes=NodeCounts(matched=12, applied=11, failed=1),
        failures=[NodeFailure(node="node-b", message="/dev/shm: Refused")],
        shmem=PolicyShmemSummary(
            unaccounted_bytes=1 << 30,
            nodes_over_threshold=1,
            worst=[NodeUnaccounted(node="node-a", unaccounted_bytes=1 << 30)],
        ),
    )
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- kubectl get columns ---------------------------------------------------------------


def test_kubectl_get_nmp_columns() -> None:
    policy = _policy({"priority": 10}) | {"status": _policy_status()}
    policy["metadata"] = {"name": "shm-limits", "creationTimestamp": CREATED}
    assert _table_row(policy_crd(), policy) == {
        "NAME": "shm-limits",
        "PRIORITY": "10",
        "MATCHED": "12",
        "APPLIED": "11",
        "FAILED": "1",
        "UNACCOUNTED": str(1 << 30),
        "AGE": "3h25m",
    }


def test_kubectl_get_nmr_columns() -> None:
    status = _report_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    assert _table_row(report_crd(), _report(status)) == {
        "NAME": "node-a",
        "SHMEM": str(6 << 30),
        "UNACCOUNTED": str(1 << 30),
        "APPLIED": "True",
        "AGE": "3h25m",
    }


def test_kubectl_get_shows_none_before_the_first_status() -> None:
    row = _table_row(report_crd(), _report(None))
    assert row["SHMEM"] == row["UNACCOUNTED"] == row["APPLIED"] == "<none>"
    policy = POLICY.apply_defaults(
        _policy({}) | {"metadata": {"name": "p", "creationTimestamp": CREATED}}
    )
    assert _table_row(policy_crd(), policy)["PRIORITY"] == "0"  # defaulted by the server


def _table_row(crd: dict[str, Any], obj: dict[str, Any]) -> dict[str, str]:
    """The row `kubectl get` prints for `obj` (server-side table: first match, <none>)."""
    [version] = crd["spec"]["versions"]
    row = {"NAME": obj["metadata"]["name"]}
    for column in version["additionalPrinterColumns"]:
        found = _jsonpath(obj, column["jsonPath"])
        if not found:
            cell = "<none>"
        elif column["type"] == "date":
            created = datetime.fromisoformat(found[0].replace("Z", "+00:00"))
            cell = _human_duration(int((NOW - created).total_seconds()))
        else:
            cell = str(found[0])
        row[column["name"].upper()] = cell
    return row


_STEP = re.compile(r'\.(\w+)|\[\?\(@\.(\w+)=="([^"]*)"\)\]')


def _jsonpath(obj: Any, path: str) -> list[Any]:
    """The values at a JSONPath of the subset printer columns use: `.a.b`, `[?(@.k=="v")]`."""
    assert "".join(match[0] for match in _STEP.finditer(path)) == path, path
    values = [obj]
    for field, key, wanted in _STEP.findall(path):
        if field:
            values = [v[field] for v in values if isinstance(v, dict) and field in v]
        else:
            values = [
                item
                for v in values
                if isinstance(v, list)
                for item in v
                if isinstance(item, dict) and item.get(key) == wanted
            ]
    return values


def _human_duration(seconds: int) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, for kubectl's AGE."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = hours // 24 % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema

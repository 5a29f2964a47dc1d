"""The generated CRDs and their CEL rules, judged by the real kube-apiserver.

The session applied ``crds/`` with kubectl; here: they are Established and served as
generated; every broken manifest in tests/data/broken is refused naming its field; the
examples, the models' edge cases and every policy the models accept are accepted; the CEL
rules fit the server's cost budget only with the bounds the models give; status writes
are stored as the server stores them (nulls pruned, status only through ``/status``);
and ``kubectl get nmp,nmr`` shows the printer columns. Objects are created with
``dryRun=All`` where nothing needs to be stored, with ``fieldValidation=Strict`` as kubectl
sends by default.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import ControlPlane
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from restclient import ApiError, Kube, resource_path

from conftest import POLICIES, REPORTS, ROOT, kubectl
from nodemem.api.crd import POLICY_CRD_FILE, REPORT_CRD_FILE, policy_crd, report_crd
from nodemem.api.manifest import PolicyError, policy_to_manifest, validate_policy
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
from unit.test_policy_fuzz import manifests

CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
BROKEN = sorted((ROOT / "tests" / "data" / "broken").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (\S+)$", re.MULTILINE)
_STATUS = re.compile(r"^# status: (\d+)$", re.MULTILINE)
DRY_RUN = {"dryRun": "All", "fieldValidation": "Strict"}
STRICT = {"fieldValidation": "Strict"}
CREATED = "2025-03-01T08:00:00Z"
MERGE = "application/merge-patch+json"


def dry_run(kube: Kube, obj: dict[str, Any], resource: str = POLICIES) -> Any:
    """The server's answer to creating `obj` (nothing is stored)."""
    return kube.request("POST", resource_path(resource), obj, query=DRY_RUN)


def refusal(kube: Kube, obj: dict[str, Any], resource: str = POLICIES) -> ApiError:
    with pytest.raises(ApiError) as caught:
        dry_run(kube, obj, resource)
    return caught.value


def causes(error: ApiError) -> list[dict[str, str]]:
    assert isinstance(error.body, dict), error.body
    found: list[dict[str, str]] = error.body.get("details", {}).get("causes", [])
    return found


def _policy(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def _report(name: str = "node-a") -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": name},
    }


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _rule_messages(node: dict[str, Any]) -> set[str]:
    messages = {rule["message"] for rule in node.get("x-kubernetes-validations", [])}
    for child in node.get("properties", {}).values():
        messages |= _rule_messages(child)
    if isinstance(node.get("items"), dict):
        messages |= _rule_messages(node["items"])
    return messages


# --- the CRDs as served ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("generated", "file"),
    [(policy_crd(), POLICY_CRD_FILE), (report_crd(), REPORT_CRD_FILE)],
    ids=["policy", "report"],
)
def test_crd_is_established_and_served_as_generated(
    kube: Kube, generated: dict[str, Any], file: str
) -> None:
    assert yaml.safe_load((ROOT / "crds" / file).read_text()) == generated  # what was applied
    served = kube.get_object(CRDS, generated["metadata"]["name"])
    conditions = {c["type"]: c["status"] for c in served["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert served["status"]["acceptedNames"] == generated["spec"]["names"]
    # Unchanged: the server only adds the default conversion strategy.
    assert served["spec"] == generated["spec"] | {"conversion": {"strategy": "None"}}


# --- the CEL cost budget ---------------------------------------------------------------

# The bounds the server's cost estimate needs (each alone): without one, a rule's estimated
# cost exceeds the per-rule or the per-schema budget.
COST_BOUNDS = [
    ("tmpfs", "maxItems"),
    ("tmpfs[].path", "maxLength"),
    ("cleanup", "maxItems"),
    ("cleanup[].whenUsageAbove", "maxLength"),
    ("cleanup[].targetUsage", "maxLength"),
]


def _policy_crd_in_another_group() -> dict[str, Any]:
    """The policy CRD under a group of its own, so that a dry-run create is not a conflict."""
    crd = policy_crd()
    crd["spec"]["group"] = "unbounded.nodemem.dev"
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.unbounded.nodemem.dev"
    return crd


def _spec_node(crd: dict[str, Any], path: str) -> dict[str, Any]:
    node: dict[str, Any] = _schema(crd)["properties"]["spec"]
    for part in path.split("."):
        name = part.removesuffix("[]")
        node = node["properties"][name]
        if part.endswith("[]"):
            node = node["items"]
    return node


def test_the_policy_crd_fits_the_cost_budget_as_generated(kube: Kube) -> None:
    # The control for the test below: the same CRD, bounds kept, is accepted.
    answer = kube.request(
        "POST", resource_path(CRDS), _policy_crd_in_another_group(), query=DRY_RUN
    )
    assert _schema(answer) == _schema(policy_crd())


@pytest.mark.parametrize(("path", "bound"), COST_BOUNDS, ids=[f"{p}.{b}" for p, b in COST_BOUNDS])
def test_without_a_bound_the_rules_exceed_the_cost_budget(
    kube: Kube, path: str, bound: str
) -> None:
    crd = _policy_crd_in_another_group()
    del _spec_node(crd, path)[bound]
    with pytest.raises(ApiError) as caught:
        kube.request("POST", resource_path(CRDS), crd, query=DRY_RUN)
    assert caught.value.status == 422
    assert "estimated rule cost exceeds budget" in caught.value.message


# --- what the server refuses -----------------------------------------------------------


@pytest.mark.parametrize("path", BROKEN, ids=[path.stem for path in BROKEN])
def test_broken_manifest_is_refused_naming_the_field(kube: Kube, path: Path) -> None:
    text = path.read_text()
    [expected] = _EXPECT.findall(text)
    status = int(next(iter(_STATUS.findall(text)), 422))
    error = refusal(kube, yaml.safe_load(text))
    assert error.status == status, error.message
    assert expected in error.message
    if status == 422:
        # One problem per manifest: every cause names that field (but the server's note
        # that a type error kept the CEL rules from running).
        fields = [cause["field"] for cause in causes(error)]
        assert fields[0] == expected, error.message
        assert set(fields) <= {expected, "<nil>"}, error.message


def test_every_cel_rule_has_a_broken_manifest(kube: Kube) -> None:
    refused = [
        cause["message"]
        for path in BROKEN
        for cause in causes(refusal(kube, yaml.safe_load(path.read_text())))
    ]
    rules = _rule_messages(_schema(policy_crd()))
    assert {rule for rule in rules if not any(rule in message for message in refused)} == set()


# targetUsage against whenUsageAbove, as the rule compares them: doubles.
PERCENT_EXAMPLES = [
    ("80%", "85%", True),
    ("80%", "80%", True),
    ("80%", "79.99%", False),
    ("9%", "10%", True),
    ("10%", "9%", False),
    ("100%", "99.9%", False),
    ("12%", "12.5%", True),
    ("12.5%", "12%", False),
    ("12.5%", "12.50%", True),
    ("12%", "12.0%", True),
    ("0.5%", "0.25%", False),
    ("50%", "050%", True),
    ("50%", "049%", False),
    ("0050%", "60%", True),  # beyond what the old string comparison could judge
    ("0050%", "49%", False),
    ("50%", "49.99999999999999999%", True),  # one double: the models refuse it too
]


def _cleanup(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "paths": ["/dev/shm/*"], "schedule": "*/5 * * * *", **fields}


def _target_refused(kube: Kube, trigger: str, target: str) -> bool:
    manifest = _policy({"cleanup": [_cleanup(whenUsageAbove=trigger, targetUsage=target)]})
    try:
        dry_run(kube, manifest)
    except ApiError as error:
        assert error.status == 422, error.message
        assert [c["field"] for c in causes(error)] == ["spec.cleanup[0].targetUsage"], error.message
        assert "must be lower than whenUsageAbove" in error.message
        return True
    return False


def _models_refuse_target(trigger: str, target: str) -> bool:
    try:
        validate_policy(
            _policy({"cleanup": [_cleanup(whenUsageAbove=trigger, targetUsage=target)]})
        )
    except PolicyError as error:
        assert "spec.cleanup[0].targetUsage: must be lower than whenUsageAbove" in str(error)
        return True
    return False


@pytest.mark.parametrize(("trigger", "target", "refused"), PERCENT_EXAMPLES)
def test_target_below_trigger_examples(
    kube: Kube, trigger: str, target: str, refused: bool
) -> None:
    assert _target_refused(kube, trigger, target) is refused
    assert _models_refuse_target(trigger, target) is refused


percents = st.builds(
    "{}{}%".format,
    st.from_regex(r"(0{0,2}[1-9][0-9]?|100)", fullmatch=True),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,20}", fullmatch=True)),
).filter(lambda p: 0 < Decimal(p[:-1]) <= 100)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(percents, percents)
def test_target_below_trigger_agrees_with_the_models(kube: Kube, trigger: str, target: str) -> None:
    refused = _target_refused(kube, trigger, target)
    assert refused == (float(target[:-1]) >= float(trigger[:-1]))
    assert _models_refuse_target(trigger, target) == refused


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"path": "/dev/shm", "podShm": True, "pods": {}, "size": "1Gi"}, "exactly one"),
        ({"size": "1Gi"}, "exactly one"),
        ({"podShm": True, "size": "1Gi"}, "podShm needs pods"),
        ({"podShm": True, "pods": {"volume": "dshm"}, "size": "1Gi"}, "pods.volume"),
    ],
    ids=["both", "neither", "no-pods", "volume"],
)
def test_invalid_pod_shm_items_are_refused(kube: Kube, item: dict[str, Any], message: str) -> None:
    error = refusal(kube, _policy({"tmpfs": [item]}))
    assert error.status == 422
    [cause] = causes(error)  # one rule fails; the others hold (or are not evaluated)
    assert message in cause["message"]


# --- what the server accepts -----------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_is_accepted(kube: Kube, path: Path) -> None:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
    assert documents
    for document in documents:
        assert document["kind"] == "NodeMemoryPolicy"
        assert dry_run(kube, document)["spec"]


def _oom_rule(**fields: Any) -> dict[str, Any]:
    return {"name": "o", "match": {"comm": "^x$"}, "oomScoreAdj": 0, **fields}


# Edges the models accept: bounds, spellings of quantities and percents, optional parts.
VALID_SPECS: list[dict[str, Any]] = [
    {},
    {"priority": -(2**31), "dryRun": True, "nodeSelector": {}},
    {"tmpfs": [{"path": "/", "size": 1}, {"path": "/run/user/*", "size": "100%"}]},
    {"tmpfs": [{"path": "/dev/shm", "size": "1.5Gi", "nrInodes": 2**63 - 1, "headroom": 0}]},
    {"tmpfs": [{"path": "/dev/shm", "size": "1e9", "nrInodes": 1}, {"path": "/x", "size": "0.5%"}]},
    {
        "tmpfs": [
            {"path": "/dev/shm", "size": "1Gi"},
            {"podShm": True, "pods": {}, "size": "256Mi"},
            {"podShm": True, "pods": {"namespace": "ml"}, "size": "1Gi"},
        ]
    },
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
    {"cleanup": [_cleanup(whenUsageAbove="0050%", targetUsage="49%")]},
    {"cleanup": [_cleanup(olderThan="1h30m", age=["atime", "mtime", "ctime"])]},
    {"cleanup": [_cleanup(olderThan="500µs", exclude=["keep.log", "/abs/*"])]},
]


@pytest.mark.parametrize("spec", VALID_SPECS)
def test_valid_policy_is_accepted_by_models_and_server(kube: Kube, spec: dict[str, Any]) -> None:
    manifest = _policy(spec)
    policy = validate_policy(manifest)
    dry_run(kube, manifest)
    dry_run(kube, policy_to_manifest(policy))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(manifests)
def test_every_policy_the_models_accept_the_server_accepts(
    kube: Kube, manifest: dict[str, Any]
) -> None:
    policy = validate_policy(manifest)  # the strategy makes valid policies: this checks it
    dry_run(kube, manifest)
    dry_run(kube, policy_to_manifest(policy))


def test_the_server_fills_in_the_spec_defaults(kube: Kube) -> None:
    stored = dry_run(kube, _policy({"oom": [_oom_rule()]}))
    assert stored["spec"]["priority"] == 0
    assert stored["spec"]["dryRun"] is False
    assert stored["spec"]["oom"][0]["allowUnkillable"] is False


# --- status ----------------------------------------------------------------------------


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


def _policy_status() -> NodeMemoryPolicyStatus:
    return NodeMemoryPolicyStatus(
        observed_generation=1,
        conditions=set_condition([], "Accepted", "True", "Valid", now=CREATED),
        nodes=NodeCounts(matched=12, applied=11, failed=1),
        failures=[NodeFailure(node="node-b", message="/dev/shm: Refused")],
        shmem=PolicyShmemSummary(
            unaccounted_bytes=1 << 30,
            nodes_over_threshold=1,
            worst=[NodeUnaccounted(node="node-a", unaccounted_bytes=1 << 30)],
        ),
    )


def _status_path(resource: str, name: str) -> str:
    return resource_path(resource, name) + "/status"


def test_report_status_with_nulls_is_stored_without_them(kube: Kube) -> None:
    model = _report_status()
    dumped = model.model_dump(by_alias=True, mode="json")  # pod: null, sizeBytes: null, ...
    assert dumped["tmpfs"][1]["sizeBytes"] is None
    kube.create_object(REPORTS, _report())
    # A whole-object update of the status, and the merge patch the agent sends.
    current = kube.get_object(REPORTS, "node-a")
    answer = kube.request(
        "PUT", _status_path(REPORTS, "node-a"), current | {"status": dumped}, query=STRICT
    )
    stored = kube.get_object(REPORTS, "node-a")["status"]
    assert answer["status"] == stored
    assert stored == model.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert NodeMemoryReportStatus.model_validate(stored) == model
    patched = kube.request(
        "PATCH",
        _status_path(REPORTS, "node-a"),
        {"status": dumped},
        content_type=MERGE,
        query=STRICT,
    )
    assert patched["status"] == stored


def test_policy_status_with_nulls_is_stored_without_them(kube: Kube) -> None:
    model = _policy_status()
    dumped = model.model_dump(by_alias=True, mode="json")
    assert dumped["conditions"][0]["observedGeneration"] is None
    kube.create_object(POLICIES, _policy({}))
    answer = kube.request(
        "PATCH", _status_path(POLICIES, "p"), {"status": dumped}, content_type=MERGE, query=STRICT
    )
    assert answer["status"] == model.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert NodeMemoryPolicyStatus.model_validate(answer["status"]) == model


def test_report_status_schema_is_not_permissive(kube: Kube) -> None:
    kube.create_object(REPORTS, _report())
    status = _report_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    status["shmem"]["byKind"]["tmpfs"] = "4Gi"
    status["tmpfs"][0]["state"] = "Done"
    with pytest.raises(ApiError) as caught:
        kube.patch_object(REPORTS, "node-a", {"status": status}, subresource="status")
    assert caught.value.status == 422
    fields = {cause["field"] for cause in causes(caught.value)}
    assert {"status.shmem.byKind.tmpfs", "status.tmpfs[0].state"} <= fields, caught.value.message
    status = _report_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    status["oom"]["extra"] = 1
    with pytest.raises(ApiError) as caught:
        kube.request(
            "PATCH",
            _status_path(REPORTS, "node-a"),
            {"status": status},
            content_type=MERGE,
            query=STRICT,
        )
    assert caught.value.status in (400, 422)
    assert 'unknown field "status.oom.extra"' in caught.value.message


def test_status_is_written_through_the_status_subresource_only(kube: Kube) -> None:
    # The agent creates its report and then writes its status; the controller writes a
    # policy's status without touching its generation, which the reports echo back.
    status = _policy_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    created = kube.create_object(POLICIES, _policy({"priority": 1}) | {"status": status})
    assert "status" not in created
    assert created["metadata"]["generation"] == 1
    written = kube.patch_object(POLICIES, "p", {"status": status}, subresource="status")
    assert written["status"] == status
    assert written["metadata"]["generation"] == 1
    edited = kube.patch_object(
        POLICIES, "p", {"spec": {"priority": 2}, "status": {"nodes": {"matched": 0}}}
    )
    assert edited["spec"]["priority"] == 2
    assert edited["metadata"]["generation"] == 2
    assert edited["status"] == status  # the main endpoint leaves the status alone
    report = kube.create_object(REPORTS, _report() | {"status": {"unreadableProcesses": 1}})
    assert "status" not in report


# --- kubectl get -----------------------------------------------------------------------


def _tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """`kubectl get a,b` output: resource -> object name -> column -> cell ('' when empty).

    Cells are cut at the header's column starts: an empty cell is blank.
    """
    tables: dict[str, dict[str, dict[str, str]]] = {}
    for block in text.strip("\n").split("\n\n"):
        header, *rows = block.splitlines()
        starts = [match.start() for match in re.finditer(r"\S+", header)]
        columns = header.split()
        for row in rows:
            cuts = [*starts[1:], None]
            cells = {
                column: row[start:end].strip()
                for column, start, end in zip(columns, starts, cuts, strict=True)
            }
            resource, name = cells.pop("NAME").split("/")
            tables.setdefault(resource, {})[name] = cells
    return tables


def test_kubectl_get_shows_the_printer_columns(control_plane: ControlPlane, kube: Kube) -> None:
    kube.create_object(POLICIES, _policy({"priority": 10}, name="shm-limits"))
    kube.create_object(POLICIES, _policy({}, name="fresh"))  # before the first status
    status = _policy_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    kube.patch_object(POLICIES, "shm-limits", {"status": status}, subresource="status")
    kube.create_object(REPORTS, _report("node-a"))
    kube.create_object(REPORTS, _report("node-b"))  # before the first status
    report = _report_status().model_dump(by_alias=True, exclude_none=True, mode="json")
    kube.patch_object(REPORTS, "node-a", {"status": report}, subresource="status")

    tables = _tables(kubectl(control_plane, "get", "nmp,nmr"))
    ages = [row.pop("AGE") for table in tables.values() for row in table.values()]
    assert all(re.fullmatch(r"[0-9]+s", age) for age in ages), ages
    assert tables == {
        "nodememorypolicy.nodemem.dev": {
            "fresh": {
                "PRIORITY": "0",  # defaulted by the server
                "MATCHED": "",
                "APPLIED": "",
                "FAILED": "",
                "UNACCOUNTED": "",
            },
            "shm-limits": {
                "PRIORITY": "10",
                "MATCHED": "12",
                "APPLIED": "11",
                "FAILED": "1",
                "UNACCOUNTED": str(1 << 30),
            },
        },
        "nodememoryreport.nodemem.dev": {
            "node-a": {"SHMEM": str(6 << 30), "UNACCOUNTED": str(1 << 30), "APPLIED": "True"},
            "node-b": {"SHMEM": "", "UNACCOUNTED": "", "APPLIED": ""},
        },
    }

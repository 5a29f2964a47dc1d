"""The API emulator behaves like a real API server where nodemem depends on it.

The emulator runs in its own thread and loop (the ``kube_server`` fixture); these tests
are synchronous and talk to it with the official ``kubernetes`` client, raw HTTP
(urllib3, for status codes and raw watch streams) and kopf in a thread. Generic
semantics use a stand-in CRD (``widgets.example.nodemem.dev``) with a stand-in
validator, so that they do not change with nodemem's schemas; the tests at the end
check nodemem's own CRDs and their validator when those files exist.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import kopf
import kubernetes
import pytest
import urllib3
from emulator import (
    ApiError,
    EmulatorThread,
    KopfThread,
    KubeEmulator,
    api_client_for,
    load_crds,
    make_emulator,
    parse_api_path,
    serve,
    wait_until,
)
from k8s_patches import PatchError, apply_json_patch, apply_strategic_merge_patch
from k8s_selectors import FieldSelector, LabelSelector, SelectorError
from kubernetes import client, watch
from kubernetes.client import ApiClient, ApiException

GROUP, VERSION, PLURAL = "example.nodemem.dev", "v1", "widgets"
WIDGETS = f"{GROUP}/{VERSION}/{PLURAL}"
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Cluster",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "selectableFields": [{"jsonPath": ".spec.color"}],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "integer", "default": 1},
                                    "color": {"type": "string"},
                                    "tags": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "phase": {"type": "string"},
                                    "observedGeneration": {"type": "integer"},
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


def widget_validator(
    obj: dict[str, Any], old: dict[str, Any] | None = None, *, subresource: str | None = None
) -> list[str]:
    """A stand-in for crd_schema.CrdValidator: sizes are not negative, phases are known."""
    errors = []
    size = obj.get("spec", {}).get("size", 0)
    if isinstance(size, int) and size < 0:
        errors.append(f"spec.size: Invalid value: {size}: must be greater than or equal to 0")
    phase = obj.get("status", {}).get("phase")
    if phase not in (None, "Pending", "Ready"):
        errors.append(f'status.phase: Unsupported value: "{phase}"')
    return errors


class Widgets:
    """Shorthands for the stand-in custom resource through the official client."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api = client.CustomObjectsApi(api_client)

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name}}
        body["spec"] = spec
        return self.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)  # type: ignore[no-any-return]

    def get(self, name: str) -> dict[str, Any]:
        return self.api.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)  # type: ignore[no-any-return]

    def patch(self, name: str, body: Any, **kwargs: Any) -> dict[str, Any]:
        return self.api.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, body, **kwargs)  # type: ignore[no-any-return]

    def patch_status(self, name: str, body: Any) -> dict[str, Any]:
        return self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, body)  # type: ignore[no-any-return]

    def replace(self, name: str, body: Any) -> dict[str, Any]:
        return self.api.replace_cluster_custom_object(GROUP, VERSION, PLURAL, name, body)  # type: ignore[no-any-return]

    def delete(self, name: str) -> dict[str, Any]:
        return self.api.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)  # type: ignore[no-any-return]

    def list(self, **kwargs: Any) -> dict[str, Any]:
        return self.api.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)  # type: ignore[no-any-return]


@pytest.fixture
def widgets(kube: KubeEmulator, api_client: ApiClient) -> Widgets:
    kube.register_crd(WIDGET_CRD, validator=widget_validator)
    return Widgets(api_client)


@pytest.fixture
def core(api_client: ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def http(kube_url: str) -> Iterator[Callable[..., urllib3.BaseHTTPResponse]]:
    pool = urllib3.PoolManager()

    def request(method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
            kwargs["body"] = json.dumps(body).encode()
        return pool.request(method, kube_url + path, headers=headers, **kwargs)

    yield request
    pool.clear()


def api_error(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.value.body)
    return body


def pod(name: str, node: str = "node-1", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
    }


def raw_watch(
    kube_url: str,
    path: str,
    *,
    until: Callable[[list[dict[str, Any]]], bool] = lambda _: False,
    read_timeout: float = 10.0,
    **params: str,
) -> list[dict[str, Any]]:
    """Read a raw watch stream until ``until(events)`` holds or the server ends it."""
    query = "&".join(f"{key}={value}" for key, value in {"watch": "true", **params}.items())
    pool = urllib3.PoolManager()
    response = pool.request(
        "GET",
        f"{kube_url}{path}?{query}",
        preload_content=False,
        timeout=urllib3.Timeout(connect=5, read=read_timeout),
    )
    assert response.status == 200
    events: list[dict[str, Any]] = []
    try:
        for line in response:
            if line.strip():
                events.append(json.loads(line))
                if until(events):
                    break
    finally:
        response.release_conn()
        pool.clear()
    return events


# ------------------------------------------------------------------------- metadata


def test_create_answers_201_with_uid_timestamp_generation_and_global_resource_version(
    kube: KubeEmulator, core: client.CoreV1Api, widgets: Widgets
) -> None:
    before = kube.resource_version
    node = core.create_node({"metadata": {"name": "node-1"}})
    widget = widgets.create("w1", size=3)

    assert kube.requests(verb="create", resource="nodes")[-1].status == 201
    node_rv, widget_rv = (
        int(node.metadata.resource_version),
        int(widget["metadata"]["resourceVersion"]),
    )
    assert before < node_rv < widget_rv  # one global counter across resources
    assert len(widget["metadata"]["uid"]) == 36 and widget["metadata"]["uid"] != node.metadata.uid
    assert widget["metadata"]["creationTimestamp"].endswith("Z")
    assert widget["metadata"]["generation"] == 1


def test_generation_bumps_on_spec_changes_only(widgets: Widgets) -> None:
    rv0 = int(widgets.create("w1", size=1)["metadata"]["resourceVersion"])

    labelled = widgets.patch("w1", {"metadata": {"labels": {"a": "b"}}})
    resized = widgets.patch("w1", {"spec": {"size": 2}})
    with_status = widgets.patch_status("w1", {"status": {"phase": "Ready"}})

    assert labelled["metadata"]["generation"] == 1
    assert resized["metadata"]["generation"] == 2
    assert with_status["metadata"]["generation"] == 2
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (labelled, resized, with_status)]
    assert [rv0, *rvs] == sorted({rv0, *rvs})  # every write got a new, higher version


def test_create_of_an_existing_name_answers_409_already_exists(widgets: Widgets) -> None:
    widgets.create("w1")
    with pytest.raises(ApiException) as exc:
        widgets.create("w1")

    assert exc.value.status == 409
    assert api_error(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'{PLURAL}.{GROUP} "w1" already exists',
        "reason": "AlreadyExists",
        "code": 409,
        "details": {"name": "w1", "kind": PLURAL, "group": GROUP},
    }


def test_generate_name_gives_unique_names_with_the_prefix(core: client.CoreV1Api) -> None:
    body = {"metadata": {"generateName": "agent-"}, "involvedObject": {"kind": "Node"}}
    names = {core.create_namespaced_event("default", body).metadata.name for _ in range(20)}

    assert len(names) == 20
    assert all(name.startswith("agent-") and len(name) == len("agent-") + 5 for name in names)


def test_create_without_name_or_generate_name_answers_422(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as exc:
        core.create_node({"metadata": {}})

    assert exc.value.status == 422
    assert api_error(exc)["details"]["causes"][0]["field"] == "metadata.name"


def test_create_of_a_namespaced_kind_without_a_namespace_in_the_url_answers_404(
    http: Callable[..., Any],
) -> None:
    body = pod("p1")
    body["metadata"]["namespace"] = "default"

    assert http("POST", "/api/v1/pods", body).status == 404
    assert http("POST", "/api/v1/namespaces/default/pods", body).status == 201


def test_create_in_a_missing_namespace_answers_404(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_pod("nowhere", pod("p1"))

    assert exc.value.status == 404
    assert api_error(exc)["message"] == 'namespaces "nowhere" not found'


# ------------------------------------------------------------------------- writes


def test_put_with_a_stale_resource_version_answers_409_conflict(widgets: Widgets) -> None:
    stale = widgets.create("w1", size=1)
    fresh = widgets.replace("w1", {**stale, "spec": {"size": 2}})
    assert fresh["spec"]["size"] == 2

    with pytest.raises(ApiException) as exc:
        widgets.replace("w1", {**stale, "spec": {"size": 3}})

    assert exc.value.status == 409
    assert api_error(exc)["reason"] == "Conflict"
    assert widgets.get("w1")["spec"]["size"] == 2


def test_put_of_a_custom_resource_without_resource_version_answers_422(
    widgets: Widgets,
) -> None:
    created = widgets.create("w1")
    del created["metadata"]["resourceVersion"]

    with pytest.raises(ApiException) as exc:
        widgets.replace("w1", created)

    assert exc.value.status == 422
    assert api_error(exc)["details"]["causes"][0]["field"] == "metadata.resourceVersion"


def test_merge_patch_with_a_stale_resource_version_answers_409(widgets: Widgets) -> None:
    stale_rv = widgets.create("w1")["metadata"]["resourceVersion"]
    widgets.patch("w1", {"spec": {"size": 5}})

    with pytest.raises(ApiException) as exc:
        widgets.patch("w1", {"metadata": {"resourceVersion": stale_rv}, "spec": {"size": 6}})

    assert exc.value.status == 409
    assert widgets.get("w1")["spec"]["size"] == 5


def test_failed_json_patch_test_answers_422_and_changes_nothing(widgets: Widgets) -> None:
    created = widgets.create("w1")
    rv = created["metadata"]["resourceVersion"]
    finalizer = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example/f"]},
    ]
    ok = widgets.patch("w1", finalizer, _content_type="application/json-patch+json")
    assert ok["metadata"]["finalizers"] == ["example/f"]

    with pytest.raises(ApiException) as exc:  # the same test again: the version moved on
        widgets.patch("w1", finalizer, _content_type="application/json-patch+json")

    assert exc.value.status == 422
    assert widgets.get("w1")["metadata"]["resourceVersion"] == ok["metadata"]["resourceVersion"]


def test_status_subresource_separates_status_from_the_rest(widgets: Widgets) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 1},
        "status": {"phase": "Ready"},
    }
    created = widgets.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    assert "status" not in created  # create drops .status

    main = widgets.patch("w1", {"spec": {"size": 2}, "status": {"phase": "Ready"}})
    assert main["spec"]["size"] == 2 and "status" not in main  # main endpoint ignores .status

    status = widgets.patch_status("w1", {"spec": {"size": 9}, "status": {"phase": "Pending"}})
    assert status["status"] == {"phase": "Pending"}
    assert status["spec"]["size"] == 2  # /status ignores everything but .status


def test_pods_and_nodes_keep_the_status_a_test_seeds_on_create(core: client.CoreV1Api) -> None:
    node = core.create_node({"metadata": {"name": "n1"}, "status": {"capacity": {"memory": "8Gi"}}})
    body = pod("p1", node="n1")
    body["status"] = {"phase": "Running"}
    created = core.create_namespaced_pod("default", body)

    assert node.status.capacity == {"memory": "8Gi"}
    assert created.status.phase == "Running"
    core.patch_node("n1", {"status": {"capacity": {"memory": "1Gi"}}})  # main endpoint: ignored
    assert core.read_node("n1").status.capacity == {"memory": "8Gi"}


def test_no_op_patch_keeps_the_resource_version_and_emits_no_event(
    kube: KubeEmulator, kube_url: str, widgets: Widgets
) -> None:
    created = widgets.create("w1", size=1, color="red")
    rv = created["metadata"]["resourceVersion"]

    same = widgets.patch("w1", {"spec": {"size": 1}})
    status_noop = widgets.patch("w1", {"status": {"phase": "Ready"}})  # ignored: no change
    changed = widgets.patch("w1", {"spec": {"size": 2}})

    assert same["metadata"]["resourceVersion"] == rv
    assert status_noop["metadata"]["resourceVersion"] == rv
    events = raw_watch(kube_url, f"/apis/{WIDGETS}", resourceVersion=rv, timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in events] == [
        ("MODIFIED", changed["metadata"]["resourceVersion"])
    ]
    assert [t for _, t, _ in kube.event_history(WIDGETS)] == ["ADDED", "MODIFIED"]


def test_delete_with_finalizers_marks_the_object_until_the_last_finalizer_goes(
    kube: KubeEmulator, kube_url: str, widgets: Widgets
) -> None:
    widgets.create("w1")
    marked = widgets.patch("w1", {"metadata": {"finalizers": ["example/a", "example/b"]}})
    rv = marked["metadata"]["resourceVersion"]

    deleting = widgets.delete("w1")
    assert deleting["metadata"]["deletionTimestamp"]
    assert widgets.get("w1")["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as exc:  # no new finalizers once deletion started
        widgets.patch("w1", {"metadata": {"finalizers": ["example/a", "example/b", "x/c"]}})
    assert exc.value.status == 422

    widgets.patch("w1", {"metadata": {"finalizers": ["example/b"]}})
    widgets.patch("w1", {"metadata": {"finalizers": []}})

    with pytest.raises(ApiException) as gone:
        widgets.get("w1")
    assert gone.value.status == 404
    events = raw_watch(kube_url, f"/apis/{WIDGETS}", resourceVersion=rv, timeoutSeconds="1")
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "DELETED"]
    assert events[-1]["object"]["metadata"]["finalizers"] == []


def test_delete_preconditions_conflict_on_a_different_uid(core: client.CoreV1Api) -> None:
    core.create_node({"metadata": {"name": "n1"}})
    options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="not-it"))

    with pytest.raises(ApiException) as exc:
        core.delete_node("n1", body=options)

    assert exc.value.status == 409
    assert core.read_node("n1").metadata.name == "n1"


def test_strategic_merge_patch_merges_node_conditions_by_type(core: client.CoreV1Api) -> None:
    conditions = [
        {"type": "Ready", "status": "True"},
        {"type": "MemoryPressure", "status": "False"},
    ]
    core.create_node({"metadata": {"name": "n1"}, "status": {"conditions": conditions}})

    core.patch_node_status(
        "n1", {"status": {"conditions": [{"type": "MemoryPressure", "status": "True"}]}}
    )

    merged = {c.type: c.status for c in core.read_node("n1").status.conditions}
    assert merged == {"Ready": "True", "MemoryPressure": "True"}


def test_strategic_merge_patch_on_a_custom_resource_answers_415(
    widgets: Widgets, http: Callable[..., Any]
) -> None:
    widgets.create("w1")
    response = http(
        "PATCH",
        f"/apis/{WIDGETS}/w1",
        {"spec": {"size": 2}},
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert response.status == 415


def test_validation_answers_422_naming_the_field(widgets: Widgets) -> None:
    with pytest.raises(ApiException) as exc:
        widgets.create("w1", size=-1)

    assert exc.value.status == 422
    body = api_error(exc)
    assert body["reason"] == "Invalid"
    assert body["details"]["kind"] == "Widget" and body["details"]["group"] == GROUP
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": "Invalid value: -1: must be greater than or equal to 0",
            "field": "spec.size",
        }
    ]
    widgets.create("w2", size=1)
    with pytest.raises(ApiException) as status_exc:  # status writes are validated too
        widgets.patch_status("w2", {"status": {"phase": "Exploded"}})
    assert api_error(status_exc)["details"]["causes"][0]["field"] == "status.phase"


def test_unknown_fields_are_pruned_and_defaults_applied_unless_strict(
    widgets: Widgets, http: Callable[..., Any]
) -> None:
    created = widgets.create("w1", colour="typo")
    assert created["spec"] == {"size": 1}  # "colour" pruned, "size" defaulted

    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "w2"}}
    body["spec"] = {"colour": "typo"}
    strict = http("POST", f"/apis/{WIDGETS}?fieldValidation=Strict", body)
    assert strict.status == 400
    assert 'unknown field "spec.colour"' in json.loads(strict.data)["message"]


# ------------------------------------------------------------------------- list


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", ["a", "b", "c"]),
        ("tier=gold", ["a"]),
        ("tier==gold", ["a"]),
        ("tier!=gold", ["b", "c"]),  # also matches objects without the label
        ("tier in (gold,silver)", ["a", "b"]),
        ("tier notin (gold)", ["b", "c"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c"]),
        ("tier,zone=eu", ["a"]),
    ],
)
def test_list_filters_by_label_selector(
    core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    core.create_node({"metadata": {"name": "a", "labels": {"tier": "gold", "zone": "eu"}}})
    core.create_node({"metadata": {"name": "b", "labels": {"tier": "silver"}}})
    core.create_node({"metadata": {"name": "c"}})

    listed = core.list_node(label_selector=selector)

    assert [n.metadata.name for n in listed.items] == expected


def test_list_filters_pods_by_node_name_field_selector(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod("p1", node="n1"))
    core.create_namespaced_pod("default", pod("p2", node="n2"))
    core.create_namespaced_pod("kube-system", pod("p3", node="n1"))

    on_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    not_p1 = core.list_namespaced_pod("default", field_selector="metadata.name!=p1")

    assert [(p.metadata.namespace, p.metadata.name) for p in on_n1.items] == [
        ("default", "p1"),
        ("kube-system", "p3"),
    ]
    assert [p.metadata.name for p in not_p1.items] == ["p2"]


def test_unsupported_field_or_bad_label_selector_answers_400(
    core: client.CoreV1Api, widgets: Widgets
) -> None:
    widgets.create("w1", color="red")
    assert [w["metadata"]["name"] for w in widgets.list(field_selector="spec.color=red")["items"]]

    for call in (
        lambda: core.list_node(field_selector="spec.podCIDR=x"),
        lambda: widgets.list(field_selector="spec.size=1"),  # not a selectableField
        lambda: core.list_node(label_selector="tier in (gold"),
    ):
        with pytest.raises(ApiException) as exc:
            call()
        assert exc.value.status == 400


def test_list_pages_with_limit_and_continue(core: client.CoreV1Api) -> None:
    for index in range(7):
        core.create_node({"metadata": {"name": f"n{index}"}})

    names: list[str] = []
    token = None
    pages = 0
    while True:
        page = core.list_node(limit=3, _continue=token)
        names += [n.metadata.name for n in page.items]
        pages += 1
        token = page.metadata._continue
        if not token:
            break

    assert pages == 3
    assert names == [f"n{index}" for index in range(7)]


def test_deletecollection_deletes_only_the_selected(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod("p1", app="x"))
    core.create_namespaced_pod("default", pod("p2", app="y"))

    core.delete_collection_namespaced_pod("default", label_selector="app=x")

    assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["p2"]


# ------------------------------------------------------------------------- watch


def test_watch_without_resource_version_starts_with_added_for_existing_objects(
    core: client.CoreV1Api,
) -> None:
    core.create_node({"metadata": {"name": "n1"}})
    core.create_node({"metadata": {"name": "n2"}})

    events = list(watch.Watch().stream(core.list_node, timeout_seconds=1))

    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "n1"),
        ("ADDED", "n2"),
    ]


def test_watch_resumes_after_the_given_resource_version(
    kube: KubeEmulator, core: client.CoreV1Api
) -> None:
    core.create_node({"metadata": {"name": "n1"}})
    rv = core.list_node().metadata.resource_version
    core.create_node({"metadata": {"name": "n2"}})
    kube.delete_object("v1/nodes", "n1")  # in-process writes emit events too

    events = list(watch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=1))

    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "n2"),
        ("DELETED", "n1"),
    ]


def test_watch_from_a_compacted_resource_version_gets_410_expired(
    kube: KubeEmulator, core: client.CoreV1Api, kube_url: str
) -> None:
    core.create_node({"metadata": {"name": "n1"}})
    rv = core.list_node().metadata.resource_version
    core.create_node({"metadata": {"name": "n2"}})
    kube.compact()

    events = raw_watch(kube_url, "/api/v1/nodes", resourceVersion=rv)
    with pytest.raises(ApiException) as exc:
        list(watch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=1))

    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {rv} ({kube.resource_version + 1})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    assert exc.value.status == 410


@pytest.mark.kube_emulator(history_limit=5)
def test_watch_history_is_bounded_and_older_resumes_expire(
    kube: KubeEmulator, core: client.CoreV1Api, kube_url: str
) -> None:
    core.create_node({"metadata": {"name": "first"}})
    first_rv = core.read_node("first").metadata.resource_version
    for index in range(12):
        core.create_node({"metadata": {"name": f"n{index}"}})
    recent_rv = str(kube.resource_version - 3)

    expired = raw_watch(kube_url, "/api/v1/nodes", resourceVersion=first_rv)
    recent = raw_watch(kube_url, "/api/v1/nodes", resourceVersion=recent_rv, timeoutSeconds="1")

    assert len(kube.event_history("v1/nodes")) <= 5 + 1
    assert [e["object"]["code"] for e in expired] == [410]
    assert [e["object"]["metadata"]["name"] for e in recent] == ["n9", "n10", "n11"]


@pytest.mark.kube_emulator(bookmark_interval=0.2)
def test_watch_sends_bookmarks_with_the_current_resource_version(
    kube: KubeEmulator, core: client.CoreV1Api, kube_url: str
) -> None:
    core.create_node({"metadata": {"name": "n1"}})
    kube.create_object("v1/pods", pod("p1"), "default")  # moves the global version on
    rv = core.read_node("n1").metadata.resource_version

    events = raw_watch(
        kube_url,
        "/api/v1/nodes",
        resourceVersion=rv,
        allowWatchBookmarks="true",
        until=lambda events: len(events) >= 2,
    )

    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    assert events[0]["object"] == {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(kube.resource_version)},
    }


def test_watch_ends_after_timeout_seconds(core: client.CoreV1Api) -> None:
    started = time.monotonic()
    events = list(watch.Watch().stream(core.list_node, timeout_seconds=1))
    elapsed = time.monotonic() - started

    assert events == []
    assert 0.9 <= elapsed < 5


def test_watch_with_send_initial_events_ends_them_with_a_bookmark(
    core: client.CoreV1Api, kube_url: str
) -> None:
    core.create_node({"metadata": {"name": "n1"}})

    events = raw_watch(
        kube_url,
        "/api/v1/nodes",
        sendInitialEvents="true",
        resourceVersionMatch="NotOlderThan",
        allowWatchBookmarks="true",
        until=lambda events: events[-1]["type"] == "BOOKMARK",
    )

    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    annotations = events[-1]["object"]["metadata"]["annotations"]
    assert annotations == {"k8s.io/initial-events-end": "true"}


def test_watch_with_a_label_selector_sees_objects_enter_and_leave_it(
    kube: KubeEmulator, core: client.CoreV1Api, kube_url: str
) -> None:
    core.create_node({"metadata": {"name": "n1"}})
    rv = core.list_node().metadata.resource_version
    core.patch_node("n1", {"metadata": {"labels": {"pool": "a"}}})  # enters
    core.patch_node("n1", {"metadata": {"labels": {"pool": "a", "x": "y"}}})  # stays
    core.patch_node("n1", {"metadata": {"labels": {"pool": "b"}}})  # leaves
    core.create_node({"metadata": {"name": "n2", "labels": {"pool": "b"}}})  # never in

    events = raw_watch(
        kube_url, "/api/v1/nodes", resourceVersion=rv, labelSelector="pool=a", timeoutSeconds="1"
    )

    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    left = events[-1]["object"]["metadata"]
    assert left["labels"] == {"pool": "a", "x": "y"}  # the last content it was seen with
    assert (
        int(left["resourceVersion"]) == int(events[1]["object"]["metadata"]["resourceVersion"]) + 1
    )


def test_watch_of_pods_on_one_node_by_field_selector(core: client.CoreV1Api, kube_url: str) -> None:
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    core.create_namespaced_pod("default", pod("mine", node="n1"))
    core.create_namespaced_pod("default", pod("other", node="n2"))

    events = raw_watch(
        kube_url,
        "/api/v1/pods",
        resourceVersion=rv,
        fieldSelector="spec.nodeName=n1",
        timeoutSeconds="1",
    )

    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "mine")]


def test_watch_sees_writes_made_while_it_is_open(
    kube: KubeEmulator, core: client.CoreV1Api
) -> None:
    seen: list[str] = []
    stream = watch.Watch()

    def consume() -> None:
        for event in stream.stream(core.list_node, timeout_seconds=5):
            seen.append(f"{event['type']} {event['object'].metadata.name}")
            if len(seen) == 3:
                stream.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    kube.wait_for_watches("v1/nodes")
    core.create_node({"metadata": {"name": "n1"}})
    core.patch_node("n1", {"metadata": {"labels": {"a": "b"}}})
    core.delete_node("n1")
    thread.join(10)

    assert seen == ["ADDED n1", "MODIFIED n1", "DELETED n1"]


# ------------------------------------------------------------------------- CRDs, discovery


def test_crd_created_through_the_api_is_served_discovered_and_removed(
    api_client: ApiClient, http: Callable[..., Any]
) -> None:
    crd = json.loads(json.dumps(WIDGET_CRD))
    client.ApiextensionsV1Api(api_client).create_custom_resource_definition(crd)

    group = json.loads(http("GET", f"/apis/{GROUP}").data)
    resources = json.loads(http("GET", f"/apis/{GROUP}/{VERSION}").data)["resources"]
    created = Widgets(api_client).create("w1")
    client.ApiextensionsV1Api(api_client).delete_custom_resource_definition(f"{PLURAL}.{GROUP}")

    assert group["preferredVersion"]["groupVersion"] == f"{GROUP}/{VERSION}"
    assert {(r["name"], r["kind"], r["namespaced"]) for r in resources} == {
        ("widgets", "Widget", False),
        ("widgets/status", "Widget", False),
    }
    assert created["spec"] == {"size": 1}
    assert http("GET", f"/apis/{WIDGETS}").status == 404


def test_injected_reactions_override_the_emulation(kube: KubeEmulator, widgets: Widgets) -> None:
    widgets.create("w1")
    kube["patch", kmock.resource(GROUP, VERSION, PLURAL)] << 503

    with pytest.raises(ApiException) as exc:
        widgets.patch("w1", {"spec": {"size": 7}})

    assert exc.value.status == 503
    assert widgets.get("w1")["spec"]["size"] == 1


@pytest.mark.kube_emulator(garbage_collection=True)
def test_garbage_collection_deletes_dependents_of_a_deleted_owner(
    kube: KubeEmulator, core: client.CoreV1Api, widgets: Widgets
) -> None:
    node = core.create_node({"metadata": {"name": "n1"}})
    owner = {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": node.metadata.uid}
    widgets.api.create_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        {"metadata": {"name": "n1", "ownerReferences": [owner]}, "spec": {}},
    )
    widgets.create("unowned")

    core.delete_node("n1")

    assert [w["metadata"]["name"] for w in kube.list_objects(WIDGETS)] == ["unowned"]


# ------------------------------------------------------------------------- counting, speed


def test_request_counting_since_a_mark(
    kube: KubeEmulator, core: client.CoreV1Api, widgets: Widgets
) -> None:
    widgets.create("w1")
    mark = kube.mark()

    widgets.get("w1")
    widgets.list()
    widgets.patch_status("w1", {"status": {"phase": "Ready"}})
    core.list_node()

    assert kube.count(since=mark) == 4
    assert kube.count(since=mark, resource=PLURAL) == 3
    assert kube.count(since=mark, verb="patch", subresource="status", name="w1") == 1
    assert kube.count(since=mark, verb="patch", subresource=None) == 0
    assert [(r.verb, r.plural) for r in kube.writes(since=mark)] == [("patch", PLURAL)]
    assert kube.count(verb="create", resource=WIDGETS, status=201) == 1


def test_throughput_stays_flat_for_2000_creates(kube: KubeEmulator, widgets: Widgets) -> None:
    rates: list[float] = []
    started = last = time.perf_counter()
    for index in range(2000):
        widgets.create(f"w{index:05d}")
        if (index + 1) % 500 == 0:
            now = time.perf_counter()
            rates.append(500 / (now - last))
            last = now
    total = time.perf_counter() - started

    print(f"2000 creates in {total:.2f}s; per 500: {', '.join(f'{r:.0f}/s' for r in rates)}")
    assert total < 20
    assert min(rates[1:]) > rates[0] / 3  # flat: vanilla kmock 0.8 falls quadratically
    assert len(widgets.list()["items"]) == 2000


# ------------------------------------------------------------------------- kopf


def test_kopf_handlers_run_and_their_patches_succeed(
    kube: KubeEmulator, widgets: Widgets, run_kopf: Callable[..., KopfThread]
) -> None:
    registry = kopf.OperatorRegistry()
    events: list[tuple[str, str]] = []
    created: list[str] = []
    deleted: list[str] = []

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def on_event(event: dict[str, Any], name: str, **_: Any) -> None:
        events.append((event["type"], name))

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def on_create(name: str, **_: Any) -> None:
        created.append(name)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)  # makes kopf add its finalizer
    def on_delete(name: str, **_: Any) -> None:
        deleted.append(name)

    run_kopf(registry)
    kube.wait_for_watches(WIDGETS)
    mark = kube.mark()
    widgets.create("w1")
    wait_until(lambda: created == ["w1"], message="on.create")
    wait_until(
        lambda: (
            "kopf.zalando.org/last-handled-configuration"
            in (kube.get_object(WIDGETS, "w1") or {}).get("metadata", {}).get("annotations", {})
        ),
        message="kopf's annotation",
    )
    assert kube.get_object(WIDGETS, "w1")["metadata"]["finalizers"] == [  # type: ignore[index]
        "kopf.zalando.org/KopfFinalizerMarker"
    ]
    widgets.delete("w1")
    wait_until(lambda: kube.get_object(WIDGETS, "w1") is None, message="the finalizer released")
    # kopf sees the DELETED event, and the emulator records each response's status,
    # a moment after the object is gone from the store.
    wait_until(lambda: events[-1] == ("DELETED", "w1"), message="the DELETED event")

    assert deleted == ["w1"]
    assert events[0] == ("ADDED", "w1")
    kopf_patches = kube.requests(since=mark, verb="patch")
    wait_until(
        lambda: all(r.status is not None for r in kopf_patches), message="the patches' answers"
    )
    assert kopf_patches and all(r.status == 200 for r in kopf_patches)
    assert {r.content_type for r in kopf_patches} >= {"application/json-patch+json"}


def test_kopf_reconnects_resume_without_replaying_events(
    kube: KubeEmulator, widgets: Widgets, run_kopf: Callable[..., KopfThread]
) -> None:
    registry = kopf.OperatorRegistry()
    seen: list[tuple[str | None, str]] = []

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def on_event(event: dict[str, Any], name: str, **_: Any) -> None:
        seen.append((event["type"], name))

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 0.5  # the emulator ends each watch after 0.5 s
    widgets.create("before")
    run_kopf(registry, settings=settings)
    kube.wait_for_watches(WIDGETS)
    widgets.create("after")
    wait_until(lambda: kube.count(resource=WIDGETS, verb="watch") >= 4, message="kopf's reconnects")

    assert seen == [(None, "before"), ("ADDED", "after")]  # the listing, then the watch
    assert kube.count(resource=WIDGETS, verb="list") == 1
    resumed = kube.requests(resource=WIDGETS, verb="watch")[1:]
    assert all(r.query.get("resourceVersion") for r in resumed)


# ------------------------------------------------------------------------- nodemem's CRDs

NODEMEM_CRDS = load_crds()
needs_crds = pytest.mark.skipif(not NODEMEM_CRDS, reason="no CRD files in crds/ yet")


@needs_crds
def test_nodemem_resources_are_discoverable(http: Callable[..., Any]) -> None:
    resources = json.loads(http("GET", "/apis/nodemem.dev/v1alpha1").data)["resources"]
    groups = json.loads(http("GET", "/apis").data)["groups"]

    assert "nodemem.dev" in {group["name"] for group in groups}
    assert {r["name"] for r in resources} == {
        "nodememorypolicies",
        "nodememorypolicies/status",
        "nodememoryreports",
        "nodememoryreports/status",
    }
    assert all(r["namespaced"] is False for r in resources)


@needs_crds
def test_nodemem_policy_validation_answers_422_naming_the_field(
    kube: KubeEmulator, api_client: ApiClient
) -> None:
    if not (Path(__file__).with_name("crd_schema.py")).exists():
        pytest.skip("tests/kube/crd_schema.py is not there yet")
    policy = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "bad"},
        "spec": {"oom": [{"name": "db", "match": {"comm": "postgres"}, "oomScoreAdj": 5000}]},
    }
    api = client.CustomObjectsApi(api_client)

    with pytest.raises(ApiException) as exc:
        api.create_cluster_custom_object("nodemem.dev", "v1alpha1", "nodememorypolicies", policy)

    assert exc.value.status == 422
    assert [c["field"] for c in api_error(exc)["details"]["causes"]] == ["spec.oom[0].oomScoreAdj"]
    assert kube.list_objects("nodememorypolicies") == []


# ------------------------------------------------------------------------- building blocks


@pytest.mark.asyncio
async def test_emulator_serves_in_the_tests_own_loop_with_the_client_in_a_thread() -> None:
    emulator = make_emulator(crds=[])
    async with serve(emulator) as url:
        api = api_client_for(url)
        try:  # a blocking client call in this loop would deadlock the emulator: use a thread
            node = await asyncio.to_thread(
                client.CoreV1Api(api).create_node, {"metadata": {"name": "n1"}}
            )
        finally:
            api.close()

    assert node.metadata.generation == 1
    assert emulator.get_object("v1/nodes", "n1") is not None


def test_kubeconfig_points_the_official_client_at_the_emulator(kubeconfig: Path) -> None:
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        namespaces = client.CoreV1Api(api).list_namespace()
    finally:
        api.close()

    assert "default" in [ns.metadata.name for ns in namespaces.items]


def test_in_process_api_raises_api_errors_like_the_server(kube: KubeEmulator) -> None:
    kube.create_object("v1/nodes", {"metadata": {"name": "n1"}})

    with pytest.raises(ApiError) as exc:
        kube.create_object("v1/nodes", {"metadata": {"name": "n1"}})

    assert exc.value.code == 409 and exc.value.reason == "AlreadyExists"


def test_emulator_runs_outside_the_fixture_and_stops_promptly() -> None:
    emulator = make_emulator(crds=[])
    with EmulatorThread(emulator) as server:
        pool = urllib3.PoolManager()
        response = pool.request("GET", server.url + "/api/v1/namespaces")
        names = [n["metadata"]["name"] for n in json.loads(response.data)["items"]]
        started = time.monotonic()
        threading.Thread(
            target=lambda: raw_watch(server.url, "/api/v1/nodes", read_timeout=30), daemon=True
        ).start()
        emulator.wait_for_watches("v1/nodes")
    assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]
    assert time.monotonic() - started < 5  # an open watch does not hold the shutdown


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("/api/v1/namespaces", ("", "v1", "namespaces", None, None, None)),
        ("/api/v1/namespaces/ns1", ("", "v1", "namespaces", None, "ns1", None)),
        ("/api/v1/namespaces/ns1/status", ("", "v1", "namespaces", None, "ns1", "status")),
        ("/api/v1/namespaces/ns1/pods", ("", "v1", "pods", "ns1", None, None)),
        ("/api/v1/namespaces/ns1/pods/p/status", ("", "v1", "pods", "ns1", "p", "status")),
        (
            "/apis/nodemem.dev/v1alpha1/nodememoryreports/n1",
            ("nodemem.dev", "v1alpha1", "nodememoryreports", None, "n1", None),
        ),
        ("/version", (None, None, None, None, None, None)),
    ],
)
def test_api_paths_parse_as_the_server_routes_them(
    path: str, parsed: tuple[str | None, ...]
) -> None:
    result = parse_api_path(path)
    assert (
        result.group,
        result.version,
        result.plural,
        result.namespace,
        result.name,
        result.subresource,
    ) == parsed


def test_label_selector_semantics() -> None:
    labels = {"env": "prod", "size": "10"}

    assert LabelSelector.parse("env=prod,size>5").matches(labels)
    assert not LabelSelector.parse("size<5").matches(labels)
    assert LabelSelector.parse("team notin (a,b)").matches(labels)  # absent key matches
    assert not LabelSelector.parse("team in (a,b)").matches(labels)
    assert LabelSelector.parse("env in (prod, dev)").matches(labels)
    for bad in ("env=", "=x", "env in ()", "env in (a", "env notin a", "a b", "env,"):
        if bad == "env=":
            assert LabelSelector.parse(bad).matches({"env": ""})
            continue
        with pytest.raises(SelectorError):
            LabelSelector.parse(bad)


def test_field_selector_semantics() -> None:
    obj = {"metadata": {"name": "a,b"}, "spec": {"nodeName": "n1", "hostNetwork": True}}

    assert FieldSelector.parse(r"metadata.name=a\,b").matches(obj)
    assert FieldSelector.parse("spec.hostNetwork=true,spec.nodeName!=n2").matches(obj)
    assert FieldSelector.parse("spec.missing=").matches(obj)
    assert not FieldSelector.parse("spec.nodeName==n2").matches(obj)
    with pytest.raises(SelectorError):
        FieldSelector.parse("spec.nodeName")


def test_json_patch_operations() -> None:
    doc = {"a": {"b": [1, 2]}, "flag": True}
    ops = [
        {"op": "add", "path": "/a/b/-", "value": 3},
        {"op": "copy", "from": "/a/b", "path": "/c"},
        {"op": "move", "from": "/c", "path": "/d"},
        {"op": "replace", "path": "/a/b/0", "value": 0},
        {"op": "remove", "path": "/a/b/1"},
        {"op": "test", "path": "/flag", "value": True},
    ]

    assert apply_json_patch(doc, ops) == {"a": {"b": [0, 3]}, "flag": True, "d": [1, 2, 3]}
    assert doc == {"a": {"b": [1, 2]}, "flag": True}  # the input is untouched
    with pytest.raises(PatchError):  # JSON true is not 1
        apply_json_patch(doc, [{"op": "test", "path": "/flag", "value": 1}])
    with pytest.raises(PatchError):
        apply_json_patch(doc, [{"op": "remove", "path": "/missing"}])


def test_strategic_merge_patch_directives() -> None:
    pod_spec = {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}
    patch = {"containers": [{"name": "b", "$patch": "delete"}, {"name": "c", "image": "2"}]}
    meta = {"finalizers": ["x", "y"]}

    assert apply_strategic_merge_patch(pod_spec, patch) == {
        "containers": [{"name": "a", "image": "1"}, {"name": "c", "image": "2"}]
    }
    assert apply_strategic_merge_patch(meta, {"finalizers": ["z"]}) == {
        "finalizers": ["x", "y", "z"]
    }
    assert apply_strategic_merge_patch(meta, {"$deleteFromPrimitiveList/finalizers": ["x"]}) == {
        "finalizers": ["y"]
    }

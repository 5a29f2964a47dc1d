"""The chart's RBAC and ValidatingAdmissionPolicy, enforced by the real kube-apiserver.

The session applied the chart's ServiceAccounts, ClusterRoles/Bindings and the
``nodemem-agent-own-report`` policy and binding (rendered by Helm, release ``nodemem`` in
``nodemem-system``; see conftest.py). Every request here carries a real credential,
mostly a ServiceAccount token issued by the server's TokenRequest API: the agent's is
bound to a Pod on a node, so the server puts the node claim
(``authentication.kubernetes.io/node-name``) in the user's extra, which is what the
policy reads (a few tests use a token Secret or a client certificate of the cluster's
CA). Refusals are asserted by status code and by the server's own message (RBAC's, the
policy's or the request handler's).
"""

from __future__ import annotations

import base64
import ssl
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from restclient import ApiError, Kube, resource_path, wait_until

from conftest import (
    AGENT_SA,
    AGENT_USER,
    CONTROLLER_USER,
    NAMESPACE,
    POLICIES,
    REPORTS,
    ensure_node,
)

NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
POLICY_NAME = "nodemem-agent-own-report"  # the chart's agent name + "-own-report"
REVIEWS = "authentication.k8s.io/v1/selfsubjectreviews"


def as_token(control_plane: Any, token: str) -> Kube:
    """A client that authenticates with ``token`` only (no client certificate)."""
    context = ssl.create_default_context(cafile=str(control_plane.pki / "ca.crt"))
    return Kube(control_plane.url, context, token=token)


def refused(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def rbac_message(
    user: str, verb: str, resource: str, name: str | None = None, *, group: str = "nodemem.dev"
) -> str:
    """The RBAC authorizer's message, as kube-apiserver words it for a cluster-scoped resource."""
    plural = resource.partition("/")[0]  # a subresource is named in "resource" only
    subject = f'{plural}.{group} "{name}"' if name else f"{plural}.{group}"
    return (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
        f'in API group "{group}" at the cluster scope'
    )


def policy_denial(name: str, message: str) -> str:
    """The admission plugin's message for a denial by the chart's policy."""
    return (
        f'nodememoryreports.nodemem.dev "{name}" is forbidden: ValidatingAdmissionPolicy '
        f"'{POLICY_NAME}' with binding '{POLICY_NAME}' denied request: {message}"
    )


def wrong_node(token_node: str, report: str) -> str:
    return (
        f"the nodemem agent of node {token_node} may only write the NodeMemoryReport named "
        f"{token_node}, not {report}"
    )


RENAME_MESSAGE = "the name of the object (node-b) does not match the name on the URL (node-a)"

NO_NODE_CLAIM = (
    f"the nodemem agent token carries no node name ({NODE_NAME_KEY}): it must be a pod-bound "
    "token on a cluster with ServiceAccountTokenPodNodeInfo"
)


def report(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": name},
    }


def policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"pool": "web"}},
            "tmpfs": [{"path": "/dev/shm", "size": "1Gi"}],
        },
    }


HEARTBEAT = {"status": {"lastUpdateTime": "2025-01-01T00:00:00Z"}}


# --- the agent ------------------------------------------------------------------------


def test_agent_token_carries_its_node_claim(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    token = agent_token("node-a")
    review = as_token(control_plane, token).create_object(REVIEWS, {"spec": {}})
    user = review["status"]["userInfo"]
    assert user["username"] == AGENT_USER
    assert user["extra"][NODE_NAME_KEY] == ["node-a"]
    node = kube.get_object("v1/nodes", "node-a")
    assert user["extra"]["authentication.kubernetes.io/node-uid"] == [node["metadata"]["uid"]]
    pods = [
        p
        for p in kube.list_objects("v1/pods", namespace=NAMESPACE)
        if p["spec"]["nodeName"] == "node-a"
    ]
    assert [p["metadata"]["name"] for p in pods] == user["extra"][
        "authentication.kubernetes.io/pod-name"
    ]

    # The same answer from the server's TokenReview, asked by the admin.
    answer = kube.create_object("authentication.k8s.io/v1/tokenreviews", {"spec": {"token": token}})
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["user"]["username"] == AGENT_USER
    assert answer["status"]["user"]["extra"][NODE_NAME_KEY] == ["node-a"]


def test_agent_writes_its_own_report_and_status(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))

    created = agent.create_object(REPORTS, report("node-a"))
    assert created["metadata"]["name"] == "node-a"
    patched = agent.patch_object(REPORTS, "node-a", {"metadata": {"labels": {"pool": "web"}}})
    assert patched["metadata"]["labels"] == {"pool": "web"}
    status = agent.patch_object(REPORTS, "node-a", HEARTBEAT, subresource="status")
    assert status["status"]["lastUpdateTime"] == "2025-01-01T00:00:00Z"
    assert agent.get_object(REPORTS, "node-a")["status"]["lastUpdateTime"] == "2025-01-01T00:00:00Z"

    # RBAC gives the agent no delete, not even of its own report.
    error = refused(lambda: agent.delete_object(REPORTS, "node-a"))
    assert error.status == 403
    assert error.message == rbac_message(AGENT_USER, "delete", "nodememoryreports", "node-a")


def test_agent_cannot_write_another_nodes_report(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))

    error = refused(lambda: agent.create_object(REPORTS, report("node-b")))
    assert error.status == 403
    assert error.reason == "Forbidden"
    assert error.message == policy_denial("node-b", wrong_node("node-a", "node-b"))
    assert kube.get_object(REPORTS, "node-b") is None

    kube.create_object(REPORTS, report("node-b"))  # the admin is not matched by the policy
    for subresource, patch in (
        (None, {"metadata": {"labels": {"pool": "web"}}}),
        ("status", HEARTBEAT),
    ):
        error = refused(
            lambda p=patch, s=subresource: agent.patch_object(REPORTS, "node-b", p, subresource=s)
        )
        assert error.status == 403, subresource
        assert error.message == policy_denial("node-b", wrong_node("node-a", "node-b")), subresource
    unchanged = kube.get_object(REPORTS, "node-b")
    assert "labels" not in unchanged["metadata"]
    assert "status" not in unchanged


def test_agent_token_of_another_node_writes_only_that_nodes_report(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    agent_b = as_token(control_plane, agent_token("node-b"))
    agent_b.create_object(REPORTS, report("node-b"))
    error = refused(lambda: agent_b.create_object(REPORTS, report("node-a")))
    assert error.status == 403
    assert error.message == policy_denial("node-a", wrong_node("node-b", "node-a"))


def test_agent_cannot_write_policies(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))
    kube.create_object(POLICIES, policy("shm"))

    error = refused(lambda: agent.create_object(POLICIES, policy("mine")))
    assert (error.status, error.message) == (
        403,
        rbac_message(AGENT_USER, "create", "nodememorypolicies"),
    )
    error = refused(lambda: agent.patch_object(POLICIES, "shm", {"spec": {"priority": 9}}))
    assert (error.status, error.message) == (
        403,
        rbac_message(AGENT_USER, "patch", "nodememorypolicies", "shm"),
    )
    error = refused(
        lambda: agent.patch_object(
            POLICIES, "shm", {"status": {"observedGeneration": 1}}, subresource="status"
        )
    )
    assert (error.status, error.message) == (
        403,
        rbac_message(AGENT_USER, "patch", "nodememorypolicies/status", "shm"),
    )
    error = refused(lambda: agent.delete_object(POLICIES, "shm"))
    assert (error.status, error.message) == (
        403,
        rbac_message(AGENT_USER, "delete", "nodememorypolicies", "shm"),
    )

    # What RBAC does give: reading them.
    assert [p["metadata"]["name"] for p in agent.list_objects(POLICIES)] == ["shm"]
    assert kube.get_object(POLICIES, "shm")["spec"]["priority"] == 0


def test_agent_token_without_node_claim_is_refused(control_plane: Any, kube: Kube) -> None:
    token = kube.service_account_token(NAMESPACE, AGENT_SA)  # not bound to a pod
    agent = as_token(control_plane, token)
    user = agent.create_object(REVIEWS, {"spec": {}})["status"]["userInfo"]
    assert user["username"] == AGENT_USER
    assert NODE_NAME_KEY not in user.get("extra", {})

    error = refused(lambda: agent.create_object(REPORTS, report("node-a")))
    assert (error.status, error.message) == (403, policy_denial("node-a", NO_NODE_CLAIM))
    kube.create_object(REPORTS, report("node-a"))
    error = refused(lambda: agent.patch_object(REPORTS, "node-a", HEARTBEAT, subresource="status"))
    assert (error.status, error.message) == (403, policy_denial("node-a", NO_NODE_CLAIM))
    assert "status" not in kube.get_object(REPORTS, "node-a")


def test_deleted_pod_revokes_the_agent_token(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    token = agent_token("node-a")
    agent = as_token(control_plane, token)
    agent.create_object(REPORTS, report("node-a"))
    (pod,) = [
        p
        for p in kube.list_objects("v1/pods", namespace=NAMESPACE)
        if p["spec"]["nodeName"] == "node-a"
    ]
    kube.request(
        "DELETE",
        f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}",
        {"gracePeriodSeconds": 0},
    )
    assert kube.get_object("v1/pods", pod["metadata"]["name"], namespace=NAMESPACE) is None

    def rejected() -> bool:
        # kube-apiserver caches a token's successful authentication (10 s by default),
        # so it notices the bound pod is gone only then: poll.
        try:
            agent.patch_object(REPORTS, "node-a", HEARTBEAT, subresource="status")
        except ApiError as error:
            assert error.status == 401, error
            return True
        return False

    wait_until(
        rejected, timeout=30, interval=0.2, message="the token of a deleted pod to be rejected"
    )


# --- the controller -------------------------------------------------------------------


def test_controller_patches_policy_status_not_spec(
    control_plane: Any, kube: Kube, controller_token: str
) -> None:
    controller = as_token(control_plane, controller_token)
    kube.create_object(POLICIES, policy("shm"))

    patched = controller.patch_object(
        POLICIES, "shm", {"status": {"observedGeneration": 1}}, subresource="status"
    )
    assert patched["status"]["observedGeneration"] == 1

    error = refused(lambda: controller.patch_object(POLICIES, "shm", {"spec": {"priority": 9}}))
    assert (error.status, error.message) == (
        403,
        rbac_message(CONTROLLER_USER, "patch", "nodememorypolicies", "shm"),
    )
    error = refused(lambda: controller.create_object(POLICIES, policy("mine")))
    assert (error.status, error.message) == (
        403,
        rbac_message(CONTROLLER_USER, "create", "nodememorypolicies"),
    )
    error = refused(lambda: controller.delete_object(POLICIES, "shm"))
    assert (error.status, error.message) == (
        403,
        rbac_message(CONTROLLER_USER, "delete", "nodememorypolicies", "shm"),
    )
    current = kube.get_object(POLICIES, "shm")
    assert current["spec"]["priority"] == 0
    assert current["status"]["observedGeneration"] == 1


def test_controller_deletes_reports_but_does_not_write_them(
    control_plane: Any, kube: Kube, controller_token: str
) -> None:
    controller = as_token(control_plane, controller_token)
    user = controller.create_object(REVIEWS, {"spec": {}})["status"]["userInfo"]
    assert user["username"] == CONTROLLER_USER
    assert NODE_NAME_KEY not in user.get("extra", {})

    error = refused(lambda: controller.create_object(REPORTS, report("node-a")))
    assert (error.status, error.message) == (
        403,
        rbac_message(CONTROLLER_USER, "create", "nodememoryreports"),
    )
    kube.create_object(REPORTS, report("gone"))
    error = refused(
        lambda: controller.patch_object(REPORTS, "gone", HEARTBEAT, subresource="status")
    )
    assert (error.status, error.message) == (
        403,
        rbac_message(CONTROLLER_USER, "patch", "nodememoryreports/status", "gone"),
    )
    # The policy matches the agent only: the controller's delete of an orphan report passes.
    controller.delete_object(REPORTS, "gone")
    assert kube.get_object(REPORTS, "gone") is None


# --- the policy beyond the chart's RBAC -----------------------------------------------
#
# The policy is the second lock: it must hold even where RBAC would let a write through
# (a wider role bound by an admin, a future chart). `grant` binds extra rules to a user for
# one test, so that requests the chart's RBAC refuses first reach the policy.
#
# Not tested here, because no real credential can carry it: a node claim with two node
# names, or an empty one. kube-apiserver puts exactly one node name in the extra of a
# token bound to a Pod on a node, and none otherwise (both tested in this file); the policy's
# `size(...) == 1` only keeps a malformed claim from being read as a node.

SAR = "authorization.k8s.io/v1/subjectaccessreviews"


def allowed(kube: Kube, user: str, verb: str, resource: str, group: str = "nodemem.dev") -> bool:
    """The server's authorizers (Node, RBAC) asked for ``user``, as a request would be."""
    groups = ["system:authenticated"]
    if user.startswith("system:serviceaccount:"):
        groups += ["system:serviceaccounts", f"system:serviceaccounts:{user.split(':')[2]}"]
    plural, _, subresource = resource.partition("/")
    attributes = {"group": group, "resource": plural, "subresource": subresource, "verb": verb}
    review = {"spec": {"user": user, "groups": groups, "resourceAttributes": attributes}}
    return bool(kube.create_object(SAR, review)["status"].get("allowed"))


@pytest.fixture
def grant(kube: Kube) -> Iterator[Callable[[str, dict[str, list[str]]], None]]:
    """``grant(user, {resource: [verbs]})`` in nodemem.dev, until the test ends."""
    granted: list[tuple[str, str, list[tuple[str, str]]]] = []

    def give(user: str, rules: dict[str, list[str]]) -> None:
        name = f"nodemem-test-grant-{len(granted)}"
        checks = [(verb, resource) for resource, verbs in rules.items() for verb in verbs]
        already = [c for c in checks if allowed(kube, user, *c)]
        if user.startswith("system:serviceaccount:"):
            _, _, namespace, account = user.split(":")
            subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        else:
            subject = {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}
        kube.create_object(
            "rbac.authorization.k8s.io/v1/clusterroles",
            {
                "metadata": {"name": name},
                "rules": [
                    {"apiGroups": ["nodemem.dev"], "resources": [resource], "verbs": verbs}
                    for resource, verbs in rules.items()
                ],
            },
        )
        kube.create_object(
            "rbac.authorization.k8s.io/v1/clusterrolebindings",
            {
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": [subject],
            },
        )
        granted.append((name, user, [c for c in checks if c not in already]))
        # RBAC reads roles from its informers: the grant holds a moment after it is stored.
        wait_until(
            lambda: all(allowed(kube, user, *c) for c in checks),
            timeout=30,
            message=f"the grant of {rules} to {user}",
        )

    try:
        yield give
    finally:
        for name, user, added in granted:
            for resource in ("clusterrolebindings", "clusterroles"):
                kube.delete_object(f"rbac.authorization.k8s.io/v1/{resource}", name)
            # ... and is gone a moment after it is deleted: the next test must not see it.
            wait_until(
                lambda u=user, a=added: not any(allowed(kube, u, *c) for c in a),
                timeout=30,
                message=f"the revocation of the grant to {user}",
            )


def test_chart_rbac_gives_the_agent_no_update_of_reports(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))
    current = agent.create_object(REPORTS, report("node-a"))
    for subresource in ("", "/status"):
        path = resource_path(REPORTS, "node-a") + subresource
        error = refused(lambda p=path: agent.request("PUT", p, current))
        assert (error.status, error.message) == (
            403,
            rbac_message(AGENT_USER, "update", f"nodememoryreports{subresource}", "node-a"),
        )


def test_agent_cannot_rename_its_report(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str], grant: Callable[..., None]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))
    agent.create_object(REPORTS, report("node-a"))

    # A patch of the name, within the chart's RBAC.
    error = refused(lambda: agent.patch_object(REPORTS, "node-a", {"metadata": {"name": "node-b"}}))
    assert (error.status, error.reason) == (400, "BadRequest")
    assert error.message == RENAME_MESSAGE
    # An update (PUT) with another name, once RBAC allows updates.
    grant(AGENT_USER, {"nodememoryreports": ["update"]})
    renamed = agent.get_object(REPORTS, "node-a")
    renamed["metadata"]["name"] = "node-b"
    error = refused(lambda: agent.request("PUT", resource_path(REPORTS, "node-a"), renamed))
    assert (error.status, error.reason) == (400, "BadRequest")
    assert error.message == RENAME_MESSAGE
    assert kube.get_object(REPORTS, "node-b") is None
    assert kube.get_object(REPORTS, "node-a") is not None


def test_policy_judges_an_update_by_the_report_written(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str], grant: Callable[..., None]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))
    grant(AGENT_USER, {"nodememoryreports": ["update"], "nodememoryreports/status": ["update"]})
    own = agent.create_object(REPORTS, report("node-a"))
    own["metadata"]["labels"] = {"pool": "web"}
    own = agent.request("PUT", resource_path(REPORTS, "node-a"), own)
    assert own["metadata"]["labels"] == {"pool": "web"}
    own |= HEARTBEAT
    own = agent.request("PUT", resource_path(REPORTS, "node-a") + "/status", own)
    assert own["status"] == HEARTBEAT["status"]

    other = kube.create_object(REPORTS, report("node-b"))
    for subresource, change in (
        ("", {"metadata": other["metadata"] | {"labels": {"x": "y"}}}),
        ("/status", HEARTBEAT),
    ):
        path = resource_path(REPORTS, "node-b") + subresource
        error = refused(lambda p=path, c=change: agent.request("PUT", p, other | c))
        assert (error.status, error.message) == (
            403,
            policy_denial("node-b", wrong_node("node-a", "node-b")),
        ), subresource
    assert kube.get_object(REPORTS, "node-b") == other


def test_policy_judges_a_delete_by_the_report_deleted(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str], grant: Callable[..., None]
) -> None:
    # A DELETE has no object, only oldObject: the policy must read the name from there.
    agent = as_token(control_plane, agent_token("node-a"))
    grant(AGENT_USER, {"nodememoryreports": ["delete"]})
    kube.create_object(REPORTS, report("node-b"))
    error = refused(lambda: agent.delete_object(REPORTS, "node-b"))
    assert (error.status, error.message) == (
        403,
        policy_denial("node-b", wrong_node("node-a", "node-b")),
    )
    assert kube.get_object(REPORTS, "node-b") is not None

    agent.create_object(REPORTS, report("node-a"))
    agent.delete_object(REPORTS, "node-a")
    assert kube.get_object(REPORTS, "node-a") is None


def test_legacy_secret_token_is_refused(control_plane: Any, kube: Kube) -> None:
    # A token Secret, filled in by kube-controller-manager: no node claim, no extra at all.
    secret = {
        "metadata": {
            "name": "nodemem-agent-legacy-token",
            "annotations": {"kubernetes.io/service-account.name": AGENT_SA},
        },
        "type": "kubernetes.io/service-account-token",
    }
    kube.create_object("v1/secrets", secret, namespace=NAMESPACE)
    try:

        def token() -> str:
            stored = kube.get_object("v1/secrets", secret["metadata"]["name"], namespace=NAMESPACE)
            return str(stored.get("data", {}).get("token", ""))

        wait_until(token, timeout=30, message="the token controller to fill in the Secret")
        agent = as_token(control_plane, base64.b64decode(token()).decode())
        user = agent.create_object(REVIEWS, {"spec": {}})["status"]["userInfo"]
        assert user["username"] == AGENT_USER
        assert "extra" not in user

        error = refused(lambda: agent.create_object(REPORTS, report("node-a")))
        assert (error.status, error.message) == (403, policy_denial("node-a", NO_NODE_CLAIM))
        assert kube.get_object(REPORTS, "node-a") is None
    finally:
        kube.delete_object("v1/secrets", secret["metadata"]["name"], namespace=NAMESPACE)


# --- requests the policy does not match -----------------------------------------------


def test_agent_posts_events(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str]
) -> None:
    # Events are the agent's other write; the policy matches reports only.
    agent = as_token(control_plane, agent_token("node-a"))
    event = {
        "metadata": {"generateName": "node-a."},
        "involvedObject": {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryReport",
            "name": "node-b",
        },
        "reason": "Test",
        "message": "posted by the agent of node-a",
        "type": "Normal",
        "source": {"component": "nodemem-agent", "host": "node-a"},
    }
    posted = agent.create_object("v1/events", event, namespace="default")
    assert posted["involvedObject"]["name"] == "node-b"
    stamp = "2025-01-01T00:00:00.000000Z"
    posted = agent.create_object(
        "events.k8s.io/v1/events",
        {
            "metadata": {"generateName": "node-a-"},  # this API refuses a trailing "."
            "eventTime": stamp,
            "regarding": event["involvedObject"],
            "reason": "Test",
            "note": "posted by the agent of node-a",
            "type": "Normal",
            "action": "Test",
            "reportingController": "nodemem.dev/agent",
            "reportingInstance": "node-a",
        },
        namespace="default",
    )
    assert posted["regarding"]["name"] == "node-b"


def test_agent_writes_to_policies_are_not_matched(
    control_plane: Any, kube: Kube, agent_token: Callable[..., str], grant: Callable[..., None]
) -> None:
    agent = as_token(control_plane, agent_token("node-a"))
    grant(AGENT_USER, {"nodememorypolicies": ["patch"], "nodememorypolicies/status": ["patch"]})
    kube.create_object(POLICIES, policy("node-b"))
    patched = agent.patch_object(POLICIES, "node-b", {"spec": {"priority": 9}})
    assert patched["spec"]["priority"] == 9
    patched = agent.patch_object(
        POLICIES, "node-b", {"status": {"observedGeneration": 1}}, subresource="status"
    )
    assert patched["status"]["observedGeneration"] == 1


def test_admin_writes_and_deletes_any_report(kube: Kube) -> None:
    created = kube.create_object(REPORTS, report("node-b"))
    created["metadata"]["labels"] = {"pool": "web"}
    updated = kube.request("PUT", resource_path(REPORTS, "node-b"), created)
    assert updated["metadata"]["labels"] == {"pool": "web"}
    kube.patch_object(REPORTS, "node-b", HEARTBEAT, subresource="status")
    kube.delete_object(REPORTS, "node-b")
    assert kube.get_object(REPORTS, "node-b") is None


def test_agent_of_another_namespace_is_not_matched(
    control_plane: Any, kube: Kube, grant: Callable[..., None]
) -> None:
    # Another install's agent (same name, namespace default): this install's policy names
    # only its own agent, so that agent's node claim is not held against it here.
    other = "system:serviceaccount:default:nodemem-agent"
    kube.create_object("v1/serviceaccounts", {"metadata": {"name": AGENT_SA}}, namespace="default")
    try:
        grant(other, {"nodememoryreports": ["create"], "nodememoryreports/status": ["patch"]})
        ensure_node(kube, "node-a")
        pod = kube.create_object(
            "v1/pods",
            {
                "metadata": {"generateName": "other-agent-"},
                "spec": {
                    "nodeName": "node-a",
                    "serviceAccountName": AGENT_SA,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "agent", "image": "nodemem:test"}],
                },
            },
            namespace="default",
        )
        agent = as_token(control_plane, kube.service_account_token("default", AGENT_SA, pod=pod))
        user = agent.create_object(REVIEWS, {"spec": {}})["status"]["userInfo"]
        assert (user["username"], user["extra"][NODE_NAME_KEY]) == (other, ["node-a"])

        agent.create_object(REPORTS, report("node-b"))
        agent.patch_object(REPORTS, "node-b", HEARTBEAT, subresource="status")
        assert kube.get_object(REPORTS, "node-b")["status"] == HEARTBEAT["status"]
    finally:
        kube.delete_object("v1/serviceaccounts", AGENT_SA, namespace="default", missing_ok=True)


def test_node_identity_is_not_matched(
    control_plane: Any, kube: Kube, grant: Callable[..., None]
) -> None:
    # A kubelet's client certificate (system:node:NAME in system:nodes), issued by the
    # cluster's CA; the Node authorizer gives it nothing on reports, so RBAC grants it.
    subprocess.run(
        [
            str(control_plane.bin_dir / "pki"),
            "-dir",
            str(control_plane.pki),
            "-client",
            "system:node:node-a=system:nodes",
        ],
        check=True,
        capture_output=True,
    )
    node = Kube(control_plane.url, control_plane.ssl_context("system-node-node-a"))
    user = node.create_object(REVIEWS, {"spec": {}})["status"]["userInfo"]
    assert user["username"] == "system:node:node-a"
    error = refused(lambda: node.create_object(REPORTS, report("node-b")))
    assert (error.status, error.message) == (
        403,
        rbac_message("system:node:node-a", "create", "nodememoryreports"),
    )

    grant("system:node:node-a", {"nodememoryreports": ["create", "delete"]})
    node.create_object(REPORTS, report("node-b"))
    node.delete_object(REPORTS, "node-b")
    assert kube.get_object(REPORTS, "node-b") is None

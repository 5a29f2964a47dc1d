"""``helm install``/``upgrade``/``uninstall`` of charts/nodemem by the real Helm engine
(helm_python, Helm's Go SDK) against the real kube-apiserver.

A second release (``e2e`` in ``nodemem-e2e``) next to the session's ``nodemem`` objects;
its names differ in the release prefix, so nothing collides. The chart's crds/ are
already installed by the session: Helm skips CRDs that exist, and never deletes them.
Checked here: every object of the rendered manifest exists on the server after install
(and carries Helm's release annotations), an upgrade that changes values is applied to
the live objects, uninstall removes every object (and the garbage collector the pods the
controllers made), and the release's own ValidatingAdmissionPolicy is effective for its
own agent ServiceAccount.

There is no kubelet (nor a scheduler): the DaemonSet's and Deployment's pods are created
by kube-controller-manager but never run, so nothing here waits for readiness (Helm's
``hookOnly`` wait strategy, and the chart has no hooks). Pods running is the real-node
tier's job. Optional parts: the Grafana dashboard ConfigMap is on; the PrometheusRule
only when the server has the Prometheus Operator's CRD (this harness does not install
it, so it is normally off); kopf peering is off (it needs kopf's ClusterKopfPeering CRD).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from restclient import ApiError, Kube, resource_path, wait_until

from conftest import POLICIES, REPORTS, ROOT, ensure_node

CHART = ROOT / "charts" / "nodemem"
RELEASE = "e2e"
NAMESPACE = "nodemem-e2e"
FULLNAME = f"{RELEASE}-nodemem"
AGENT_SA = f"{FULLNAME}-agent"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
OWN_REPORT_POLICY = f"{AGENT_SA}-own-report"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
PROMETHEUS_RULE_CRD = "prometheusrules.monitoring.coreos.com"
WAIT = "hookOnly"  # no readiness wait: pods never run without a kubelet
TIMEOUT = 120


def values(kube: Kube, **agent: Any) -> dict[str, Any]:
    """Every optional part the server can take (see the module docstring)."""
    return {
        "agent": agent,
        "metrics": {
            "enabled": True,
            "grafanaDashboard": {"enabled": True},
            "prometheusRule": {"enabled": has_prometheus_rule_crd(kube)},
        },
    }


def has_prometheus_rule_crd(kube: Kube) -> bool:
    return kube.get_object(CRDS, PROMETHEUS_RULE_CRD) is not None


def manifest_objects(release: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]


class Discovery:
    """apiVersion + kind → the ``Kube`` resource name and its scope, from the server's discovery."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.cache: dict[str, dict[str, tuple[str, bool]]] = {}

    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        if api_version not in self.cache:
            prefix = "/api/" if "/" not in api_version else "/apis/"
            listing = self.kube.request("GET", prefix + api_version)
            self.cache[api_version] = {
                r["kind"]: (f"{api_version}/{r['name']}", r["namespaced"])
                for r in listing["resources"]
                if "/" not in r["name"]
            }
        return self.cache[api_version][kind]

    def get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        resource, namespaced = self.resource(obj["apiVersion"], obj["kind"])
        namespace = obj["metadata"].get("namespace", NAMESPACE) if namespaced else None
        found: dict[str, Any] | None = self.kube.get_object(
            resource, obj["metadata"]["name"], namespace=namespace
        )
        return found


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def release_pods(kube: Kube) -> list[dict[str, Any]]:
    return kube.list_objects(
        "v1/pods", namespace=NAMESPACE, labelSelector=f"app.kubernetes.io/instance={RELEASE}"
    )


@pytest.fixture
def helm_config(kube: Kube, kubeconfig: Path) -> Iterator[helm.Config]:
    config = helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE)
    try:
        yield config
    finally:
        try:
            config.uninstall(RELEASE, ignore_not_found=True, wait=WAIT, timeout=TIMEOUT)
        finally:
            config.close()
            _delete_namespace(kube)


def _delete_namespace(kube: Kube) -> None:
    """Pods bound to a node never finish terminating without a kubelet: delete them now."""
    if kube.get_object("v1/namespaces", NAMESPACE) is None:
        return
    for pod in kube.list_objects("v1/pods", namespace=NAMESPACE):
        kube.request(
            "DELETE",
            f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}",
            {"gracePeriodSeconds": 0},
        )
    kube.delete_object("v1/namespaces", NAMESPACE, missing_ok=True)
    wait_until(
        lambda: kube.get_object("v1/namespaces", NAMESPACE) is None,
        timeout=60,
        interval=0.2,
        message=f"namespace {NAMESPACE} to be deleted",
    )


def install(config: helm.Config, kube: Kube, **agent: Any) -> dict[str, Any]:
    return config.install(
        str(CHART),
        RELEASE,
        values(kube, **agent),
        namespace=NAMESPACE,
        create_namespace=True,
        wait=WAIT,
        timeout=TIMEOUT,
    )


def agent_container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_install_upgrade_uninstall(helm_config: helm.Config, kube: Kube) -> None:
    discovery = Discovery(kube)
    prometheus_rule = has_prometheus_rule_crd(kube)

    release = install(helm_config, kube)
    assert release["name"] == RELEASE
    assert release["namespace"] == NAMESPACE
    assert (release["revision"], release["status"]) == (1, "deployed")
    objects = manifest_objects(release)
    expected = {
        f"DaemonSet/{AGENT_SA}",
        f"Deployment/{FULLNAME}-controller",
        f"ServiceAccount/{AGENT_SA}",
        f"ServiceAccount/{FULLNAME}-controller",
        f"ClusterRole/{AGENT_SA}",
        f"ClusterRole/{FULLNAME}-controller",
        f"ClusterRoleBinding/{AGENT_SA}",
        f"ClusterRoleBinding/{FULLNAME}-controller",
        f"ValidatingAdmissionPolicy/{OWN_REPORT_POLICY}",
        f"ValidatingAdmissionPolicyBinding/{OWN_REPORT_POLICY}",
        f"Service/{AGENT_SA}-metrics",
        f"ConfigMap/{FULLNAME}-dashboard",
    } | ({f"PrometheusRule/{AGENT_SA}"} if prometheus_rule else set())
    assert {ident(o) for o in objects} == expected

    for obj in objects:
        live = discovery.get(obj)
        assert live is not None, f"{ident(obj)} is not on the server"
        annotations = live["metadata"].get("annotations", {})
        assert annotations.get("meta.helm.sh/release-name") == RELEASE, ident(obj)
        assert annotations.get("meta.helm.sh/release-namespace") == NAMESPACE, ident(obj)
        assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, ident(obj)
    live_ds = kube.get_object("apps/v1/daemonsets", AGENT_SA, namespace=NAMESPACE)
    assert agent_container(live_ds)["resources"]["limits"]["memory"] == "256Mi"
    assert agent_container(live_ds)["ports"][0]["containerPort"] == 8080
    dashboard = kube.get_object("v1/configmaps", f"{FULLNAME}-dashboard", namespace=NAMESPACE)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(dashboard["data"]["nodemem.json"])["panels"]
    # The session's CRDs were left as they were: Helm skips CRDs that exist.
    for crd in ("nodememorypolicies.nodemem.dev", "nodememoryreports.nodemem.dev"):
        assert "meta.helm.sh/release-name" not in (
            kube.get_object(CRDS, crd)["metadata"].get("annotations") or {}
        )

    # The release's storage: Helm's own Secret in the release namespace.
    assert [r["name"] for r in helm_config.list()] == [RELEASE]

    # Upgrade: new limits and metrics port reach the live DaemonSet and Service.
    generation = live_ds["metadata"]["generation"]
    upgraded = helm_config.upgrade(
        str(CHART),
        RELEASE,
        values(
            kube,
            metricsPort=9095,
            resources={
                "requests": {"cpu": "50m", "memory": "128Mi"},
                "limits": {"cpu": "1", "memory": "384Mi"},
            },
        ),
        namespace=NAMESPACE,
        wait=WAIT,
        timeout=TIMEOUT,
    )
    assert (upgraded["revision"], upgraded["status"]) == (2, "deployed")
    live_ds = kube.get_object("apps/v1/daemonsets", AGENT_SA, namespace=NAMESPACE)
    assert live_ds["metadata"]["generation"] > generation
    container = agent_container(live_ds)
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "384Mi"}
    assert container["ports"][0]["containerPort"] == 9095
    assert container["args"][container["args"].index("--metrics-port") + 1] == "9095"
    service = kube.get_object("v1/services", f"{AGENT_SA}-metrics", namespace=NAMESPACE)
    assert [p["port"] for p in service["spec"]["ports"]] == [9095]
    assert [(r["revision"], r["status"]) for r in helm_config.history(RELEASE)] == [
        (1, "superseded"),
        (2, "deployed"),
    ]

    # The Deployment's pods exist (kube-controller-manager made them) but never run.
    # A kube-controller-manager revived after an API restart starts its deployment and
    # replicaset controllers only once its informers synced, which back off while the
    # restarted server's RBAC is still warming up (seen: over 30 s).
    wait_until(
        lambda: release_pods(kube), timeout=120, interval=0.2, message="the controller's pod"
    )

    helm_config.uninstall(RELEASE, wait=WAIT, timeout=TIMEOUT)

    def all_gone() -> bool:
        return all(discovery.get(obj) is None for obj in objects)

    wait_until(
        all_gone, timeout=60, interval=0.2, message="every object of the release to be deleted"
    )
    wait_until(
        lambda: not release_pods(kube),
        timeout=60,
        interval=0.2,
        message="the release's pods to be collected",
    )
    assert helm_config.list(all_states=True) == []
    assert kube.list_objects("v1/secrets", namespace=NAMESPACE, labelSelector="owner=helm") == []
    for crd in ("nodememorypolicies.nodemem.dev", "nodememoryreports.nodemem.dev"):
        assert kube.get_object(CRDS, crd) is not None


def wait_until_enforced(agent: Kube, report: dict[str, Any]) -> None:
    """Until the API server enforces a policy just created: its admission plugin loads new
    policies and bindings from its informers, a moment after they are stored. Probed with
    dry-run creates, which admission sees but which store nothing."""

    def refused() -> bool:
        try:
            agent.request("POST", resource_path(REPORTS), report, query={"dryRun": "All"})
        except ApiError as error:
            if error.status == 403 and "ValidatingAdmissionPolicy" in error.message:
                return True
            raise
        return False

    wait_until(refused, timeout=30, interval=0.1, message=f"{OWN_REPORT_POLICY} to be enforced")


def test_release_admission_policy_is_effective(
    helm_config: helm.Config, kube: Kube, control_plane: Any
) -> None:
    install(helm_config, kube)
    binding = kube.get_object(
        "admissionregistration.k8s.io/v1/validatingadmissionpolicybindings", OWN_REPORT_POLICY
    )
    assert binding["spec"]["policyName"] == OWN_REPORT_POLICY

    ensure_node(kube, "node-x")
    pod = kube.create_object(
        "v1/pods",
        {
            "metadata": {"generateName": "e2e-agent-node-x-"},
            "spec": {
                "nodeName": "node-x",
                "serviceAccountName": AGENT_SA,
                "automountServiceAccountToken": False,
                "containers": [{"name": "agent", "image": "nodemem:test"}],
            },
        },
        namespace=NAMESPACE,
    )
    token = kube.service_account_token(NAMESPACE, AGENT_SA, pod=pod)
    context = ssl.create_default_context(cafile=str(control_plane.pki / "ca.crt"))
    agent = Kube(control_plane.url, context, token=token)
    report = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": "node-y"},
    }
    wait_until_enforced(agent, report)

    with pytest.raises(ApiError) as caught:
        agent.create_object(REPORTS, report)
    assert caught.value.status == 403
    assert caught.value.message == (
        f'nodememoryreports.nodemem.dev "node-y" is forbidden: ValidatingAdmissionPolicy '
        f"'{OWN_REPORT_POLICY}' with binding '{OWN_REPORT_POLICY}' denied request: "
        "the nodemem agent of node node-x may only write the NodeMemoryReport named node-x, "
        "not node-y"
    )
    assert kube.get_object(REPORTS, "node-y") is None

    # The release's RBAC lets this agent write its own report; its policy lets it through.
    agent.create_object(REPORTS, {**report, "metadata": {"name": "node-x"}})
    agent.patch_object(
        REPORTS,
        "node-x",
        {"status": {"lastUpdateTime": "2025-01-01T00:00:00Z"}},
        subresource="status",
    )
    assert kube.get_object(REPORTS, "node-x")["status"]["lastUpdateTime"] == "2025-01-01T00:00:00Z"
    # And no more than the session's agent may: policies stay read-only.
    with pytest.raises(ApiError) as caught:
        agent.patch_object(POLICIES, "any", {"spec": {"priority": 1}})
    assert caught.value.status == 403

    # Once uninstalled, the release's policy is gone and so are the agent's rights.
    helm_config.uninstall(RELEASE, wait=WAIT, timeout=TIMEOUT)
    wait_until(
        lambda: (
            kube.get_object(
                "admissionregistration.k8s.io/v1/validatingadmissionpolicies", OWN_REPORT_POLICY
            )
            is None
        ),
        timeout=30,
        message="the release's admission policy to be deleted",
    )

"""Fixtures for tests against the real control plane (hack/cluster/controlplane.py).

- ``control_plane`` (session): etcd, kube-apiserver and kube-controller-manager built
  from the pinned upstream modules and started once per session below a temporary
  directory; nodemem's CRDs (``crds/``) and the chart's ServiceAccounts, RBAC and
  ValidatingAdmissionPolicy (rendered by Helm from ``charts/nodemem``, release
  ``nodemem`` in ``nodemem-system``) applied with the real kubectl.
- ``kube``: the admin's :class:`realkube.Kube`; at teardown every policy, report, Node,
  Event and test pod the test left is deleted, so tests share the server, not state.
- ``audit``: the server's :class:`realkube.AuditLog`.
- ``kubeconfig``: the admin kubeconfig file; ``kubeconfig_for_token(token)`` writes one
  for a ServiceAccount token.
- ``agent_token(node)``: a token of the chart's agent ServiceAccount bound to a Pod on
  ``node`` (the Node is created when missing), so it carries the node claim;
  ``controller_token``: a token of the controller's ServiceAccount.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from realkube import ApiError, AuditLog, Kube, resource_path, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack" / "cluster"))
from controlplane import ControlPlane  # noqa: E402

NAMESPACE = "nodemem-system"
RELEASE = "nodemem"
AGENT_SA = "nodemem-agent"
CONTROLLER_SA = "nodemem-controller"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
CONTROLLER_USER = f"system:serviceaccount:{NAMESPACE}:{CONTROLLER_SA}"
ADMIN_USER = "admin"
# The chart's cluster-wide identities: what the session applies before any test.
BOOTSTRAP_TEMPLATES = (
    "serviceaccounts.yaml",
    "agent-rbac.yaml",
    "controller-rbac.yaml",
    "admission-policy.yaml",
)
POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"


def kubectl(plane: ControlPlane, *args: str, input: str | None = None) -> str:
    result = subprocess.run(
        [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def render_bootstrap(values: dict[str, Any] | None = None) -> str:
    rendered = helm.Chart.load(ROOT / "charts" / "nodemem").render(
        values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return "\n---\n".join(
        text for path, text in sorted(rendered.items()) if Path(path).name in BOOTSTRAP_TEMPLATES
    )


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.up()
        kubectl(plane, "apply", "--server-side", "-f", str(ROOT / "crds"))
        kubectl(
            plane, "wait", "--for=condition=Established", "--timeout=30s", "-f", str(ROOT / "crds")
        )
        _wait_for_storage(Kube(plane.url, plane.ssl_context()))
        kubectl(plane, "create", "namespace", NAMESPACE)
        kubectl(plane, "apply", "--server-side", "-f", "-", input=render_bootstrap())
        _wait_for_admission_policy(plane)
        yield plane
    finally:
        plane.down()


def _wait_for_storage(kube: Kube) -> None:
    """Established is not served: a new CRD's cache answers 429 until it has started."""

    def listable() -> bool:
        try:
            kube.list_objects(POLICIES)
            kube.list_objects(REPORTS)
        except ApiError as error:
            if error.status == 429:
                return False
            raise
        return True

    wait_until(listable, timeout=30, message="the CRDs' storage")


def _wait_for_admission_policy(plane: ControlPlane) -> None:
    """A new ValidatingAdmissionPolicy is enforced a moment after it is stored (the server
    loads it from its informers): until a dry-run create of an agent with no node claim is
    refused by it, a test could see a write admitted that the chart refuses."""
    admin = Kube(plane.url, plane.ssl_context())
    agent = Kube(
        plane.url,
        ssl.create_default_context(cafile=str(plane.pki / "ca.crt")),
        token=admin.service_account_token(NAMESPACE, AGENT_SA),
    )
    probe = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": "probe"},
    }

    def refused() -> bool:
        try:
            agent.request("POST", resource_path(REPORTS), probe, query={"dryRun": "All"})
        except ApiError as error:
            if error.status == 403 and "own-report" in error.message:
                return True
            raise
        return False

    wait_until(refused, timeout=30, interval=0.1, message="the admission policy to be enforced")


@pytest.fixture(scope="session")
def admin(control_plane: ControlPlane) -> Kube:
    return Kube(control_plane.url, control_plane.ssl_context())


def _clean(kube: Kube) -> None:
    for resource in (POLICIES, REPORTS, "v1/nodes"):
        for obj in kube.list_objects(resource):
            kube.delete_object(resource, obj["metadata"]["name"], missing_ok=True)
    for namespace in ("default", NAMESPACE):
        for resource in ("v1/pods", "v1/events", "events.k8s.io/v1/events"):
            for obj in kube.list_objects(resource, namespace=namespace):
                try:
                    kube.request(
                        "DELETE",
                        f"{_namespaced(resource, namespace)}/{obj['metadata']['name']}",
                        {"gracePeriodSeconds": 0},
                    )
                except ApiError as error:
                    if error.status != 404:
                        raise


def _namespaced(resource: str, namespace: str) -> str:
    return resource_path(resource, namespace=namespace)


@pytest.fixture
def kube(admin: Kube) -> Iterator[Kube]:
    _clean(admin)
    try:
        yield admin
    finally:
        _clean(admin)


@pytest.fixture
def audit(control_plane: ControlPlane) -> AuditLog:
    return AuditLog(control_plane.audit_log)


@pytest.fixture
def kubeconfig(control_plane: ControlPlane, tmp_path: Path) -> Path:
    path = tmp_path / "admin.kubeconfig"
    path.write_text(control_plane.kubeconfig_for("admin"))
    return path


@pytest.fixture
def kubeconfig_for_token(control_plane: ControlPlane, tmp_path: Path) -> Callable[[str], Path]:
    count = 0

    def write(token: str) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / f"token-{count}.kubeconfig"
        path.write_text(control_plane.token_kubeconfig(token))
        return path

    return write


def ensure_node(kube: Kube, name: str, **labels: str) -> dict[str, Any]:
    node = kube.get_object("v1/nodes", name)
    if node is None:
        node = kube.create_object("v1/nodes", {"metadata": {"name": name, "labels": labels}})
    return dict(node)


def bound_pod(kube: Kube, node: str, service_account: str) -> dict[str, Any]:
    """A Pod of ``service_account`` bound to ``node`` (never runs: there is no kubelet)."""
    pod = kube.create_object(
        "v1/pods",
        {
            "metadata": {"generateName": f"{service_account}-{node}-"[:50]},
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "automountServiceAccountToken": False,
                "containers": [{"name": "agent", "image": "nodemem:test"}],
            },
        },
        namespace=NAMESPACE,
    )
    return dict(pod)


@pytest.fixture
def agent_token(kube: Kube) -> Callable[..., str]:
    def issue(node: str, **labels: str) -> str:
        ensure_node(kube, node, **labels)
        pod = bound_pod(kube, node, AGENT_SA)
        return kube.service_account_token(NAMESPACE, AGENT_SA, pod=pod)

    return issue


@pytest.fixture
def controller_token(kube: Kube) -> str:
    return kube.service_account_token(NAMESPACE, CONTROLLER_SA)


__all__ = ["wait_until"]

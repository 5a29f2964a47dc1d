"""Fixtures for tests against the real control plane (hack/cluster/controlplane.py).

- ``control_plane`` (session): etcd, kube-apiserver and kube-controller-manager built
  from the pinned upstream modules and started once per session below a temporary
  directory; nodemem's CRDs (``crds/``) and the chart's ServiceAccounts, RBAC and
  ValidatingAdmissionPolicy (rendered by Helm from ``charts/nodemem``, release
  ``nodemem`` in ``nodemem-system``) applied with the real kubectl.
- ``kube``: the admin's :class:`restclient.Kube` (hack/cluster/restclient.py); at
  teardown every policy, report, Node, Event and test pod the test left is deleted, so
  tests share the server, not state.
- ``audit``: the server's :class:`restclient.AuditLog`, which waits for requests
  already answered to be logged before it answers a query.
- ``kubeconfig``: the admin kubeconfig file; ``kubeconfig_for_token(token)`` writes one
  for a ServiceAccount token.
- ``agent_token(node)``: a token of the chart's agent ServiceAccount bound to a Pod on
  ``node`` (the Node is created when missing), so it carries the node claim;
  ``controller_token``: a token of the controller's ServiceAccount.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack" / "cluster"))
import nodemem_setup  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from nodemem_setup import (  # noqa: E402
    ADMIN_USER,
    AGENT_SA,
    AGENT_USER,
    CONTROLLER_SA,
    CONTROLLER_USER,
    NAMESPACE,
    POLICIES,
    REPORTS,
    bound_pod,
    ensure_node,
    install_nodemem,
    kubectl,
    render_bootstrap,
)
from restclient import ApiError, AuditLog, Kube, resource_path, wait_until  # noqa: E402


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    done = threading.Event()

    def supervise() -> None:  # as a kubelet keeps a static pod running
        while not done.wait(0.5):
            plane.revive_controller_manager()

    supervisor = threading.Thread(target=supervise, name="control-plane-supervisor")
    try:
        plane.up()
        supervisor.start()
        install_nodemem(plane)
        yield plane
    finally:
        done.set()
        if supervisor.is_alive():
            supervisor.join()
        plane.down()


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
def audit(control_plane: ControlPlane, admin: Kube) -> AuditLog:
    return AuditLog(control_plane.audit_log, admin)


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


@pytest.fixture
def agent_token(kube: Kube) -> Callable[..., str]:
    def issue(node: str, **labels: str) -> str:
        ensure_node(kube, node, **labels)
        return nodemem_setup.agent_token(kube, node)

    return issue


@pytest.fixture
def controller_token(kube: Kube) -> str:
    return nodemem_setup.controller_token(kube)


__all__ = [
    "ADMIN_USER",
    "AGENT_SA",
    "AGENT_USER",
    "CONTROLLER_SA",
    "CONTROLLER_USER",
    "NAMESPACE",
    "POLICIES",
    "REPORTS",
    "ROOT",
    "bound_pod",
    "ensure_node",
    "kubectl",
    "render_bootstrap",
    "wait_until",
]

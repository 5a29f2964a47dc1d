"""nodemem on a started control plane (controlplane.py), as the tests and benches need it:
the CRDs (``crds/``) applied with the real kubectl, and the chart's ServiceAccounts, RBAC
and ValidatingAdmissionPolicy rendered by Helm (release ``nodemem`` in
``nodemem-system``); ServiceAccount tokens of the chart's identities, the agent's bound
to a Pod on its Node, so that it carries the node claim the admission policy checks.

Rendering needs ``helm_python`` (the project's venv); everything else is the standard
library and restclient.py.
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from restclient import ApiError, Kube, resource_path, wait_until

if TYPE_CHECKING:
    from controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "nodemem-system"
RELEASE = "nodemem"
AGENT_SA = "nodemem-agent"
CONTROLLER_SA = "nodemem-controller"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
CONTROLLER_USER = f"system:serviceaccount:{NAMESPACE}:{CONTROLLER_SA}"
ADMIN_USER = "admin"
# The chart's cluster-wide identities: what is applied before any test or bench.
BOOTSTRAP_TEMPLATES = (
    "serviceaccounts.yaml",
    "agent-rbac.yaml",
    "controller-rbac.yaml",
    "admission-policy.yaml",
)
POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"


def kubectl(plane: ControlPlane, *args: str, input: str | None = None) -> str:
    """The real kubectl as the admin; its stderr in the error when it fails."""
    result = subprocess.run(
        [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def render_bootstrap(values: dict[str, Any] | None = None) -> str:
    """The chart's ServiceAccounts, RBAC and admission policy, rendered by Helm."""
    import helm_python as helm  # noqa: PLC0415  # the venv's; not needed to run a plane

    rendered = helm.Chart.load(ROOT / "charts" / "nodemem").render(
        values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return "\n---\n".join(
        text for path, text in sorted(rendered.items()) if Path(path).name in BOOTSTRAP_TEMPLATES
    )


def install_nodemem(plane: ControlPlane) -> None:
    """CRDs, served; the namespace; the chart's identities, the admission policy enforced."""
    crds = str(ROOT / "crds")
    kubectl(plane, "apply", "--server-side", "-f", crds)
    kubectl(plane, "wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    admin = Kube(plane.url, plane.ssl_context())
    _wait_for_storage(admin)
    kubectl(plane, "create", "namespace", NAMESPACE)
    kubectl(plane, "apply", "--server-side", "-f", "-", input=render_bootstrap())
    _wait_for_admission_policy(plane, admin)


def _wait_for_storage(kube: Kube) -> None:
    """Established is not served: a new CRD's cache answers 429 until it has started."""

    def listable() -> bool:
        try:
            kube.list_objects(POLICIES, limit="1")
            kube.list_objects(REPORTS, limit="1")
        except ApiError as error:
            if error.status == 429:
                return False
            raise
        return True

    wait_until(listable, timeout=60, message="the CRDs' storage")


def _wait_for_admission_policy(plane: ControlPlane, admin: Kube) -> None:
    """A new ValidatingAdmissionPolicy is enforced a moment after it is stored (the server
    loads it from its informers): until a dry-run create of an agent with no node claim is
    refused by it, a write could be admitted that the chart refuses."""
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


def ensure_node(kube: Kube, name: str, **labels: str) -> dict[str, Any]:
    node = kube.get_object("v1/nodes", name)
    if node is None:
        node = kube.create_object("v1/nodes", {"metadata": {"name": name, "labels": labels}})
    return dict(node)


def bound_pod(kube: Kube, node: str, service_account: str = AGENT_SA) -> dict[str, Any]:
    """A Pod of ``service_account`` bound to ``node`` (it never runs: there is no kubelet)."""
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


def agent_token(kube: Kube, node: str, *, expiration: int = 3600) -> str:
    """A token of the chart's agent ServiceAccount bound to a Pod on ``node`` (which must
    exist): it carries the node-name claim the admission policy checks."""
    pod = bound_pod(kube, node, AGENT_SA)
    return kube.service_account_token(NAMESPACE, AGENT_SA, pod=pod, expiration=expiration)


def controller_token(kube: Kube, *, expiration: int = 3600) -> str:
    return kube.service_account_token(NAMESPACE, CONTROLLER_SA, expiration=expiration)

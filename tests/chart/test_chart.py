"""The Helm chart, rendered by real Helm (helm-python-sdk) and checked object by object.

Every built-in object is validated with kubernetes-validate (strict) for the oldest and the
newest Kubernetes the chart supports; the few kinds it has no schema for are allow-listed
and checked field by field here. The agent's security properties, the RBAC rules, the
values schema and the NOTES are asserted exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from nodemem.api.manifest import load_policies
from nodemem.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "nodemem"
RELEASE = "nodemem"
NAMESPACE = "nodemem-system"
AGENT = f"{RELEASE}-agent"
CONTROLLER = f"{RELEASE}-controller"
KUBERNETES_VERSIONS = ("1.30", "1.37")  # the chart's kubeVersion floor, the newest known
CRD_FILES = ("nodemem.dev_nodememorypolicies.yaml", "nodemem.dev_nodememoryreports.yaml")
AGENT_CAPABILITIES = ["SYS_ADMIN", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH"]
# Added by default (values.yaml says why): non-root processes' oom_score_adj, /dev/shm.
DEFAULT_EXTRA_CAPABILITIES = ["DAC_OVERRIDE", "FOWNER"]

# Kinds kubernetes-validate has no schema for: checked by the tests below instead.
NOT_BUILT_IN = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
}
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ClusterKopfPeering",
}

Obj = dict[str, Any]

VARIANTS: dict[str, Obj] = {
    "defaults": {},
    "metrics-off": {"metrics": {"enabled": False}},
    "admission-policy-off": {"admissionPolicy": {"enabled": False}},
    "custom-tolerations": {
        "agent": {
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}
            ]
        }
    },
    "agent-dry-run": {"agent": {"dryRun": True}},
    "service-monitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
    },
    "pod-monitor": {"metrics": {"podMonitor": {"enabled": True}}},
    # Rules and dashboard against a real agent's series: tests/host/test_monitoring_rules.py.
    "alerts-and-dashboard": {
        "metrics": {
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "nodes"}},
        }
    },
    "localhost-seccomp": {
        "agent": {
            "seccompProfile": {"type": "Localhost", "localhostProfile": "nodemem-agent.json"},
            "appArmorProfile": {"type": "RuntimeDefault"},
        }
    },
    "extra-capabilities": {"agent": {"extraCapabilities": ["NET_ADMIN"]}},
    "nri": {"nri": {"enabled": True, "socketDir": "/run/containerd/nri"}},
    "controller-peering": {"controller": {"replicas": 2, "peering": {"enabled": True}}},
    "image-digest-and-pull-secret": {
        "image": {
            "repository": "registry.example:5000/ops/nodemem",
            "digest": "sha256:" + "a" * 64,
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "platform"},
    },
}


@dataclass
class Rendered:
    objects: list[Obj]
    notes: str

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


def render(values: Obj | None = None, chart: Path = CHART) -> Rendered:
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes)


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


def agent_pod(rendered: Rendered) -> Obj:
    pod: Obj = rendered.one("DaemonSet", AGENT)["spec"]["template"]["spec"]
    return pod


def agent_container(rendered: Rendered) -> Obj:
    (container,) = agent_pod(rendered)["containers"]
    return container  # type: ignore[no-any-return]


def controller_container(rendered: Rendered) -> Obj:
    pod = rendered.one("Deployment", CONTROLLER)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container  # type: ignore[no-any-return]


# --- every object is valid Kubernetes ------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates_strictly(variant: str, version: str) -> None:
    rendered = render(VARIANTS[variant])
    assert rendered.objects
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in NOT_BUILT_IN:
            continue
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_live_in_the_release_namespace_and_carry_the_release_labels(variant: str) -> None:
    for obj in render(VARIANTS[variant]).objects:
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, obj["kind"]
        else:
            assert meta["namespace"] == NAMESPACE, obj["kind"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert len(meta["name"]) <= 63


def test_default_install_creates_exactly_the_expected_objects(default: Rendered) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in default.objects)
    assert kinds == sorted(
        [
            ("ServiceAccount", AGENT),
            ("ServiceAccount", CONTROLLER),
            ("ClusterRole", AGENT),
            ("ClusterRole", CONTROLLER),
            ("ClusterRoleBinding", AGENT),
            ("ClusterRoleBinding", CONTROLLER),
            ("DaemonSet", AGENT),
            ("Deployment", CONTROLLER),
            ("Service", f"{AGENT}-metrics"),
            ("ValidatingAdmissionPolicy", f"{AGENT}-own-report"),
            ("ValidatingAdmissionPolicyBinding", f"{AGENT}-own-report"),
        ]
    )


# --- the agent pod, field by field -----------------------------------------------------


def test_agent_pod_uses_host_pid_but_not_host_network_or_ipc(default: Rendered) -> None:
    pod = agent_pod(default)
    assert pod["hostPID"] is True
    # SysV segments are read by setns() into /proc/PID/ns/ipc (hostPID + SYS_ADMIN).
    assert pod.get("hostIPC", False) is False
    assert pod.get("hostNetwork", False) is False


def test_agent_container_is_root_with_exactly_four_capabilities_and_not_privileged(
    default: Rendered,
) -> None:
    security = agent_container(default)["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 0
    assert security["runAsNonRoot"] is False
    assert security["capabilities"] == {
        "drop": ["ALL"],
        "add": [*AGENT_CAPABILITIES, *DEFAULT_EXTRA_CAPABILITIES],
    }
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    assert "securityContext" not in agent_pod(default)  # nothing pod-wide overrides it


def test_agent_extra_capabilities_are_added_after_the_four() -> None:
    rendered = render(VARIANTS["extra-capabilities"])
    capabilities = agent_container(rendered)["securityContext"]["capabilities"]
    assert capabilities == {"drop": ["ALL"], "add": [*AGENT_CAPABILITIES, "NET_ADMIN"]}


def test_the_nri_plugin_runs_beside_the_agent_without_capabilities() -> None:
    pod = agent_pod(render(VARIANTS["nri"]))
    agent, plugin = pod["containers"]
    assert plugin["name"] == "nri"
    assert plugin["image"] == "nodemem-nri:0.1.0"
    assert plugin["args"] == [
        "-socket",
        "/var/run/nri/nri.sock",
        "-rules",
        "/var/run/nodemem-nri/rules.json",
    ]
    security = plugin["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True and security["privileged"] is False
    assert agent["args"][-2:] == ["--nri-rules-file", "/var/run/nodemem-nri/rules.json"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["nri-socket"]["hostPath"] == {"path": "/run/containerd/nri", "type": "Directory"}
    assert volumes["nri-rules"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert mounts["nri-rules"]["readOnly"] is True
    assert [c["name"] for c in agent_pod(render())["containers"]] == ["agent"]  # off by default


def test_agent_in_the_nodes_network_namespace_resolves_cluster_names_still() -> None:
    pod = agent_pod(render({"agent": {"hostNetwork": True}}))
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "dnsPolicy" not in agent_pod(render())


def test_agent_without_sys_resource_for_nodes_that_cannot_grant_it() -> None:
    rendered = render({"agent": {"omitCapabilities": ["SYS_RESOURCE"]}})
    capabilities = agent_container(rendered)["securityContext"]["capabilities"]
    assert capabilities == {
        "drop": ["ALL"],
        "add": ["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", *DEFAULT_EXTRA_CAPABILITIES],
    }


def test_agent_localhost_seccomp_and_apparmor_profiles_are_passed_through() -> None:
    security = agent_container(render(VARIANTS["localhost-seccomp"]))["securityContext"]
    assert security["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "nodemem-agent.json",
    }
    assert security["appArmorProfile"] == {"type": "RuntimeDefault"}


def test_agent_state_dir_is_a_host_path_created_on_demand(default: Rendered) -> None:
    pod = agent_pod(default)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/nodemem", "type": "DirectoryOrCreate"}
    mounts = {m["name"]: m for m in agent_container(default)["volumeMounts"]}
    assert mounts["state"]["mountPath"] == "/var/lib/nodemem"
    assert not mounts["state"].get("readOnly", False)
    # The only other writable path of the read-only root is a small /tmp.
    assert set(volumes) == {"state", "tmp"}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"]
    assert [v for v in pod["volumes"] if "hostPath" in v] == [volumes["state"]]


def test_agent_state_dir_on_the_host_is_configurable() -> None:
    pod = agent_pod(render({"agent": {"stateDir": "/opt/nodemem/state"}}))
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"]["path"] == "/opt/nodemem/state"


def test_agent_gets_node_name_from_the_downward_api(default: Rendered) -> None:
    env = agent_container(default)["env"]
    assert env == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]


def test_agent_runs_on_every_node_by_default(default: Rendered) -> None:
    pod = agent_pod(default)
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "affinity" not in pod


def test_agent_tolerations_are_configurable() -> None:
    pod = agent_pod(render(VARIANTS["custom-tolerations"]))
    assert pod["tolerations"] == VARIANTS["custom-tolerations"]["agent"]["tolerations"]


def test_agent_is_node_critical_with_requests_and_limits(default: Rendered) -> None:
    assert agent_pod(default)["priorityClassName"] == "system-node-critical"
    resources = agent_container(default)["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) == {"cpu", "memory"}, section


def test_agent_priority_class_can_be_removed() -> None:
    assert "priorityClassName" not in agent_pod(render({"agent": {"priorityClassName": ""}}))


def test_agent_command_line_is_the_documented_one(default: Rendered) -> None:
    container = agent_container(default)
    assert "command" not in container  # the image's entrypoint is `nodemem`
    assert container["args"] == [
        "agent",
        "--host-root",
        "/proc/1/root",
        "--proc-root",
        "/proc",
        "--state-dir",
        "/var/lib/nodemem",
        "--metrics-port",
        "8080",
        "--metrics-host",
        "0.0.0.0",
        "--resync",
        "30",
        "--heartbeat",
        "60",
    ]


def test_agent_dry_run_value_adds_the_dry_run_flag(default: Rendered) -> None:
    assert "--dry-run" not in agent_container(default)["args"]
    args = agent_container(render(VARIANTS["agent-dry-run"]))["args"]
    assert args[-1] == "--dry-run"
    assert args.count("--dry-run") == 1


def test_agent_probes_and_metrics_use_the_metrics_port() -> None:
    container = agent_container(render({"agent": {"metricsPort": 9464}}))
    assert container["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert container["args"][container["args"].index("--metrics-port") + 1] == "9464"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_agent_gets_its_own_token_and_service_account(default: Rendered) -> None:
    pod = agent_pod(default)
    assert pod["serviceAccountName"] == AGENT
    assert pod["automountServiceAccountToken"] is True
    # Only the chart's pods mount the tokens; nothing else using the account gets one.
    assert default.one("ServiceAccount", AGENT)["automountServiceAccountToken"] is False


def test_image_defaults_to_the_app_version_and_prefers_a_digest(default: Rendered) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert agent_container(default)["image"] == f"nodemem:{app_version}"
    rendered = render(VARIANTS["image-digest-and-pull-secret"])
    image = "registry.example:5000/ops/nodemem@sha256:" + "a" * 64
    assert agent_container(rendered)["image"] == image
    assert controller_container(rendered)["image"] == image
    assert agent_pod(rendered)["imagePullSecrets"] == [{"name": "regcred"}]


# --- the controller -----------------------------------------------------------------


def test_controller_is_non_root_read_only_without_capabilities(default: Rendered) -> None:
    deployment = default.one("Deployment", CONTROLLER)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostPID") and not pod.get("hostNetwork") and not pod.get("hostIPC")
    security = controller_container(default)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not [v for v in pod["volumes"] if "hostPath" in v]


def test_controller_runs_one_standalone_replica_never_two_at_once(default: Rendered) -> None:
    deployment = default.one("Deployment", CONTROLLER)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = controller_container(default)
    assert container["args"] == ["controller", "--health-port", "8081"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_controller_peering_adds_the_flag_the_peering_object_and_its_rbac() -> None:
    rendered = render(VARIANTS["controller-peering"])
    deployment = rendered.one("Deployment", CONTROLLER)
    assert deployment["spec"]["replicas"] == 2
    assert "strategy" not in deployment["spec"]
    assert controller_container(rendered)["args"][-2:] == ["--peering", "nodemem"]
    peering = rendered.one("ClusterKopfPeering", "nodemem")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert set(peering) == {"apiVersion", "kind", "metadata"}
    rules = rules_of(rendered, CONTROLLER) - rules_of(render(), CONTROLLER)
    assert rules == {
        ("kopf.dev", "clusterkopfpeerings", "get", "nodemem"),
        ("kopf.dev", "clusterkopfpeerings", "patch", "nodemem"),
        ("kopf.dev", "clusterkopfpeerings", "list", ""),
        ("kopf.dev", "clusterkopfpeerings", "watch", ""),
    }


def test_more_than_one_controller_without_peering_is_refused_even_without_the_schema(
    tmp_path: Path,
) -> None:
    values = {"controller": {"replicas": 2}}
    with pytest.raises(helm.HelmValuesError, match="controller"):
        render(values)
    # `helm install --skip-schema-validation`: the template refuses it too.
    unchecked = tmp_path / "nodemem"
    shutil.copytree(CHART, unchecked)
    (unchecked / "values.schema.json").unlink()
    with pytest.raises(helm.HelmRenderError, match=r"controller\.peering\.enabled"):
        render(values, chart=unchecked)


# --- RBAC ----------------------------------------------------------------------------

Rule = tuple[str, str, str, str]  # (apiGroup, resource, verb, resourceName or "")


def rules_of(rendered: Rendered, role: str) -> set[Rule]:
    flat: set[Rule] = set()
    for rule in rendered.one("ClusterRole", role)["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames", [""]):
                        flat.add((group, resource, verb, name))
    return flat


def expand(group: str, resource: str, *verbs: str) -> set[Rule]:
    return {(group, resource, verb, "") for verb in verbs}


def test_agent_rbac_is_exactly_what_the_agent_needs(default: Rendered) -> None:
    assert rules_of(default, AGENT) == (
        expand("nodemem.dev", "nodememorypolicies", "get", "list", "watch")
        | expand("", "nodes", "get", "list", "watch")
        | expand("", "pods", "list", "watch")
        | expand("nodemem.dev", "nodememoryreports", "create", "get", "patch")
        | expand("nodemem.dev", "nodememoryreports/status", "get", "patch")
        | expand("", "events", "create")
        | expand("events.k8s.io", "events", "create")
    )


def test_controller_rbac_is_exactly_what_the_controller_needs(default: Rendered) -> None:
    assert rules_of(default, CONTROLLER) == (
        expand("nodemem.dev", "nodememorypolicies", "get", "list", "watch")
        | expand("nodemem.dev", "nodememorypolicies/status", "get", "patch")
        | expand("", "nodes", "get", "list", "watch")
        | expand("nodemem.dev", "nodememoryreports", "get", "list", "watch", "delete")
        | expand("", "events", "create")
        | expand("events.k8s.io", "events", "create")
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_rbac_rule_uses_a_wildcard_or_namespaced_roles(variant: str) -> None:
    rendered = render(VARIANTS[variant])
    assert not rendered.all("Role") and not rendered.all("RoleBinding")
    for role in rendered.all("ClusterRole"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (role["metadata"]["name"], rule)
            assert "nonResourceURLs" not in rule


def test_each_cluster_role_is_bound_to_its_own_service_account_only(default: Rendered) -> None:
    for name in (AGENT, CONTROLLER):
        binding = default.one("ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}
        ]
        default.one("ServiceAccount", name)


# --- admission policy, metrics, monitors -----------------------------------------------


def test_admission_policy_is_on_by_default_and_can_be_turned_off(default: Rendered) -> None:
    policy = default.one("ValidatingAdmissionPolicy")
    binding = default.one("ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    rendered = render(VARIANTS["admission-policy-off"])
    assert not rendered.all("ValidatingAdmissionPolicy")
    assert not rendered.all("ValidatingAdmissionPolicyBinding")


def test_metrics_service_is_headless_and_selects_exactly_the_agent_pods(default: Rendered) -> None:
    service = default.one("Service", f"{AGENT}-metrics")
    daemonset = default.one("DaemonSet", AGENT)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == daemonset["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    controller = default.one("Deployment", CONTROLLER)["spec"]["template"]["metadata"]["labels"]
    assert not all(controller.get(k) == v for k, v in service["spec"]["selector"].items())


def test_metrics_off_removes_the_service_but_keeps_the_probe_port() -> None:
    rendered = render(VARIANTS["metrics-off"])
    assert not rendered.all("Service")
    assert agent_container(rendered)["ports"][0]["name"] == "metrics"


def test_service_monitor_scrapes_the_metrics_service() -> None:
    rendered = render(VARIANTS["service-monitor"])
    monitor = rendered.one("ServiceMonitor", AGENT)
    service = rendered.one("Service", f"{AGENT}-metrics")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("60s", "10s")
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in (
        endpoint["relabelings"]
    )
    assert not rendered.all("PodMonitor")


def test_pod_monitor_scrapes_the_agent_pods_directly() -> None:
    rendered = render(VARIANTS["pod-monitor"])
    monitor = rendered.one("PodMonitor", AGENT)
    template = rendered.one("DaemonSet", AGENT)["spec"]["template"]
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
    pod_labels = template["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    (endpoint,) = spec["podMetricsEndpoints"]
    ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"
    assert not rendered.all("ServiceMonitor")


def test_alerts_and_dashboard_are_off_by_default_and_labelled_when_on(default: Rendered) -> None:
    assert not default.all("PrometheusRule") and not default.all("ConfigMap")
    rendered = render(VARIANTS["alerts-and-dashboard"])
    rule = rendered.one("PrometheusRule", AGENT)
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert alerts == [
        "NodememShmemUnaccountedGrowing",
        "NodememTmpfsNearLimit",
        "NodememTmpfsLimitRefused",
        "NodememOOMKills",
    ]
    dashboard = rendered.one("ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "nodes"}
    assert json.loads(dashboard["data"]["nodemem.json"])["uid"] == "nodemem-node-memory"
    # The sidecar's label and namespace are the installer's to choose.
    other = render(
        {
            "metrics": {
                "grafanaDashboard": {
                    "enabled": True,
                    "labels": {"dash": "yes"},
                    "namespace": "grafana",
                }
            }
        }
    ).one("ConfigMap")
    assert other["metadata"]["namespace"] == "grafana"
    assert other["metadata"]["labels"]["dash"] == "yes"


# --- NOTES ---------------------------------------------------------------------------


def example_policy(notes: str) -> str:
    match = re.search(r"<<'EOF'\n(.*?)\n\s*EOF", notes, re.DOTALL)
    assert match, notes
    lines = match.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def test_notes_tell_how_to_apply_an_example_and_read_the_results(default: Rendered) -> None:
    notes = default.notes
    assert "kubectl get nmp,nmr" in notes
    assert f"kubectl label namespace {NAMESPACE} pod-security.kubernetes.io/enforce=privileged" in (
        notes
    )
    (policy,) = load_policies(example_policy(notes))  # valid for nodemem's own models
    assert policy.spec.dry_run is True
    assert f"describe nmp {policy.metadata.name}" in notes
    assert "WARNING" not in notes and "NOTE:" not in notes


def test_notes_warn_about_dry_run_and_a_missing_admission_policy() -> None:
    assert "agent.dryRun=true" in render(VARIANTS["agent-dry-run"]).notes
    assert "any node's agent can write any node's" in render(VARIANTS["admission-policy-off"]).notes


# --- values, schema, lint -------------------------------------------------------------


def schema() -> Obj:
    loaded: Obj = json.loads((CHART / "values.schema.json").read_text())
    return loaded


# Values that break values.schema.json, each with the line of Helm's refusal that names
# the offending field (a JSON pointer into the values) and the broken constraint.
INVALID_VALUES: dict[str, tuple[Obj, str]] = {
    "negative resync": (
        {"agent": {"resyncSeconds": -5}},
        "at '/agent/resyncSeconds': minimum: got -5, want 1",
    ),
    "zero heartbeat": (
        {"agent": {"heartbeatSeconds": 0}},
        "at '/agent/heartbeatSeconds': minimum: got 0, want 1",
    ),
    "unknown top-level key": (
        {"agnet": {"dryRun": True}},
        "at '': additional properties 'agnet' not allowed",
    ),
    "unknown agent key": (
        {"agent": {"privileged": True}},
        "at '/agent': additional properties 'privileged' not allowed",
    ),
    "port zero": (
        {"agent": {"metricsPort": 0}},
        "at '/agent/metricsPort': minimum: got 0, want 1",
    ),
    "port above 65535": (
        {"controller": {"healthPort": 70000}},
        "at '/controller/healthPort': maximum: got 70,000, want 65,535",
    ),
    "port as text": (
        {"agent": {"metricsPort": "http"}},
        "at '/agent/metricsPort': got string, want integer",
    ),
    "metrics host with a space": (
        {"agent": {"metricsHost": "0.0.0.0 --dry-run"}},
        "at '/agent/metricsHost': '0.0.0.0 --dry-run' does not match pattern",
    ),
    "tmpfs ratio above 1": (
        {"metrics": {"prometheusRule": {"tmpfsUsedRatio": 1.5}}},
        "at '/metrics/prometheusRule/tmpfsUsedRatio': maximum: got 1.5, want 1",
    ),
    "dashboard label that is not text": (
        {"metrics": {"grafanaDashboard": {"labels": {"x": 1}}}},
        "at '/metrics/grafanaDashboard/labels/x': got number, want string",
    ),
    "zero replicas": (
        {"controller": {"replicas": 0}},
        "at '/controller/replicas': minimum: got 0, want 1",
    ),
    "two replicas without peering": (
        {"controller": {"replicas": 2}},
        "at '/controller/peering/enabled': value must be true",
    ),
    "capability outside the documented set": (
        {"agent": {"extraCapabilities": ["SYS_MODULE"]}},
        "at '/agent/extraCapabilities/0': value must be one of 'DAC_OVERRIDE', 'FOWNER', "
        "'NET_ADMIN'",
    ),
    "omitting a capability the agent cannot do without": (
        {"agent": {"omitCapabilities": ["SYS_ADMIN"]}},
        "at '/agent/omitCapabilities/0': value must be 'SYS_RESOURCE'",
    ),
    "localhost seccomp without a profile": (
        {"agent": {"seccompProfile": {"type": "Localhost"}}},
        "at '/agent/seccompProfile': missing property 'localhostProfile'",
    ),
    "profile name without localhost": (
        {"agent": {"appArmorProfile": {"type": "Unconfined", "localhostProfile": "x"}}},
        "at '/agent/appArmorProfile': 'not' failed",
    ),
    "unknown toleration operator": (
        {"agent": {"tolerations": [{"operator": "Any"}]}},
        "at '/agent/tolerations/0/operator': value must be one of 'Exists', 'Equal'",
    ),
    "relative state dir": (
        {"agent": {"stateDir": "var/lib/nodemem"}},
        "at '/agent/stateDir': 'var/lib/nodemem' does not match pattern",
    ),
    "state dir climbing out": (
        {"agent": {"stateDir": "/var/lib/../../etc"}},
        "at '/agent/stateDir': 'not' failed",
    ),
    "malformed digest": (
        {"image": {"digest": "sha256:xyz"}},
        "at '/image/digest': 'sha256:xyz' does not match pattern",
    ),
    "bad pull policy": (
        {"image": {"pullPolicy": "Sometimes"}},
        "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
    ),
    "non-boolean dry run": (
        {"agent": {"dryRun": "yes"}},
        "at '/agent/dryRun': got string, want boolean",
    ),
    "scrape interval in words": (
        {"metrics": {"podMonitor": {"interval": "one minute"}}},
        "at '/metrics/podMonitor/interval': 'one minute' does not match pattern",
    ),
    "service monitor without the service": (
        {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
        "at '/metrics/enabled': value must be true",
    ),
    "both monitors": (
        {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
        "at '/metrics/podMonitor/enabled': value must be false",
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_schema_accepts_the_defaults_and_every_variant(variant: str) -> None:
    # Helm first checks values.schema.json against its draft's meta-schema (a broken
    # schema refuses every install), then the values coalesced with values.yaml.
    with helm.Chart.load(CHART) as chart:
        assert chart.schema == schema()  # loaded: a chart without one passes anything
        chart.validate_schema(chart.merge_values(VARIANTS[variant]))
    assert render(VARIANTS[variant]).objects


@pytest.mark.parametrize("case", INVALID_VALUES)
def test_invalid_values_are_refused_by_helm_naming_the_field(case: str) -> None:
    values, problem = INVALID_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)  # Helm checks the schema before it renders anything
    message = str(refused.value)
    assert message.startswith(
        "values don't meet the specifications of the schema(s) in the following chart(s):\n"
        "nodemem:\n"
    ), message
    assert problem in message
    # helm lint reports the same problem as an error.
    report = helm.lint(CHART, values, strict=True)
    assert any(problem in error for error in report["errors"]), report["errors"]


def _documented_paths(lines: list[str]) -> tuple[set[str], set[str]]:
    """(every key path in values.yaml, the paths with a `# --` comment block above)."""
    paths: set[str] = set()
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    comment_block: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        key = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if key:
            indent = len(key.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([*(k for _, k in stack), key.group(2)])
            stack.append((indent, key.group(2)))
            paths.add(path)
            if comment_block and comment_block[0].startswith("# -- "):
                documented.add(path)
        comment_block = []
    return paths, documented


def _schema_paths(node: Obj, prefix: str = "") -> Iterator[tuple[str, Obj]]:
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        yield path, sub
        yield from _schema_paths(sub, f"{path}.")


def test_values_are_documented_key_by_key_and_the_schema_has_nothing_else() -> None:
    paths, documented = _documented_paths((CHART / "values.yaml").read_text().splitlines())

    def covered(path: str) -> bool:  # documented itself, or inside a documented value
        parts = path.split(".")
        return any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1))

    parents = {p.rsplit(".", 1)[0] for p in paths if "." in p}
    # Every key that is not just a group of keys has its own `# --` comment (keys inside a
    # documented value, such as resources.requests.cpu, are that value's example).
    assert sorted(p for p in paths - parents if not covered(p)) == []
    # The schema knows no key that values.yaml does not show or document.
    extra = [p for p, _ in _schema_paths(schema()) if p != "global" and p not in paths]
    assert [p for p in extra if not covered(p)] == []


def test_schema_forbids_keys_values_yaml_does_not_have() -> None:
    def walk(node: Obj, path: str) -> Iterator[str]:
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                yield path
            for key, sub in node["properties"].items():
                if key != "global":
                    yield from walk(sub, f"{path}.{key}")

    # Every object the chart defines closes its key set (typos fail the install);
    # Kubernetes pass-through maps (labels, affinity, resources lists) are left open.
    assert list(walk(schema(), "")) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_is_clean(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_chart_requires_kubernetes_1_30() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0"


# --- CRDs ------------------------------------------------------------------------------


def test_chart_crds_are_identical_to_the_generated_crds() -> None:
    top = REPO / "crds"
    for name in CRD_FILES:
        assert (top / name).is_file(), f"crds/{name} is not generated yet (nodemem crds)"
    top_files = sorted(p.name for p in top.glob("*.yaml"))
    chart_files = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart_files == top_files
    for name in top_files:
        assert (CHART / "crds" / name).read_bytes() == (top / name).read_bytes(), name
    with helm.Chart.load(CHART) as chart:
        assert sorted(c["filename"].rsplit("/", 1)[-1] for c in chart.crds) == top_files


def test_chart_crds_validate_as_kubernetes_crds() -> None:
    files = sorted((CHART / "crds").glob("*.yaml"))
    assert files, "charts/nodemem/crds/ is empty"
    kinds = set()
    for path in files:
        for crd in yaml.safe_load_all(path.read_text()):
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(crd, version, strict=True)
            kinds.add((crd["spec"]["names"]["kind"], crd["spec"]["scope"]))
            assert crd["spec"]["group"] == "nodemem.dev"
    assert kinds == {("NodeMemoryPolicy", "Cluster"), ("NodeMemoryReport", "Cluster")}


# --- the chart and the CLI agree --------------------------------------------------------


@pytest.mark.parametrize("variant", ["defaults", "agent-dry-run", "controller-peering"])
def test_chart_command_lines_are_accepted_by_the_nodemem_cli(variant: str) -> None:
    rendered = render(VARIANTS[variant])
    parser = build_parser()
    agent = parser.parse_args(agent_container(rendered)["args"])
    assert agent.command == "agent"
    assert (agent.host_root, agent.proc_root) == ("/proc/1/root", "/proc")
    assert agent.state_dir is not None and str(agent.state_dir) == "/var/lib/nodemem"
    assert int(agent.metrics_port) == 8080
    assert agent.metrics_host == "0.0.0.0"  # the pod's address: probes and Prometheus
    assert float(agent.resync) == 30 and float(agent.heartbeat) == 60
    assert agent.dry_run is (variant == "agent-dry-run")
    controller = parser.parse_args(controller_container(rendered)["args"])
    assert controller.command == "controller"
    assert int(controller.health_port) == 8081
    assert controller.peering == ("nodemem" if variant == "controller-peering" else None)


# --- the optional Localhost seccomp profile -------------------------------------------

PROFILE = CHART / "files" / "seccomp-nodemem-agent.json"

# Loads the OCI seccomp profile with libseccomp, as runc does, into this (child) process,
# then makes each probe syscall and prints which ones the filter refused (EPERM from it,
# told apart from the kernel's own answer by a marker errno).
_PROBE = r"""
import ctypes, json, sys
MARK = 133  # EHWPOISON: no probe below can get it from the kernel
profile = json.load(open(sys.argv[1]))
lib = ctypes.CDLL(sys.argv[2], use_errno=True)
libc = ctypes.CDLL(None, use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
       "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
ctx = ctypes.c_void_p(lib.seccomp_init(0x7FFF0000))
for rule in profile["syscalls"]:
    assert rule["action"] == "SCMP_ACT_ERRNO" and rule["errnoRet"] == 1
    args = rule.get("args", [])
    array = (Cmp * max(1, len(args)))(*[Cmp(a["index"], OPS[a["op"]], a["value"],
                                          a.get("valueTwo", 0)) for a in args])
    for name in rule["names"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a syscall of this architecture (runc skips it the same way)
        rc = lib.seccomp_rule_add_array(ctx, 0x00050000 | MARK, nr, len(args), array)
        assert rc == 0, (name, rc)
assert lib.seccomp_load(ctx) == 0
def nr(name):
    return lib.seccomp_syscall_resolve_name(name.encode())
probes = {
    "fspick": (nr("fspick"), -100, b"/nonexistent-nodemem", 0),
    "fsconfig": (nr("fsconfig"), -1, 0, None, None, 0),
    "setns": (nr("setns"), -1, 0x08000000),
    "mount MS_REMOUNT": (nr("mount"), None, b"/nonexistent-nodemem", None, 32, None),
    "mount without MS_REMOUNT": (nr("mount"), b"none", b"/nonexistent-nodemem", b"tmpfs", 0, None),
    "umount2": (nr("umount2"), b"/nonexistent-nodemem", 0),
    "unshare": (nr("unshare"), 0),
    "open_by_handle_at": (nr("open_by_handle_at"), -1, None, 0),
    "ptrace": (nr("ptrace"), 12, 0, None, None),  # PTRACE_GETREGS of pid 0: ESRCH
    "process_vm_readv": (nr("process_vm_readv"), 0, None, 0, None, 0, 0),
    "getpid": (nr("getpid"),),
}
refused = []
for name, (number, *args) in probes.items():
    ctypes.set_errno(0)
    c_args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if libc.syscall(ctypes.c_long(number), *c_args) == -1 and ctypes.get_errno() == MARK:
        refused.append(name)
print(json.dumps(refused))
"""


def test_localhost_seccomp_profile_passes_the_remount_syscalls_and_refuses_the_rest() -> None:
    library = ctypes.util.find_library("seccomp")
    if library is None or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("needs libseccomp on x86_64 or aarch64 to compile the profile")
    profile = json.loads(PROFILE.read_text())
    denied = set(profile["syscalls"][0]["names"])
    assert not denied & {"mount", "setns", "fspick", "fsconfig", "clone", "clone3", "execve"}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(PROFILE), library],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {
        "mount without MS_REMOUNT",
        "umount2",
        "unshare",
        "open_by_handle_at",
        "ptrace",
        "process_vm_readv",
    }


def test_localhost_seccomp_profile_is_documented_next_to_it() -> None:
    readme = (CHART / "files" / "README.md").read_text()
    assert "/var/lib/kubelet/seccomp/nodemem-agent.json" in readme
    assert "deny list" in readme
    values = (CHART / "values.yaml").read_text()
    assert "files/seccomp-nodemem-agent.json" in values


def test_chart_version_follows_the_package_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]

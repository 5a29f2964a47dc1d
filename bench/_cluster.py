"""The benches' side of the real control plane (hack/cluster/controlplane.py).

- :func:`private_cluster`: etcd, kube-apiserver and kube-controller-manager of our own in
  a temporary directory (free ports, so it runs beside the tests' and other benches'),
  nodemem's CRDs (``crds/``) applied with the real kubectl, and the chart's
  ServiceAccounts, RBAC and ValidatingAdmissionPolicy rendered by Helm (release
  ``nodemem`` in ``nodemem-system``, as tests/kube/conftest.py does); stopped and deleted
  on exit. :class:`Cluster` issues ServiceAccount tokens (the controller's, and the
  agent's bound to a Pod on its Node, which carries the node claim the admission policy
  checks), writes kubeconfigs for them, and reads the control plane's own memory.
- :class:`Api`: plain REST over HTTPS keep-alive connections, one per thread, so that
  thousands of objects can be created from a thread pool (:func:`in_parallel`).
- :class:`Audit`: the API server's audit log (one JSON line per request stage), read
  incrementally: who sent which request.
- :class:`NodeLeases`: a kubelet's heartbeat (its Lease in ``kube-node-lease``) for
  Nodes that have no kubelet, so that kube-controller-manager's node lifecycle
  controller does not mark them unreachable, taint them and evict their pods (which
  would also revoke a pod-bound token).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack" / "cluster"))
from controlplane import ControlPlane  # noqa: E402

NAMESPACE = "nodemem-system"
RELEASE = "nodemem"
AGENT_SA = "nodemem-agent"
CONTROLLER_SA = "nodemem-controller"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"
CONTROLLER_USER = f"system:serviceaccount:{NAMESPACE}:{CONTROLLER_SA}"
ADMIN_USER = "admin"
BOOTSTRAP_TEMPLATES = (
    "serviceaccounts.yaml",
    "agent-rbac.yaml",
    "controller-rbac.yaml",
    "admission-policy.yaml",
)
POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"
LEASES = "coordination.k8s.io/v1/leases"
NODE_LEASE_NAMESPACE = "kube-node-lease"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
READ_VERBS = frozenset({"get", "list", "watch"})


# ------------------------------------------------------------------------------ REST


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self.message = body.get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {self.message}")


def resource_path(resource: str, name: str | None = None, *, namespace: str | None = None) -> str:
    """``"v1/pods"`` -> ``/api/v1/namespaces/NS/pods[/NAME]``; groups under /apis."""
    *group_version, plural = resource.split("/")
    path = ("/api/" if len(group_version) == 1 else "/apis/") + "/".join(group_version)
    if namespace is not None:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{urllib.parse.quote(name, safe='')}"
    return path


class Api:
    """REST calls over one keep-alive HTTPS connection per thread."""

    def __init__(self, url: str, context: ssl.SSLContext, token: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.context = context
        self.headers = {"Accept": "application/json"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPSConnection:
        connection: http.client.HTTPSConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=60
            )
            self._local.connection = connection
        return connection

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> Any:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException):
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise
        if response.status >= 400:
            try:
                raise ApiError(response.status, json.loads(payload))
            except ValueError:
                raise ApiError(response.status, payload.decode(errors="replace")) from None
        return json.loads(payload) if payload else None

    def create(self, resource: str, obj: dict[str, Any], *, namespace: str | None = None) -> Any:
        return self.request("POST", resource_path(resource, namespace=namespace), obj)

    def get(self, resource: str, name: str, *, namespace: str | None = None) -> Any:
        try:
            return self.request("GET", resource_path(resource, name, namespace=namespace))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(
        self, resource: str, *, namespace: str | None = None, **query: str
    ) -> list[dict[str, Any]]:
        answer = self.request("GET", resource_path(resource, namespace=namespace), query=query)
        items: list[dict[str, Any]] = answer["items"]
        return items

    def patch(
        self,
        resource: str,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
        namespace: str | None = None,
    ) -> Any:
        path = resource_path(resource, name, namespace=namespace)
        if subresource:
            path += f"/{subresource}"
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def service_account_token(
        self,
        namespace: str,
        service_account: str,
        *,
        pod: dict[str, Any] | None = None,
        expiration: int = 3600,
    ) -> str:
        """A TokenRequest; bound to ``pod`` (its name and uid) when given."""
        spec: dict[str, Any] = {"expirationSeconds": expiration}
        if pod is not None:
            spec["boundObjectRef"] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        path = resource_path("v1/serviceaccounts", service_account, namespace=namespace)
        answer = self.request("POST", path + "/token", {"spec": spec})
        token: str = answer["status"]["token"]
        return token


def in_parallel(
    work: Callable[[Any], None], items: Sequence[Any], workers: int
) -> tuple[int, float]:
    """Run ``work`` on every item from ``workers`` threads (each with its own keep-alive
    connection when ``work`` uses one :class:`Api`); (items, seconds). The first failure
    is raised once all have run."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bulk") as pool:
        for _ in pool.map(work, items):
            pass
    return len(items), time.perf_counter() - started


def wait_until(
    predicate: Callable[[], object], *, timeout: float, interval: float = 0.1, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------ audit


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class AuditEvent:
    verb: str
    user: str
    stage: str
    code: int | None
    resource: str  # "group/version/plural" ("v1/nodes"), as the resource names here
    name: str | None
    subresource: str | None
    namespace: str | None
    audit_id: str = ""
    received: float = 0.0  # requestReceivedTimestamp, seconds since the epoch

    @property
    def plural(self) -> str:
        return self.resource.rsplit("/", 1)[-1]


class Audit:
    """The API server's audit log. Positions are byte offsets (:meth:`mark`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def events(self, since: int = 0, until: int | None = None) -> list[AuditEvent]:
        try:
            with open(self.path, "rb") as log:
                log.seek(since)
                data = log.read() if until is None else log.read(max(0, until - since))
        except FileNotFoundError:
            return []
        events = []
        for line in data.splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue  # the last line may still be being written
            ref = raw.get("objectRef") or {}
            group, version = ref.get("apiGroup"), ref.get("apiVersion", "")
            plural = ref.get("resource", "")
            events.append(
                AuditEvent(
                    verb=raw.get("verb", ""),
                    user=(raw.get("user") or {}).get("username", ""),
                    stage=raw.get("stage", ""),
                    code=(raw.get("responseStatus") or {}).get("code"),
                    resource=f"{group}/{version}/{plural}" if group else f"{version}/{plural}",
                    name=ref.get("name"),
                    subresource=ref.get("subresource"),
                    namespace=ref.get("namespace"),
                    audit_id=raw.get("auditID", ""),
                    received=_epoch(raw.get("requestReceivedTimestamp")),
                )
            )
        return events

    def requests(
        self,
        *,
        since: int = 0,
        until: int | None = None,
        user: str | None = None,
        verbs: Iterable[str] | None = None,
        resource: str | None = None,
        subresource: str | None = None,
    ) -> list[AuditEvent]:
        """Completed requests (ResponseComplete: one event per request) matching every
        filter given. A watch completes when it ends; :meth:`watches_open` tells the
        ones that started."""
        wanted = set(verbs) if verbs is not None else None
        return [
            event
            for event in self.events(since, until)
            if event.stage in ("ResponseComplete", "Panic")
            and (user is None or event.user == user)
            and (wanted is None or event.verb in wanted)
            and (resource is None or event.resource == resource)
            and (subresource is None or event.subresource == subresource)
        ]

    def sent(
        self,
        *,
        since: int = 0,
        until: int | None = None,
        user: str | None = None,
    ) -> list[AuditEvent]:
        """Requests as they were sent, each once: a watch when its stream started
        (ResponseStarted; its ResponseComplete, when it ends, is not counted again), any
        other request (and a watch refused before it started) when it completed."""
        return [
            event
            for event in self.events(since, until)
            if (user is None or event.user == user)
            and (
                event.stage == "ResponseStarted"
                or (
                    event.stage in ("ResponseComplete", "Panic")
                    and not (event.verb == "watch" and event.code == 200)
                )
            )
        ]

    def follow(self, since: int = 0) -> AuditTail:
        return AuditTail(self, since)

    def per_user(self, *, since: int = 0, until: int | None = None) -> Counter[str]:
        return Counter(event.user for event in self.requests(since=since, until=until))


class AuditTail:
    """New events as they are written, from a position on (only whole lines)."""

    def __init__(self, audit: Audit, since: int) -> None:
        self.audit = audit
        self.position = since

    def read(self) -> list[AuditEvent]:
        end = self.audit.mark()
        try:
            with open(self.audit.path, "rb") as log:
                log.seek(self.position)
                data = log.read(max(0, end - self.position))
        except FileNotFoundError:
            return []
        whole = data.rfind(b"\n") + 1
        events = self.audit.events(self.position, self.position + whole)
        self.position += whole
        return events


# ------------------------------------------------------------------------------ cluster


def render_bootstrap(values: dict[str, Any] | None = None) -> str:
    """The chart's ServiceAccounts, RBAC and admission policy, rendered by Helm."""
    import helm_python as helm  # noqa: PLC0415  # the venv's; only the parent needs it

    rendered = helm.Chart.load(ROOT / "charts" / "nodemem").render(
        values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return "\n---\n".join(
        text for path, text in sorted(rendered.items()) if Path(path).name in BOOTSTRAP_TEMPLATES
    )


@dataclass
class Memory:
    rss_mib: float
    hwm_mib: float


def proc_memory(pid: int) -> Memory:
    """VmRSS and VmHWM of a process, in MiB (0 when it is gone)."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return Memory(values["VmRSS"], values["VmHWM"])


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            after_comm = file.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # after_comm[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(after_comm[11]) + int(after_comm[12])) / CLK_TCK


class Cluster:
    """A started control plane with nodemem's CRDs and the chart's identities."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.admin = Api(plane.url, plane.ssl_context())
        self.audit = Audit(plane.audit_log)
        self.server_context = ssl.create_default_context(cafile=str(plane.pki / "ca.crt"))

    def kubectl(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(
            [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}", *args],
            input=input,
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def bootstrap(self) -> None:
        crds = str(ROOT / "crds")
        self.kubectl("apply", "--server-side", "-f", crds)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)

        def listable() -> bool:  # Established is not served: 429 until the cache started
            try:
                self.admin.list(POLICIES, limit="1")
                self.admin.list(REPORTS, limit="1")
            except ApiError as error:
                if error.status == 429:
                    return False
                raise
            return True

        wait_until(listable, timeout=60, what="the CRDs' storage")
        self.kubectl("create", "namespace", NAMESPACE)
        self.kubectl("apply", "--server-side", "-f", "-", input=render_bootstrap())

    def as_token(self, token: str) -> Api:
        return Api(self.plane.url, self.server_context, token)

    def controller_token(self, expiration: int = 3600) -> str:
        return self.admin.service_account_token(NAMESPACE, CONTROLLER_SA, expiration=expiration)

    def bound_pod(self, node: str, service_account: str = AGENT_SA) -> dict[str, Any]:
        """A Pod of ``service_account`` on ``node`` (it never runs: there is no kubelet)."""
        pod: dict[str, Any] = self.admin.create(
            "v1/pods",
            {
                "metadata": {"generateName": f"{service_account}-{node}-"[:50]},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": service_account,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "agent", "image": "nodemem:bench"}],
                },
            },
            namespace=NAMESPACE,
        )
        return pod

    def agent_token(self, node: str, expiration: int = 3600) -> str:
        """A token of the chart's agent ServiceAccount bound to a Pod on ``node`` (which
        must exist): it carries the node-name claim the admission policy checks."""
        pod = self.bound_pod(node)
        return self.admin.service_account_token(NAMESPACE, AGENT_SA, pod=pod, expiration=expiration)

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        text = (
            self.plane.kubeconfig_for("admin")
            if token is None
            else self.plane.token_kubeconfig(token)
        )
        path.write_text(text)
        path.chmod(0o600)
        return path

    def memory(self) -> dict[str, Memory]:
        """VmRSS/VmHWM of etcd, kube-apiserver and kube-controller-manager."""
        return {name: proc_memory(self.plane.pids[name]) for name in CONTROL_PLANE}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of etcd, kube-apiserver and kube-controller-manager."""
        return {name: process_cpu_seconds(self.plane.pids[name]) for name in CONTROL_PLANE}

    def wait_for_service_account(self, namespace: str, name: str, timeout: float = 60) -> None:
        """The ServiceAccount admission refuses pods until the controller manager made it."""
        wait_until(
            lambda: self.admin.get("v1/serviceaccounts", name, namespace=namespace) is not None,
            timeout=timeout,
            what=f"ServiceAccount {namespace}/{name}",
        )


def control_plane_lines(
    memory: dict[str, Memory], cpu: dict[str, float] | None = None
) -> list[str]:
    """What the control plane itself cost: peak RSS, and CPU time when given."""
    total = sum(m.hwm_mib for m in memory.values())
    parts = ", ".join(f"{name} {m.hwm_mib:.0f}" for name, m in memory.items())
    lines = [f"control plane peak RSS (VmHWM): {total:.0f} MiB in all ({parts} MiB)"]
    if cpu is not None:
        spent = ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())
        lines.append(f"control plane CPU since it started: {sum(cpu.values()):.1f} s ({spent} s)")
    return lines


@contextmanager
def private_cluster(prefix: str = "nodemem-bench-cluster-") -> Iterator[Cluster]:
    """A control plane of our own below a temporary directory; stopped and deleted after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    plane = ControlPlane(root)
    started = time.monotonic()
    try:
        plane.up()
        cluster = Cluster(plane)
        cluster.bootstrap()
        print(
            f"control plane (etcd, kube-apiserver, kube-controller-manager) at {plane.url}, "
            f"CRDs and the chart's RBAC applied in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        yield cluster
    finally:
        plane.down()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ kubelet


def _now() -> str:
    """A MicroTime, as Leases carry."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeLeases:
    """What a kubelet does to stay Ready: renew its Node's Lease in kube-node-lease (every
    ``interval`` s; a kubelet's is 10 s, the node controller's grace period 50 s), spread
    over the interval. Nodes are :meth:`add`-ed as they are created (their Lease with
    them); each renewal is one admin request, the admin's in the audit log."""

    def __init__(self, api: Api, interval: float, workers: int = 4) -> None:
        self.api = api
        self.interval = interval
        self.workers = workers
        self.renewals = 0
        self.failures: list[str] = []
        self._nodes: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, uid: str) -> None:
        """Create the Node's Lease (owned by it, as the kubelet's) and renew it from now."""
        owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}
        lease = {
            "metadata": {"name": name, "ownerReferences": [owner]},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now()},
        }
        self.api.create(LEASES, lease, namespace=NODE_LEASE_NAMESPACE)
        with self._lock:
            self._nodes.append(name)

    def _renew(self, name: str) -> None:
        try:
            patch = {"spec": {"renewTime": _now()}}
            self.api.patch(LEASES, name, patch, namespace=NODE_LEASE_NAMESPACE)
        except (ApiError, OSError) as error:
            with self._lock:
                self.failures.append(f"{name}: {error}")
        else:
            with self._lock:
                self.renewals += 1

    def _run(self) -> None:
        tick, next_at = 0, time.monotonic()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="lease") as pool:
            while not self._stop.is_set():
                # A tenth of the nodes each tenth of the interval: each renewed once per
                # interval (a new one at most an interval after its creation). Behind
                # schedule, the renewals slow down rather than skip a node.
                with self._lock:
                    due = self._nodes[tick::10]
                list(pool.map(self._renew, due))
                tick = (tick + 1) % 10
                next_at += self.interval / 10
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> NodeLeases:
        self._thread = threading.Thread(target=self._run, name="node-leases", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

"""The benches' side of the real control plane (hack/cluster/controlplane.py).

- :func:`private_cluster`: etcd, kube-apiserver and kube-controller-manager of our own in
  a temporary directory (free ports, so it runs beside the tests' and other benches'),
  with nodemem's CRDs and the chart's identities installed as for the tests
  (hack/cluster/nodemem_setup.py); stopped and deleted on exit. :class:`Cluster` issues
  ServiceAccount tokens, writes kubeconfigs for them, and reads the control plane's own
  memory and CPU time.
- The REST client and the audit log reader are hack/cluster/restclient.py's (one
  keep-alive connection per thread, so :func:`in_parallel` can create thousands of
  objects from a thread pool).
- :class:`NodeLeases`: a kubelet's heartbeat (its Lease in ``kube-node-lease``) for
  Nodes that have no kubelet, so that kube-controller-manager's node lifecycle
  controller does not mark them unreachable, taint them and evict their pods (which
  would also revoke a pod-bound token).
"""

from __future__ import annotations

import os
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack" / "cluster"))
import nodemem_setup  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from nodemem_setup import AGENT_USER, CONTROLLER_USER, install_nodemem  # noqa: E402
from restclient import (  # noqa: E402
    ApiError,
    AuditEvent,
    AuditLog,
    Kube,
    wait_until,
)

LEASES = "coordination.k8s.io/v1/leases"
NODE_LEASE_NAMESPACE = "kube-node-lease"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager")


# ------------------------------------------------------------------------------ cluster


def in_parallel(
    work: Callable[[Any], None], items: Sequence[Any], workers: int
) -> tuple[int, float]:
    """Run ``work`` on every item from ``workers`` threads (each with its own keep-alive
    connection when ``work`` uses one :class:`Kube`); (items, seconds). The first failure
    is raised once all have run."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bulk") as pool:
        for _ in pool.map(work, items):
            pass
    return len(items), time.perf_counter() - started


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
        self.admin = Kube(plane.url, plane.ssl_context())
        self.audit = AuditLog(plane.audit_log)
        self.server_context = ssl.create_default_context(cafile=str(plane.pki / "ca.crt"))

    def as_token(self, token: str) -> Kube:
        return Kube(self.plane.url, self.server_context, token=token)

    def controller_token(self, expiration: int = 3600) -> str:
        return nodemem_setup.controller_token(self.admin, expiration=expiration)

    def agent_token(self, node: str, expiration: int = 3600) -> str:
        """A token of the chart's agent ServiceAccount bound to a Pod on ``node`` (which
        must exist): it carries the node-name claim the admission policy checks."""
        return nodemem_setup.agent_token(self.admin, node, expiration=expiration)

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
            lambda: (
                self.admin.get_object("v1/serviceaccounts", name, namespace=namespace) is not None
            ),
            timeout=timeout,
            message=f"ServiceAccount {namespace}/{name}",
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
        install_nodemem(plane)
        cluster = Cluster(plane)
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

    def __init__(self, api: Kube, interval: float, workers: int = 4) -> None:
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
        self.api.create_object(LEASES, lease, namespace=NODE_LEASE_NAMESPACE)
        with self._lock:
            self._nodes.append(name)

    def _renew(self, name: str) -> None:
        try:
            patch = {"spec": {"renewTime": _now()}}
            self.api.patch_object(LEASES, name, patch, namespace=NODE_LEASE_NAMESPACE)
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


# What the benches import from here, besides this module's own.
__all__ = ["AGENT_USER", "CONTROLLER_USER", "ApiError", "AuditEvent", "AuditLog", "Kube"]

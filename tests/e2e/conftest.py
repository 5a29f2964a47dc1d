"""Fixtures for the end-to-end tier: this machine as a real Node (hack/node/node.py).

- ``plane`` (module): a control plane of its own (hack/cluster/controlplane.py), so that
  the Kubernetes tier's outages and clean-ups never reach this node.
- ``node`` (module): containerd, kubelet, kube-proxy and kube-scheduler from upstream,
  the images built here and imported (nothing pulled); removed at the end, containers,
  mounts, cgroups, network and iptables chains included. Module scope: the node is gone
  before the next tier's tests, which must not meet a kubelet and an agent pod.
- ``kube``: the admin's :class:`restclient.Kube`; ``kubectl(*args)`` runs the real
  kubectl as the admin and returns its output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "hack" / "cluster"), str(ROOT / "hack" / "node")]
import nodemem_setup  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from node import Node  # noqa: E402
from restclient import Kube  # noqa: E402


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("e2e-plane"))
    try:
        plane.up()
        yield plane
    finally:
        plane.down()


@pytest.fixture(scope="module")
def node(plane: ControlPlane) -> Iterator[Node]:
    node = Node(plane)
    try:
        node.up()
        yield node
    finally:
        pids = dict(node.pids)
        node.down()
        node.pids = pids  # to check that each of them has ended
        left = node.leftovers()
        assert not left, f"the node left: {left}"


@pytest.fixture(scope="module")
def kube(plane: ControlPlane, node: Node) -> Kube:
    return Kube(plane.url, plane.ssl_context())


@pytest.fixture(scope="module")
def kubectl(plane: ControlPlane, node: Node) -> Callable[..., str]:
    def run(*args: str, stdin: str | None = None) -> str:
        return nodemem_setup.kubectl(plane, *args, input=stdin)

    return run

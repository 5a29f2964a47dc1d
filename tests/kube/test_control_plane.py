"""The control-plane harness itself (hack/cluster/controlplane.py, `make cluster-up`).

Its own control plane in a temporary directory, apart from the session's: `up` twice is
one start, `down` stops every process and deletes the data, and the binaries are the
pinned release.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from controlplane import KUBE_VERSION, ControlPlane, alive
from restclient import wait_until

from conftest import ROOT

SCRIPT = ROOT / "hack" / "cluster" / "controlplane.py"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_up_is_idempotent_and_down_removes_everything(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    try:
        first = cli("up", "--dir", str(root))
        assert first.returncode == 0, first.stderr
        assert "control plane ready at https://127.0.0.1:" in first.stdout
        plane = ControlPlane(root)
        pids = dict(plane.pids)
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert (root / "admin.kubeconfig").is_file()

        second = cli("up", "--dir", str(root))
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
        assert ControlPlane(root).pids == pids

        # kubectl with the written kubeconfig is the admin (system:masters).
        who = subprocess.run(
            [
                str(plane.kubectl),
                f"--kubeconfig={root / 'admin.kubeconfig'}",
                "auth",
                "whoami",
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        user = json.loads(who.stdout)["status"]["userInfo"]
        assert user["username"] == "admin"
        assert "system:masters" in user["groups"]
    finally:
        down = cli("down", "--dir", str(root))
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in pids.values())
    assert not (root / "data").exists()
    assert cli("status", "--dir", str(root)).returncode == 1
    # A second down is a no-op too.
    assert cli("down", "--dir", str(root)).returncode == 0


def test_server_and_kubectl_are_the_pinned_release(control_plane: ControlPlane) -> None:
    with urllib.request.urlopen(
        f"{control_plane.url}/version", context=control_plane.ssl_context(), timeout=10
    ) as response:
        server = json.load(response)
    assert server["gitVersion"] == KUBE_VERSION
    client = subprocess.run(
        [str(control_plane.kubectl), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(client.stdout)["clientVersion"]["gitVersion"] == KUBE_VERSION


def test_pinned_release_is_the_one_go_mod_requires() -> None:
    go_mod = (ROOT / "hack" / "cluster" / "go.mod").read_text()
    assert re.search(rf"^\s*(require )?k8s.io/kubernetes {re.escape(KUBE_VERSION)}$", go_mod, re.M)
    staging = KUBE_VERSION.replace("v1.", "v0.", 1)
    replaced = [line for line in go_mod.splitlines() if "=>" in line]
    assert replaced and all(line.rstrip().endswith(staging) for line in replaced)


def test_restarted_apiserver_brings_back_a_controller_manager_that_exited(
    tmp_path: Path,
) -> None:
    # kube-controller-manager exits for good when the API goes away while it is still
    # building its controllers (seen when a test stopped kube-apiserver seconds after
    # the session's start: the garbage collector never ran again). Its exit is made
    # certain here by ending it during the outage.
    plane = ControlPlane(tmp_path / "cluster")
    try:
        plane.up()
        first = plane.pids["kube-controller-manager"]
        plane.stop_apiserver()
        os.kill(first, signal.SIGKILL)  # our own child, by its pid
        wait_until(lambda: not alive(first), timeout=10, message="the manager's exit")

        plane.start_apiserver()
        second = plane.pids["kube-controller-manager"]
        assert second != first
        assert alive(second)
        assert ControlPlane(tmp_path / "cluster").pids["kube-controller-manager"] == second
    finally:
        plane.down()
    assert not alive(second)

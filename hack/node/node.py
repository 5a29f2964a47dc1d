"""This machine as a real Node of the control plane from `make cluster-up`.

``up`` builds what is missing (the control plane's module builds kubelet, kube-proxy and
kube-scheduler from the same k8s.io/kubernetes pin; hack/node/build.py builds containerd),
builds and imports the images (hack/node/images.py: nothing comes from a registry), and
starts containerd, kubelet, kube-proxy and kube-scheduler, returning when the Node is
Ready. ``down`` stops them and removes what they made: pods' containers and mounts,
network namespaces, the bridge, iptables chains, kubepods cgroups, the Node object.
Everything lives below ``.cluster/node`` but the kubelet's cgroups (``kubepods`` in each
v1 hierarchy), the bridge ``nodemem0`` and the iptables chains kube-proxy and the CNI
plugins add, which ``down`` removes.

    python hack/node/node.py up|down|status
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO / "hack" / "cluster"), str(HERE)]

import build as node_build  # noqa: E402  (hack/node/build.py: containerd)
import images  # noqa: E402  (hack/node/images.py)
from controlplane import (  # noqa: E402
    BIN,
    DEFAULT_DIR,
    ControlPlane,
    alive,
    free_port,
    runs,
    stop_process,
)

NODE_NAME = "nodemem-node"
BRIDGE = "nodemem0"
CNI_NETWORK = "nodemem-node"
POD_SUBNET = "10.88.0.0/16"
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
RUNC = Path("/usr/sbin/runc")  # Debian's runc
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
DEBIAN_PACKAGES = ("runc", "containernetworking-plugins", "iptables", "buildah", "mmdebstrap")
CGROUP_V1 = Path("/sys/fs/cgroup")
# One kubelet per machine (kubepods cgroups, the bridge, iptables chains are shared):
# which node's it is.
MARKER = Path("/tmp/nodemem-node.json")
# Order matters for stopping: the kubelet first (it would restart what we stop), the
# runtime last.
PROCESSES = ("kubelet", "kube-proxy", "kube-scheduler", "containerd")


def ensure_debian_packages() -> None:
    """What the node needs from Debian's packages, installed when missing."""
    missing = [p for p in DEBIAN_PACKAGES if not _package_installed(p)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)


def _package_installed(name: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and result.stdout.endswith(" installed")


@dataclass
class Node:
    """The node below ``plane.root / "node"``; its processes in ``state.json``."""

    plane: ControlPlane
    name: str = NODE_NAME
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(self._state.read_text())
            self.pids = {k: int(v) for k, v in state.get("pids", {}).items()}
            self.ports = {k: int(v) for k, v in state.get("ports", {}).items()}

    # --- paths ----------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.plane.root / "node"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def nri_socket(self) -> Path:
        return self.root / "containerd" / "nri" / "nri.sock"

    @property
    def shim_sockets(self) -> Path:
        """The shims' sockets: a short path (at most 42 characters), one per node root."""
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:10]
        return Path(f"/tmp/nodemem-shim-{digest}")

    @property
    def kubelet_root(self) -> Path:
        """The kubelet's --root-dir: pods' volumes are below ``pods/UID/volumes``."""
        return self.root / "kubelet"

    @property
    def _state(self) -> Path:
        return self.root / "state.json"

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._state.write_text(json.dumps({"pids": self.pids, "ports": self.ports}, indent=1))

    # --- lifecycle --------------------------------------------------------------------

    def running(self) -> bool:
        return all(name in self.pids and alive(self.pids[name]) for name in PROCESSES)

    def up(self, timeout: float = 180.0) -> bool:
        """Start the node unless it runs; False when it already did. Raises with the
        component's log tail when one does not come up."""
        if self.running():
            return False
        other = _other_node(self.root)
        if other is not None:
            raise SystemExit(
                f"another node runs on this machine (below {other}): one kubelet per machine;"
                " stop it first (`make node-down`, or end its test session)"
            )
        if not self.plane.running():
            raise SystemExit("the control plane is not running: `make cluster-up` first")
        if self.plane.address is None:
            raise SystemExit("the control plane listens on 127.0.0.1 only: pods cannot reach it")
        self.down()
        ensure_debian_packages()

        node_build.build(self.plane.bin_dir, quiet=True)
        archives = images.build_images(self.plane.root / "images")
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._issue_certificates()
        self.ports = {
            name: free_port()
            for name in (
                "kubelet",
                "kubelet-healthz",
                "proxy-healthz",
                "proxy-metrics",
                "scheduler",
            )
        }
        deadline = time.monotonic() + timeout
        self._start("containerd", ["--config", str(self._containerd_config())])
        self._wait(lambda: self._ctr("version").returncode == 0, "containerd", deadline)
        for archive in archives.values():
            self._ctr("images", "import", "--all-platforms", str(archive), check=True)
        self._start("kube-scheduler", self._scheduler_args())
        self._start("kube-proxy", ["--config", str(self._proxy_config())])
        self._start("kubelet", self._kubelet_args())
        MARKER.write_text(json.dumps({"root": str(self.root), "kubelet": self.pids["kubelet"]}))
        self._wait(self.ready, "kubelet", deadline)
        return True

    def ready(self) -> bool:
        result = subprocess.run(
            [
                str(self.plane.kubectl),
                f"--kubeconfig={self.plane.kubeconfig}",
                "get",
                "node",
                self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() == "True"

    def down(self) -> None:
        """Stop everything and remove what it left; idempotent."""
        self._remove_containers()
        for name in PROCESSES:
            self._stop(name)
        self.pids = {}
        if (self.plane.bin_dir / "kube-proxy").exists():
            subprocess.run(
                [str(self.plane.bin_dir / "kube-proxy"), "--cleanup"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        self._end_stray_processes()
        self._remove_network()
        self._remove_logs()
        _unmount_below(self.root)
        self._remove_cgroups()
        if self.plane.running():
            subprocess.run(
                [
                    str(self.plane.kubectl),
                    f"--kubeconfig={self.plane.kubeconfig}",
                    "delete",
                    "node",
                    self.name,
                    "--ignore-not-found",
                    "--wait=false",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.shim_sockets, ignore_errors=True)
        if _other_node(self.root) is None:
            MARKER.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """What of a node is still on this machine (empty after ``down``)."""
        found = [f"process {name} ({pid})" for name, pid in self.pids.items() if alive(pid)]
        found += [f"process {pid} (a shim or in kubepods)" for pid in self._stray_processes()]
        if (
            subprocess.run(
                ["ip", "link", "show", BRIDGE], capture_output=True, check=False
            ).returncode
            == 0
        ):
            found.append(f"bridge {BRIDGE}")
        for command in ("iptables-save", "ip6tables-save"):
            saved = subprocess.run([command], capture_output=True, text=True, check=False).stdout
            found += [
                f"{command}: chain {line[1:].split()[0]}"
                for line in saved.splitlines()
                if line.startswith((":KUBE-", ":CNI-"))
            ]
        found += [f"cgroup {p}" for p in CGROUP_V1.glob("*/kubepods") if p.is_dir()]
        prefix = str(self.root) + "/"
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4].startswith(prefix):
                found.append(f"mount {line.split()[4]}")
        links = Path("/var/log/containers")
        if links.is_dir():
            found += [
                f"log link {link}"
                for link in links.iterdir()
                if link.is_symlink() and os.readlink(link).startswith(prefix)
            ]
        for path in (self.root, self.shim_sockets):
            if path.exists():
                found.append(f"directory {path}")
        return found

    # --- processes --------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [str(self.plane.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": f"{self.plane.bin_dir}:{os.environ.get('PATH', '')}"},
            )
        self.pids[name] = process.pid
        self._save()

    def _stop(self, name: str, timeout: float = 20.0) -> None:
        pid = self.pids.pop(name, None)
        if pid is not None:
            stop_process(pid, name, timeout)

    def _wait(self, condition: Any, name: str, deadline: float) -> None:
        while not condition():
            if name in self.pids and not alive(self.pids[name]):
                raise RuntimeError(f"{name} exited:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready:\n{self.tail(name)}")
            time.sleep(0.25)

    def tail(self, name: str, lines: int = 40) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ctr(self, *args: str) -> str:
        """containerd's `ctr` in the kubelet's namespace (k8s.io); its output."""
        return self._ctr(*args, check=True).stdout

    def _ctr(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(self.plane.bin_dir / "ctr"),
                "--address",
                str(self.containerd_socket),
                "-n",
                "k8s.io",
                *args,
            ],
            capture_output=True,
            text=True,
            check=check,
        )

    # --- configuration ----------------------------------------------------------------

    def _issue_certificates(self) -> None:
        pki = self.plane.pki
        clients = (
            f"system:node:{self.name}=system:nodes",
            "system:kube-scheduler=",
            "system:kube-proxy=",
        )
        args = [str(self.plane.bin_dir / "pki"), "-dir", str(pki)]
        for client in clients:
            args += ["-client", client]
        subprocess.run(args, check=True)
        for client in clients:
            user = client.split("=")[0].replace(":", "-")
            path = self.root / f"{user}.kubeconfig"
            path.write_text(self.plane.kubeconfig_for(user))
            path.chmod(0o600)

    def _kubeconfig(self, user: str) -> Path:
        return self.root / f"{user.replace(':', '-')}.kubeconfig"

    def _containerd_config(self) -> Path:
        base = self.root / "containerd"
        for sub in ("root", "state", "cni-conf", "nri"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "cni-conf" / "10-nodemem.conflist").write_text(
            json.dumps(self._cni_config(), indent=1)
        )
        config = f"""version = 3
root = "{base / "root"}"
state = "{base / "state"}"
temp = "{base / "tmp"}"
imports = []  # not /etc/containerd/conf.d
oom_score = 0
disabled_plugins = ["io.containerd.internal.v1.opt"]  # it would make /opt/containerd

[grpc]
  address = "{self.containerd_socket}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{base / "certs.d"}"

[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = true
  # Without CAP_SYS_RESOURCE (this machine) no value below containerd's own can be set:
  # the sandbox's -998 would fail every pod; clamped to containerd's 0 instead.
  restrict_oom_score_adj = {str(lacks_sys_resource()).lower()}
  cdi_spec_dirs = ["{base / "cdi"}"]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = "{self.plane.bin_dir / "containerd-shim-runc-v2"}"
      sandboxer = "podsandbox"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{base / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN}"]
    conf_dir = "{base / "cni-conf"}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.nri.v1.nri"]
  disable = false
  socket_path = "{self.nri_socket}"
  plugin_path = "{base / "nri" / "plugins"}"
  plugin_config_path = "{base / "nri" / "conf.d"}"

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "{self.shim_sockets}"

[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = "{base / "image-verifier"}"

[plugins."io.containerd.transfer.v1.local"]
  config_path = "{base / "certs.d"}"
"""
        path = base / "config.toml"
        path.write_text(config)
        return path

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.root / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _kubelet_args(self) -> list[str]:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine is cgroup v1, which kubelet ≥ 1.35 refuses unless told.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",  # no systemd here
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": "0.0.0.0",
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet-healthz"],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            # The machine's disk and memory are shared with everything else: evict late.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "rotateCertificates": False,
            "podLogsDir": str(self.root / "pod-logs"),
        }
        path = self.root / "kubelet.yaml"
        path.write_text(json.dumps(config, indent=1))
        return [
            f"--config={path}",
            f"--kubeconfig={self._kubeconfig(f'system:node:{self.name}')}",
            f"--root-dir={self.kubelet_root}",
            f"--cert-dir={self.root / 'kubelet-pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.plane.address}",
            "--v=2",
        ]

    def _proxy_config(self) -> Path:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self._kubeconfig("system:kube-proxy"))},
            "mode": "iptables",
            "hostnameOverride": self.name,
            "clusterCIDR": POD_SUBNET,
            "healthzBindAddress": f"127.0.0.1:{self.ports['proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.ports['proxy-metrics']}",
            # Leave the machine's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }
        path = self.root / "kube-proxy.yaml"
        path.write_text(json.dumps(config, indent=1))
        return path

    def _scheduler_args(self) -> list[str]:
        return [
            f"--kubeconfig={self._kubeconfig('system:kube-scheduler')}",
            f"--authentication-kubeconfig={self._kubeconfig('system:kube-scheduler')}",
            f"--authorization-kubeconfig={self._kubeconfig('system:kube-scheduler')}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}",
        ]

    # --- clean-up ---------------------------------------------------------------------

    def _remove_containers(self) -> None:
        """Every task containerd runs, killed; the shims exit with them."""
        if not self.containerd_socket.exists() or "containerd" not in self.pids:
            return
        tasks = self._ctr("tasks", "list", "-q").stdout.split()
        for task in tasks:
            self._ctr("tasks", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            self._ctr("tasks", "delete", "-f", task)
        for container in self._ctr("containers", "list", "-q").stdout.split():
            self._ctr("containers", "delete", container)

    def _stray_processes(self) -> list[int]:
        """What outlived containerd (it died, or a task would not die): our shims, by
        their executable's path, and the processes in the kubelet's kubepods cgroups."""
        shim = str(self.plane.bin_dir / "containerd-shim-runc-v2")
        pids: set[int] = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "exe").removesuffix(" (deleted)") == shim:
                        pids.add(int(entry.name))
        for procs in (CGROUP_V1 / "memory" / "kubepods").rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
        return sorted(pids)

    def _end_stray_processes(self) -> None:
        for pid in self._stray_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._stray_processes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _remove_network(self) -> None:
        subprocess.run(["ip", "link", "delete", BRIDGE], stderr=subprocess.DEVNULL, check=False)
        # libcni's result cache cannot be moved: our network's and our sandboxes' go.
        sandboxes = self.root / "containerd" / "state" / "io.containerd.grpc.v1.cri" / "sandboxes"
        ids = [entry.name for entry in sandboxes.iterdir()] if sandboxes.is_dir() else []
        results = Path("/var/lib/cni/results")
        if results.is_dir():
            for cached in results.iterdir():
                if cached.name.startswith(f"{CNI_NETWORK}-") or any(i in cached.name for i in ids):
                    cached.unlink(missing_ok=True)
            for directory in (results, results.parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only when empty: another runtime's stay
        netns = Path("/var/run/netns")
        if netns.is_dir():
            for entry in netns.glob("cni-*"):
                subprocess.run(
                    ["ip", "netns", "delete", entry.name], stderr=subprocess.DEVNULL, check=False
                )
        # What kube-proxy --cleanup leaves: the kubelet's own chains (KUBE-FIREWALL drops
        # non-local packets to 127/8, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT), and the
        # bridge plugin's ipMasq chains (CNI-…) of a sandbox not torn down.
        for command in ("iptables", "ip6tables"):
            for table in ("filter", "nat", "mangle"):
                _remove_chains(command, table, ("KUBE-", "CNI-"))

    def _remove_logs(self) -> None:
        """The kubelet's links in /var/log/containers (a fixed path) to our pods' logs."""
        links = Path("/var/log/containers")
        if not links.is_dir():
            return
        ours = str(self.root) + "/"
        for link in links.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(ours):
                    link.unlink()

    def _remove_cgroups(self) -> None:
        """The kubelet's kubepods (and its QoS children) in every v1 hierarchy, deepest
        first; a cgroup with a task left in it stays, and is named."""
        for hierarchy in CGROUP_V1.iterdir():
            top = hierarchy / "kubepods"
            if not top.is_dir():
                continue
            for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if directory.is_dir():
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def _other_node(root: Path) -> str | None:
    """The root of a node other than ``root`` whose kubelet runs on this machine."""
    try:
        marker = json.loads(MARKER.read_text())
        other, pid = str(marker["root"]), int(marker["kubelet"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return other if other != str(root) and alive(pid) and runs(pid, "kubelet") else None


def _remove_chains(command: str, table: str, prefixes: tuple[str, ...]) -> None:
    """Chains named with `prefixes` in `table`: the rules jumping to them, then the chains."""
    saved = subprocess.run(
        [f"{command}-save", "-t", table], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    chains = [line[1:].split()[0] for line in saved if line.startswith(":")]
    ours = [chain for chain in chains if chain.startswith(prefixes)]
    if not ours:
        return
    for line in saved:
        if not line.startswith("-A "):
            continue
        rule = shlex.split(line)[1:]
        if rule[0] not in ours and "-j" in rule and rule[rule.index("-j") + 1] in ours:
            subprocess.run([command, "-t", table, "-D", *rule], check=False)
    for flag in ("-F", "-X"):
        for chain in ours:
            subprocess.run(
                [command, "-t", table, flag, chain], stderr=subprocess.DEVNULL, check=False
            )


def lacks_sys_resource() -> bool:
    """Whether this machine's capability bounding set lacks CAP_SYS_RESOURCE (no process
    here can have it, so no container either)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return not int(line.split()[1], 16) & (1 << 24)  # CAP_SYS_RESOURCE
    return True


def _unmount_below(root: Path) -> None:
    """Every mount below ``root``, deepest first (lazily: a busy one goes when freed)."""
    prefix = str(root.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="the control plane's directory"
    )
    args = parser.parse_args(argv)
    node = Node(ControlPlane(args.dir, BIN))
    if args.command == "up":
        started = time.monotonic()
        if node.up():
            print(f"node {node.name} ready in {time.monotonic() - started:.1f} s")
        else:
            print(f"node {node.name} already running")
    elif args.command == "down":
        node.down()
        left = node.leftovers()
        if left:
            print("left on this machine:\n  " + "\n  ".join(left), file=sys.stderr)
            return 1
    else:
        print("running" if node.running() and node.ready() else "not running")
    return 0


if __name__ == "__main__":
    sys.exit(main())

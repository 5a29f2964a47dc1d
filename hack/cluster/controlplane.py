"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

The binaries are built from the pinned upstream modules in this folder's go.mod into
``BIN`` (``.cluster/bin``), again only when the pins or the sources change. ``up`` starts
the three on 127.0.0.1 (free ports) below a state directory, returns when ``/readyz`` is
ok and writes ``admin.kubeconfig`` (a client certificate in system:masters); ``down``
stops them and deletes their data. Both are idempotent, and a second ``up`` while one runs
is a no-op. ``make cluster-up`` / ``make cluster-down`` and the tests' session fixture
(tests/kube/conftest.py) use this same module. Standard library only: it runs before the
venv exists.

    python hack/cluster/controlplane.py build|up|down|status [--dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = REPO / ".cluster" / "bin"
DEFAULT_DIR = REPO / ".cluster"
KUBE_VERSION = "v1.37.2"
COMMANDS = {
    "etcd": "./etcd",
    "pki": "./pki",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    # The node (hack/node): the same release.
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
}
# Client certificates the harness issues: the admin (system:masters) and the controller
# manager's own identity, which the built-in RBAC roles name.
CLIENTS = ("admin=system:masters", "system:kube-controller-manager=")
SERVICE_CIDR = "10.0.0.0/24"


def _ldflags() -> str:
    major, minor = KUBE_VERSION[1:].split(".")[:2]
    flags = ["-s", "-w"]
    # What `kubectl version` and the server's /version report (helm reads the latter).
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={KUBE_VERSION}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return " ".join(flags)


def go_build(
    module: Path,
    bin_dir: Path,
    groups: dict[tuple[str, ...], dict[str, str]],
    *,
    ldflags: str,
    stamp: str,
    label: str,
    quiet: bool = False,
) -> bool:
    """Build Go commands (per group of build tags: name -> package) of the module in
    ``module`` into ``bin_dir``, unless the ``stamp`` file there holds the key of the
    module's sources, the flags and the commands; True when it built. Shared with
    hack/node/build.py."""
    digest = hashlib.sha256(ldflags.encode())
    digest.update(repr(sorted(groups.items())).encode())
    nested = {m.parent for m in module.rglob("go.mod") if m.parent != module}  # not ours
    for path in sorted(module.rglob("*")):
        if nested.intersection(path.parents):
            continue
        if path.suffix in {".go", ".mod", ".sum"} and path.is_file():
            digest.update(str(path.relative_to(module)).encode())
            digest.update(path.read_bytes())
    key = digest.hexdigest()
    names = [name for commands in groups.values() for name in commands]
    stamp_file = bin_dir / stamp
    if (
        stamp_file.is_file()
        and stamp_file.read_text() == key
        and all((bin_dir / name).is_file() for name in names)
    ):
        return False
    go = shutil.which("go")
    if go is None:
        raise SystemExit(f"go is not on PATH: {label} is built from Go modules")
    bin_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not quiet:
        print(f"building {label} into {bin_dir}", file=sys.stderr)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false -mod=mod"}
    for tags, commands in groups.items():
        subprocess.run(
            [
                go,
                "build",
                "-trimpath",
                *([f"-tags={','.join(tags)}"] if tags else []),
                f"-ldflags={ldflags}",
                "-o",
                f"{bin_dir}/",
                *commands.values(),
            ],
            cwd=module,
            env=env,
            check=True,
        )
    stamp_file.write_text(key)
    if not quiet:
        print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return True


def build(bin_dir: Path = BIN, *, quiet: bool = False) -> bool:
    """Build every command into ``bin_dir`` unless the stamp says it is current."""
    return go_build(
        HERE,
        bin_dir,
        {(): COMMANDS},
        ldflags=_ldflags(),
        stamp=".build-key",
        label=f"the control plane and node ({KUBE_VERSION})",
        quiet=quiet,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def node_address() -> str | None:
    """This machine's address on its default route, where a node's pods reach the API
    (through the `kubernetes` Service); None without such a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 9))  # UDP: picks the route, sends nothing
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie of ours counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class ControlPlane:
    """One control plane below ``root``; its state (ports, pids) in ``root/state.json``."""

    root: Path = DEFAULT_DIR
    bin_dir: Path = BIN
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    # Where pods reach kube-apiserver (the `kubernetes` Service's endpoint); None: only
    # on 127.0.0.1, and a node's pods cannot reach it.
    address: str | None = None
    # Process changes (start, stop, revive) come from tests' threads and a supervisor.
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self._load()

    # --- paths ----------------------------------------------------------------------

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def _state(self) -> Path:
        return self.root / "state.json"

    def _load(self) -> None:
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return
        self.ports = {k: int(v) for k, v in state.get("ports", {}).items()}
        self.pids = {k: int(v) for k, v in state.get("pids", {}).items()}
        self.address = state.get("address")

    def _save(self) -> None:
        tmp = self._state.with_suffix(".tmp")
        state = {"ports": self.ports, "pids": self.pids, "address": self.address}
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self._state)

    # --- lifecycle --------------------------------------------------------------------

    def running(self) -> bool:
        names = ("etcd", "kube-apiserver", "kube-controller-manager")
        return all(name in self.pids and alive(self.pids[name]) for name in names) and self.ready()

    def up(self, timeout: float = 60.0) -> bool:
        """Start everything unless it already runs; False when it already did."""
        if self.running():
            return False
        self.down()
        build(self.bin_dir, quiet=True)
        for directory in (self.data, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self._issue_certificates()
        self.ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port()}
        self.address = node_address()
        self.pids = {}
        self._save()
        deadline = time.monotonic() + timeout
        self._start("etcd", self._etcd_args())
        self._wait_for_etcd(deadline)
        self.start_apiserver(timeout=max(1.0, deadline - time.monotonic()))
        self._write_kubeconfigs()
        self._start("kube-controller-manager", self._controller_manager_args())
        return True

    def down(self) -> None:
        """Stop every process this state names and delete the data; idempotent."""
        with self._lock:
            for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
                self._stop(name)
        self.pids = {}
        shutil.rmtree(self.data, ignore_errors=True)
        if self._state.exists():
            self._state.unlink()

    def stop_apiserver(self) -> None:
        """An API outage: kube-apiserver stopped; etcd and its data stay."""
        with self._lock:
            self._stop("kube-apiserver")
            self._save()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start (or restart after ``stop_apiserver``) kube-apiserver on the same port."""
        self._start("kube-apiserver", self._apiserver_args())
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not alive(self.pids["kube-apiserver"]):
                raise RuntimeError(f"kube-apiserver exited:\n{self._tail('kube-apiserver')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready:\n{self._tail('kube-apiserver')}")
            time.sleep(0.1)
        self.revive_controller_manager()

    def revive_controller_manager(self) -> bool:
        """Start again a kube-controller-manager that was started and has exited; True
        when it did. It exits for good when the API goes away while it is still starting
        its controllers ("Error building controllers"), possibly a moment after the API
        is back; a kubelet would restart its static pod, and so does the harness (here,
        and from the tests' supervisor thread)."""
        with self._lock:
            manager = self.pids.get("kube-controller-manager")
            if manager is None or (alive(manager) and runs(manager, "kube-controller-manager")):
                return False
            reap(manager)
            self._start("kube-controller-manager", self._controller_manager_args())
            return True

    def etcd_revision(self) -> int:
        """etcd's current revision (the header of a range read, through its JSON gateway)."""
        answer = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
        return int(answer["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd at its current revision (as kube-apiserver does every 5 minutes):
        every older revision is gone. Returns the revision compacted at."""
        revision = self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _etcd_post(self, path: str, body: dict[str, object]) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['etcd']}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        if "apiserver" not in self.ports or not (self.pki / "ca.crt").exists():
            return False
        try:
            with urllib.request.urlopen(
                f"{self.url}/readyz", context=self.ssl_context(), timeout=2
            ) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def ssl_context(self, client: str = "admin") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(
            self.pki / f"client-{client}.crt", self.pki / f"client-{client}.key"
        )
        return context

    # --- processes --------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [str(self.bin_dir / ("etcd" if name == "etcd" else name)), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `make cluster-up`; no terminal signals
            )
        self.pids[name] = process.pid
        self._save()

    def _stop(self, name: str, timeout: float = 15.0) -> None:
        pid = self.pids.pop(name, None)
        if pid is not None:
            stop_process(pid, name, timeout)

    def _tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_for_etcd(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.ports['etcd']}/health"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if not alive(self.pids["etcd"]):
                raise RuntimeError(f"etcd exited:\n{self._tail('etcd')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy:\n{self._tail('etcd')}")
            time.sleep(0.05)

    # --- configuration ----------------------------------------------------------------

    def _issue_certificates(self) -> None:
        args = [str(self.bin_dir / "pki"), "-dir", str(self.pki)]
        for client in CLIENTS:
            args += ["-client", client]
        subprocess.run(args, check=True)

    def _etcd_args(self) -> list[str]:
        return [
            f"--data-dir={self.data / 'etcd'}",
            f"--listen-client-url=http://127.0.0.1:{self.ports['etcd']}",
            f"--listen-peer-url=http://127.0.0.1:{self.ports['etcd-peer']}",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        if self.address is None:
            # No kubernetes Service endpoints: a loopback address may not be published.
            listen = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"]
            listen.append("--endpoint-reconciler-type=none")
        else:
            # Clients use 127.0.0.1; a node's pods reach the `kubernetes` Service (10.0.0.1,
            # in the serving certificate), which kube-proxy sends to this address.
            listen = ["--bind-address=0.0.0.0", f"--advertise-address={self.address}"]
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            *listen,
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,ValidatingAdmissionPolicy",
            f"--service-account-issuer={self.url}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={self.data / 'apiserver-certs'}",
            # Every request, who sent it and how it ended: the tests count requests here.
            f"--audit-policy-file={self._audit_policy()}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]

    @property
    def audit_log(self) -> Path:
        return self.data / "audit.log"

    def _audit_policy(self) -> Path:
        path = self.root / "audit-policy.json"
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata"}],
        }
        path.write_text(json.dumps(policy))
        return path

    def _controller_manager_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--kubeconfig={self.root / 'controller-manager.kubeconfig'}",
            "--leader-elect=false",
            "--secure-port=0",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ]

    def kubeconfig_for(self, client: str) -> str:
        """A self-contained kubeconfig (certificates inlined) for a client certificate."""

        def inline(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "nodemem-test",
                        "cluster": {
                            "server": self.url,
                            "certificate-authority-data": inline(self.pki / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": client,
                        "user": {
                            "client-certificate-data": inline(self.pki / f"client-{client}.crt"),
                            "client-key-data": inline(self.pki / f"client-{client}.key"),
                        },
                    }
                ],
                "contexts": [
                    {"name": "nodemem-test", "context": {"cluster": "nodemem-test", "user": client}}
                ],
                "current-context": "nodemem-test",
            },
            indent=1,
        )

    def token_kubeconfig(self, token: str) -> str:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's)."""
        ca = base64.b64encode((self.pki / "ca.crt").read_bytes()).decode()
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": self.url, "certificate-authority-data": ca}}
                ],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )

    def _write_kubeconfigs(self) -> None:
        for path, client in (
            (self.kubeconfig, "admin"),
            (self.root / "controller-manager.kubeconfig", "system-kube-controller-manager"),
        ):
            path.write_text(self.kubeconfig_for(client))
            path.chmod(0o600)


def runs(pid: int, name: str) -> bool:
    """The pid still runs our binary `name` (a recycled pid is left alone)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return Path(exe.removesuffix(" (deleted)")).name == name


def stop_process(pid: int, name: str, timeout: float) -> None:
    """SIGTERM to `pid` if it still runs `name`, SIGKILL after `timeout` s; reaped."""
    if not alive(pid) or not runs(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        reap(pid)
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            reap(pid)
            time.sleep(0.05)
    reap(pid)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitpid(pid, os.WNOHANG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "up", "down", "status"))
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="state directory (default .cluster)"
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        build()
        return 0
    plane = ControlPlane(args.dir)
    if args.command == "up":
        started = time.monotonic()
        if plane.up():
            print(f"control plane ready at {plane.url} in {time.monotonic() - started:.1f} s")
        else:
            print(f"control plane already running at {plane.url}")
        print(f"kubeconfig: {plane.kubeconfig}\nkubectl:    {plane.kubectl}")
    elif args.command == "down":
        plane.down()
        print("control plane stopped, data deleted")
    else:
        print(f"running at {plane.url}" if plane.running() else "not running")
        return 0 if plane.running() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The standalone agent as a process, scraped as Prometheus would (for the metrics tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout} s: {message}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening_address(port: int) -> str | None:
    """The IPv4 address a socket of this host listens on at `port` (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, _, hex_port = fields[1].partition(":")
        if fields[3] == "0A" and int(hex_port, 16) == port:  # TCP_LISTEN
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None


@dataclass
class Agent:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()

    def series(self) -> Series:
        """Every sample of a scrape: (name, labels) -> value, parsed by prometheus_client."""
        out: Series = {}
        for family in text_string_to_metric_families(self.text()):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in out, f"duplicate series {key}"
                out[key] = sample.value
        return out


def value(series: Series, metric: str, /, **labels: str) -> float | None:
    return series.get((metric, frozenset(labels.items())))


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


@contextmanager
def standalone_agent(tmp_path: Path, document: dict[str, Any], *args: str) -> Iterator[Agent]:
    """`nodemem agent --policy-file ... --metrics-port P` (default host), ready; killed after."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(document))
    log = tmp_path / "agent.log"
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "nodemem.cli", "agent"),
                *("--policy-file", str(policy_file), "--resync", "0.5"),
                *("--metrics-port", str(port), *args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    agent = Agent(process, port, log)

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(ready, 30, "agent ready")
        # Ready after the first resync; the cycle's series follow it.
        wait_for(lambda: "\nnodemem_tmpfs_mount_size_bytes{" in agent.text(), 10, "the first cycle")
        yield agent
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()

"""The metrics port under attack: `nodemem agent --policy-file --metrics-port` as a process.

Anyone who reaches the port can open connections and never finish a request, or reset
them. The agent must keep giving new processes their oom_score_adj at exec, keep its
thread count bounded, answer /metrics again once the idle connections time out, stop
promptly on SIGTERM, and never log a traceback for a client.
"""

from __future__ import annotations

import contextlib
import re
import resource
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nodemem.agent.metrics import MAX_CONNECTIONS, REQUEST_SECONDS
from nodemem.host.oom_adj import read_oom_score_adj
from nodemem.host.paths import HostPaths

pytestmark = pytest.mark.privileged

FLOOD = 2000
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: nodemem\r\n"


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout} s: {message}"
        time.sleep(0.02)


def adj(pid: int) -> int:
    return read_oom_score_adj(HostPaths(), pid)  # one read(2): see its docstring


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)$", status, re.M).group(1))  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Agent:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, path: str) -> tuple[int, str] | None:
        """(status, body), or None when the connection was refused, reset or timed out."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None

    def stop(self, timeout: float) -> float:
        """SIGTERM; the seconds it took to exit (asserts exit code 0)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=timeout) == 0
        return time.monotonic() - started


@pytest.fixture
def fd_room() -> Iterator[None]:
    """Room for the flood's client sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 1024
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {needed} for the flood")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[[str], Agent]]:
    """agent(token): the standalone agent with an oom rule for command lines with token."""
    running: list[Agent] = []

    def start(token: str) -> Agent:
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "nodemem.dev/v1alpha1",
                    "kind": "NodeMemoryPolicy",
                    "metadata": {"name": "flood"},
                    "spec": {
                        "oom": [{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": 500}]
                    },
                }
            )
        )
        log = tmp_path / "agent.log"
        port = free_port()
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "nodemem.cli", "agent"),
                    *("--policy-file", str(policy), "--resync", "1"),
                    *("--metrics-port", str(port), "--metrics-host", "127.0.0.1"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        started = Agent(process, port, log)
        running.append(started)
        wait_for(lambda: started.get("/readyz") == (200, "ready\n"), 30, "agent ready")
        return started

    yield start
    for started in running:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait()


def open_idle(port: int, count: int, into: list[socket.socket]) -> None:
    """`count` connections that send half a request and then nothing."""
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            continue
        into.append(sock)
        with contextlib.suppress(OSError):  # closed at once: beyond the cap
            sock.sendall(HALF_REQUEST)


def adjustments(agent: Agent) -> float:
    answer = agent.get("/metrics")
    if answer is None or answer[0] != 200:
        return -1.0
    found = re.search(r'^nodemem_oom_adjustments_total\{rule="batch"\} (\S+)$', answer[1], re.M)
    return float(found.group(1)) if found else 0.0


def test_a_flood_of_idle_connections_starves_nothing(
    agent: Callable[[str], Agent],
    fd_room: None,
    clients: list[socket.socket],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    token = f"{secrets.randbelow(10**6) + 10**6}"
    processes.append(subprocess.Popen(["sleep", f"{token}.0"]))
    running = agent(token)
    wait_for(lambda: adj(processes[0].pid) == 500, 10, "the resync adjusts")
    threads = [threads_of(running.process.pid)]

    flood = threading.Thread(target=open_idle, args=(running.port, FLOOD, clients))
    flood.start()
    try:
        wait_for(lambda: len(clients) >= FLOOD // 2, 60, "half the flood open")
        # A process exec'd during the flood gets its adj from the exec event, at once.
        processes.append(subprocess.Popen(["sleep", f"{token}.1"]))
        pid = processes[-1].pid
        exec_deadline = time.monotonic() + 3
        while adj(pid) != 500:
            assert time.monotonic() < exec_deadline, "no oom_score_adj during the flood"
            threads.append(threads_of(running.process.pid))
            time.sleep(0.01)
    finally:
        flood.join(timeout=120)
    assert not flood.is_alive()
    assert len(clients) > FLOOD * 0.9
    threads.append(threads_of(running.process.pid))
    # No thread per connection: the flood added none.
    assert max(threads) == threads[0], threads

    # Idle connections hold at most MAX_CONNECTIONS slots, each for REQUEST_SECONDS:
    # then /metrics answers, and it counts both adjustments.
    assert len(clients) > MAX_CONNECTIONS
    wait_for(lambda: adjustments(running) >= 2, REQUEST_SECONDS + 10, "/metrics after the flood")
    answer = running.get("/metrics")
    assert answer is not None and 'nodemem_shmem_bytes{kind="tmpfs"}' in answer[1]

    # SIGTERM ends it promptly even with the port full of idle connections.
    open_idle(running.port, 2 * MAX_CONNECTIONS, clients)
    assert running.stop(timeout=5) < 5
    log = running.log.read_text()
    assert "Traceback" not in log, log


def test_broken_clients_leave_no_traceback(
    agent: Callable[[str], Agent], clients: list[socket.socket]
) -> None:
    running = agent("nodemem-no-such-process")
    reset = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
    for raw in (b"", HALF_REQUEST, b"GET /metrics HTTP/1.1\r\n\r\n", b"\x00\xff\r\n\r\n"):
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            try:
                if raw:
                    sock.sendall(raw)
            finally:
                sock.close()
    # Clients that half-close after their request, and ones that never read the answer.
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        clients.append(sock)
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: running.get("/healthz") == (200, "ok\n"), 10, "healthz")
    assert running.stop(timeout=5) < 5
    log = running.log.read_text()
    assert "Traceback" not in log, log
    assert "ERROR" not in log and "WARNING" not in log, log

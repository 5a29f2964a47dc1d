"""The agent's metrics port: endpoints, and the bounds that keep a flood harmless;
the standalone agent's --state-dir (the record of originals only)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodemem.agent.metrics import AgentMetrics, MetricsServer, serve

Start = Callable[..., MetricsServer]


@pytest.fixture
def start() -> Iterator[Start]:
    servers: list[MetricsServer] = []

    def start_server(ready: Callable[[], bool] = lambda: True, **limits: float) -> MetricsServer:
        metrics = AgentMetrics()
        metrics.unaccounted.set(4096)
        server = serve(metrics, 0, ready, "127.0.0.1", **limits)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start_server
    for server in servers:
        server.server_close()


@pytest.fixture
def clients() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def request(server: MetricsServer, raw: bytes, timeout: float = 5.0) -> bytes:
    """The whole answer to `raw` (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def get(server: MetricsServer, path: str) -> tuple[int, dict[str, str], bytes]:
    answer = request(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status.split()[1]), headers, body


def closed_unanswered(sock: socket.socket) -> bool:
    """The server closed the connection without an answer (a reset when it had not read
    all the client sent)."""
    try:
        return read_to_eof(sock) == b""
    except ConnectionResetError:
        return True


def idle_client(server: MetricsServer, stack: ExitStack) -> socket.socket:
    """A connection that sends half a request and then nothing."""
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=5))
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    return sock


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_endpoints_answer_and_close(start: Start) -> None:
    ready = threading.Event()
    server = start(ready=ready.is_set)

    status, headers, body = get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    assert b"nodemem_shmem_unaccounted_bytes 4096.0" in body

    assert get(server, "/healthz")[::2] == (200, b"ok\n")
    assert get(server, "/readyz")[::2] == (503, b"not ready\n")
    ready.set()
    assert get(server, "/readyz")[::2] == (200, b"ready\n")
    assert get(server, "/metrics?x=1")[0] == 200
    assert get(server, "/nope")[0] == 404
    assert get(server, "/")[0] == 404

    assert request(server, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert request(server, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    head = request(server, b"HEAD /healthz HTTP/1.0\n\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")


def test_an_idle_connection_is_closed_at_its_deadline(start: Start, clients: ExitStack) -> None:
    server = start(request_seconds=0.5)
    opened = time.monotonic()
    sock = idle_client(server, clients)
    assert closed_unanswered(sock)  # the request never ended
    assert 0.4 < time.monotonic() - opened < 3


def test_an_oversized_request_is_refused(start: Start) -> None:
    server = start(max_request_bytes=1024)
    answer = request(server, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 4096)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_connections_beyond_the_cap_are_closed_at_once(start: Start, clients: ExitStack) -> None:
    server = start(max_connections=4, request_seconds=1.0)
    threads = threading.active_count()
    idle = [idle_client(server, clients) for _ in range(4)]
    # No thread per connection.
    assert threading.active_count() == threads
    # The fifth is told at once (a 503, or a reset when its request came after the
    # server's last read), while the four wait for their deadline.
    started = time.monotonic()
    try:
        answer = request(server, b"GET /healthz HTTP/1.1\r\n\r\n")
    except ConnectionResetError:
        answer = b"HTTP/1.1 503 (reset)"
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert time.monotonic() - started < 0.5
    for sock in idle:
        assert closed_unanswered(sock)
    # The slots are free again.
    assert get(server, "/healthz")[0] == 200


def test_broken_clients_are_logged_at_debug_only(
    start: Start, clients: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nodemem.agent.metrics")
    server = start()
    reset = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
    for raw in (b"GET /metr", b"GET /metrics HTTP/1.1\r\n\r\n", b""):
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            if raw:
                sock.sendall(raw)
            sock.close()
    wait_for(lambda: get(server, "/healthz")[0] == 200)
    noisy = [
        record for record in caplog.records if record.exc_info or record.levelno > logging.INFO
    ]
    assert noisy == []
    assert any(record.levelno == logging.DEBUG for record in caplog.records)  # they were seen


def test_shutdown_is_prompt_with_connections_open(start: Start, clients: ExitStack) -> None:
    server = start()
    idle = [idle_client(server, clients) for _ in range(50)]
    started = time.monotonic()
    server.shutdown()
    server.server_close()
    assert time.monotonic() - started < 0.5
    for sock in idle:
        assert closed_unanswered(sock)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_state_dir_with_a_policy_file_keeps_the_undo_record(tmp_path: Path) -> None:
    """With --policy-file the state dir holds only the originals (the file is the
    policies): an adj the policy raised is recorded there, and put back when the rule
    leaves the file. Raising a child's oom_score_adj needs no privilege."""
    token = f"{secrets.randbelow(10**6) + 10**6}.9"
    rule = {"name": "r", "match": {"cmdline": token}, "oomScoreAdj": 500}
    document = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "state-dir-test"},
        "spec": {"oom": [rule]},
    }
    policy, state = tmp_path / "policy.yaml", tmp_path / "state"
    policy.write_text(yaml.safe_dump(document))
    child = subprocess.Popen(["sleep", token])
    command = [sys.executable, "-m", "nodemem.cli", "agent", "--policy-file", str(policy)]
    agent = subprocess.Popen(
        [*command, "--state-dir", str(state), "--resync", "0.1", "--metrics-port", "0"],
        stderr=subprocess.DEVNULL,
    )
    adj = Path(f"/proc/{child.pid}/oom_score_adj")
    try:
        _wait(lambda: adj.read_text().strip() == "500")
        assert f'"pid": {child.pid}' in (state / "originals-agent.jsonl").read_text()
        assert not (state / "policies.yaml").exists()
        document["spec"] = {"oom": []}
        (tmp_path / "edit.yaml").write_text(yaml.safe_dump(document))
        os.replace(tmp_path / "edit.yaml", policy)
        _wait(lambda: adj.read_text().strip() == "0")
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
        child.kill()
        child.wait()


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)

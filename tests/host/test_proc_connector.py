"""The proc connector against the real kernel: events of processes this test starts,
IGNORE on close (seen as the kernel's ack by a second listener), ENOBUFS → LostEvents."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from nodemem.host.proc_connector import (
    CN_IDX_PROC,
    NETLINK_CONNECTOR,
    ControlOp,
    EventType,
    LostEvents,
    ProcAck,
    ProcConnector,
    ProcEvent,
    decode,
    encode_control,
)

pytestmark = pytest.mark.privileged

DEADLINE_S = 5.0


def _collect_until(
    connector: ProcConnector, done: Callable[[list[ProcEvent | LostEvents]], bool]
) -> list[ProcEvent | LostEvents]:
    seen: list[ProcEvent | LostEvents] = []
    deadline = time.monotonic() + DEADLINE_S
    while not done(seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if connector.wait(remaining):
            seen.extend(connector.read_events())
    return seen


def _events_of(seen: list[ProcEvent | LostEvents], pid: int) -> list[ProcEvent]:
    return [e for e in seen if isinstance(e, ProcEvent) and e.pid == pid]


def test_fork_exec_exit_of_a_child() -> None:
    with ProcConnector() as connector:
        assert connector.acknowledged
        assert connector.receive_buffer >= 1 << 20
        before_ns = time.monotonic_ns()
        child = subprocess.Popen(["/bin/true"])
        child.wait(timeout=10)

        def exited(seen: list[ProcEvent | LostEvents]) -> bool:
            return any(e.what is EventType.EXIT for e in _events_of(seen, child.pid))

        seen = _collect_until(connector, exited)

    events = _events_of(seen, child.pid)
    kinds = [e.what for e in events]
    assert kinds == [EventType.FORK, EventType.EXEC, EventType.EXIT], seen
    fork, exec_, exit_ = events
    assert (fork.parent_pid, fork.parent_tgid) == (os.getpid(), os.getpid())
    assert exec_.tgid == child.pid
    assert exit_.exit_code == 0
    assert exit_.parent_tgid == os.getpid()
    # The kernel's timestamps are CLOCK_MONOTONIC.
    assert before_ns <= fork.timestamp_ns <= exec_.timestamp_ns <= exit_.timestamp_ns
    assert exit_.timestamp_ns <= time.monotonic_ns()
    assert not any(isinstance(e, LostEvents) for e in seen)


def test_killed_child_exit_code_is_the_wait_status() -> None:
    with ProcConnector() as connector:
        child = subprocess.Popen(["sleep", "60"])
        child.kill()
        child.wait(timeout=10)
        seen = _collect_until(
            connector,
            lambda seen: any(e.what is EventType.EXIT for e in _events_of(seen, child.pid)),
        )
    [exit_] = [e for e in _events_of(seen, child.pid) if e.what is EventType.EXIT]
    assert exit_.exit_code == 9  # SIGKILL, as waitpid's status


@pytest.fixture
def raw_listener() -> Iterator[socket.socket]:
    """A second, independent subscriber that also sees the kernel's acks."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    sock.bind((0, CN_IDX_PROC))
    port = sock.getsockname()[0]
    sock.sendto(encode_control(ControlOp.LISTEN, port), (0, 0))
    try:
        yield sock
    finally:
        sock.sendto(encode_control(ControlOp.IGNORE, port), (0, 0))
        sock.close()


def _acks(sock: socket.socket, timeout: float) -> list[ProcAck]:
    acks: list[ProcAck] = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], remaining)[0]:
            break
        acks.extend(a for a in decode(sock.recv(65536)) if isinstance(a, ProcAck))
    return acks


def _wait_for_ack(sock: socket.socket, ack: int) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], remaining)[0]:
            return False
        if any(isinstance(a, ProcAck) and a.ack == ack for a in decode(sock.recv(65536))):
            return True
    return False


def test_close_sends_ignore(raw_listener: socket.socket) -> None:
    connector = ProcConnector()
    connector.subscribe()
    assert connector.acknowledged
    expected_ack = connector.port_id + 1  # acks echo the request's ack field + 1
    assert _wait_for_ack(raw_listener, expected_ack)  # the LISTEN's ack, multicast

    _acks(raw_listener, 0.05)  # drain
    connector.close()
    assert _wait_for_ack(raw_listener, expected_ack), "no ack for IGNORE: it was not sent"
    with pytest.raises(ValueError):
        connector.fileno()
    connector.close()  # twice is harmless


def test_overrun_yields_lost_events() -> None:
    with ProcConnector(receive_buffer=1) as connector:  # the kernel's minimum
        assert connector.receive_buffer < 16 << 10
        for _ in range(300):  # ~900 events, none read meanwhile
            pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
            os.waitpid(pid, 0)
        seen = _collect_until(connector, lambda seen: any(isinstance(e, LostEvents) for e in seen))
        lost = [e for e in seen if isinstance(e, LostEvents)]
        assert lost, f"no LostEvents among {len(seen)} items"
        assert "ENOBUFS" in lost[0].reason
        # Only a handful of the ~900 events fit.
        assert sum(isinstance(e, ProcEvent) for e in seen) < 100

        # After the overrun the subscription still delivers. Its buffer is the kernel's
        # minimum (~6 events): other processes on the host may overrun it again before a
        # child's exec arrives, which shows as LostEvents; then the next child is tried.
        def exec_of(pid: int, seen: list[ProcEvent | LostEvents]) -> bool:
            return any(e.what is EventType.EXEC for e in _events_of(seen, pid))

        def exec_or_loss(pid: int) -> Callable[[list[ProcEvent | LostEvents]], bool]:
            return lambda seen: exec_of(pid, seen) or any(isinstance(e, LostEvents) for e in seen)

        for _attempt in range(10):
            child = subprocess.Popen(["/bin/true"])
            child.wait(timeout=10)
            after = _collect_until(connector, exec_or_loss(child.pid))
            if exec_of(child.pid, after):
                break
        else:
            pytest.fail("no child's exec arrived after the overrun, in 10 tries")


def test_asyncio_add_reader() -> None:
    async def exec_of_a_child() -> ProcEvent:
        loop = asyncio.get_running_loop()
        with ProcConnector() as connector:
            execs: dict[int, ProcEvent] = {}
            arrived = asyncio.Event()

            def on_readable() -> None:
                for event in connector.read_events():
                    if isinstance(event, ProcEvent) and event.what is EventType.EXEC:
                        execs[event.pid] = event
                        arrived.set()

            loop.add_reader(connector.fileno(), on_readable)
            try:
                child = await asyncio.create_subprocess_exec("/bin/true")
                await child.wait()
                async with asyncio.timeout(DEADLINE_S):
                    while child.pid not in execs:
                        arrived.clear()
                        await arrived.wait()
                return execs[child.pid]
            finally:
                loop.remove_reader(connector.fileno())

    event = asyncio.run(exec_of_a_child())
    assert event.what is EventType.EXEC


def _subscribe_in(*wrapper: str) -> str:
    """Subscribe in a child started through `wrapper`; what it says."""
    code = (
        "from nodemem.host.proc_connector import ProcConnector, ProcConnectorUnavailable\n"
        "try:\n    ProcConnector().subscribe(); print('subscribed')\n"
        "except ProcConnectorUnavailable as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [*wrapper, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_outside_the_nodes_network_namespace_the_refusal_says_hostnetwork() -> None:
    # A pod's own network namespace: the kernel has no proc connector there.
    said = _subscribe_in("unshare", "--net")
    assert "Connection refused" in said
    assert "only in the node's network namespace: hostNetwork" in said


def test_without_cap_net_admin_the_refusal_names_the_capability() -> None:
    said = _subscribe_in("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin")
    if said != "subscribed":  # kernels differ: 6.18.44 here refuses, others allow
        assert "Operation not permitted" in said
        assert "needs CAP_NET_ADMIN" in said

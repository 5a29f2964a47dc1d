"""A real memory-cgroup OOM, three kills, against predict_victims (kernel-memory.md 5.8).

A v1 memcg limited to 256 MiB holds five Python processes: A 100 MiB adj 0, B 40 MiB
adj 100, C 15 MiB adj 300, D 10 MiB adj 900 (each plus the interpreter's ~8 MiB),
and G, adj 0, which grows by 1 MiB every 10 ms until killed. Before each death the
test keeps the last prediction taken while nothing had been killed yet (the cgroup's
oom_kill count unchanged around it, every live process ranked); the kernel's victim
must be that prediction's first. The limit confines the OOM to this cgroup.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from memcg_helpers import joining

from nodemem.host.oom_adj import AdjState, set_oom_score_adj
from nodemem.host.oom_predict import OomPrediction, predict_victims
from nodemem.host.paths import HostPaths

pytestmark = pytest.mark.privileged

MIB = 1 << 20
LIMIT = 256 * MIB
PATHS = HostPaths()

# argv: bytes to hold, bytes to add per step (0: hold still), step interval in ms.
WORKER = """
import sys, time
size, step, interval = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000
held = []

def hold(n):
    chunk = bytearray(n)
    for i in range(0, n, 4096):  # touch every page: resident, charged to the memcg
        chunk[i] = 1
    held.append(chunk)

hold(size)
print("ready", flush=True)
if sys.stdin.readline() and step:
    while sum(map(len, held)) < 512 << 20:  # never reached: the 256 MiB limit kills first
        hold(step)
        time.sleep(interval)
sys.stdin.readline()  # hold still until killed or stdin closes
"""


@dataclass(frozen=True)
class Worker:
    name: str
    adj: int
    size: int
    step: int = 0


WORKERS = [
    Worker("A", 0, 100 * MIB),
    Worker("B", 100, 40 * MIB),
    Worker("C", 300, 15 * MIB),
    Worker("D", 900, 10 * MIB),
    Worker("G", 0, 1 * MIB, step=1 * MIB),
]
KILLS = 3
TEST_DEADLINE_S = 40.0


@pytest.fixture
def memcg(memcg_root: Path) -> Path:
    (memcg_root / "memory.limit_in_bytes").write_text(str(LIMIT))
    return memcg_root


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    started: dict[str, subprocess.Popen[bytes]] = {}
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
    for process in started.values():
        process.wait(timeout=10)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _oom_kills(memcg: Path) -> int:
    fields = dict(line.split() for line in (memcg / "memory.oom_control").read_text().splitlines())
    return int(fields["oom_kill"])


def _start(worker: Worker, memcg: Path) -> subprocess.Popen[bytes]:
    # Joined before exec: everything it allocates is charged to the memcg.
    # preexec_fn is unsafe with threads; this test process starts none.
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", WORKER, str(worker.size), str(worker.step), "10"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=joining(memcg),  # noqa: PLW1509
    )


def _await_ready(process: subprocess.Popen[bytes], deadline: float) -> None:
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, "worker did not get ready in time"
        if select.select([process.stdout], [], [], remaining)[0]:
            chunk = os.read(process.stdout.fileno(), 64)
            assert chunk, f"worker exited before ready: {process.poll()}"
            line += chunk
    assert line == b"ready\n"


def _describe(prediction: OomPrediction, names: dict[int, str]) -> str:
    return ", ".join(f"{names[c.pid]}={c.score}" for c in prediction.victims)


def test_kernel_kills_in_the_predicted_order(
    memcg: Path, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + TEST_DEADLINE_S
    assert "oom_kill_disable 0" in (memcg / "memory.oom_control").read_text()
    for worker in WORKERS:
        processes[worker.name] = _start(worker, memcg)
    for process in processes.values():
        _await_ready(process, deadline)
    for worker in WORKERS:
        result = set_oom_score_adj(PATHS, processes[worker.name].pid, worker.adj)
        assert result.state in (AdjState.ADJUSTED, AdjState.UNCHANGED), result.message
    names = {process.pid: name for name, process in processes.items()}
    cgroup = str(memcg)  # as a directory under the mount; the scope is the hierarchy path

    kills_before = _oom_kills(memcg)
    grower = processes["G"]
    assert grower.stdin is not None
    grower.stdin.write(b"go\n")
    grower.stdin.flush()

    killed: list[str] = []
    predicted: list[str] = []
    alive = dict(processes)
    for round_number in range(1, KILLS + 1):
        last: OomPrediction | None = None
        while True:
            assert time.monotonic() < deadline, f"round {round_number}: nothing died in time"
            kills = _oom_kills(memcg)
            prediction = predict_victims(PATHS, cgroup=cgroup)
            dead = [name for name, process in alive.items() if process.poll() is not None]
            if dead:
                break
            # Only a prediction surely taken before the kill, of every live process, counts.
            ranked = {c.pid for c in prediction.victims}
            if kills == _oom_kills(memcg) == kills_before + round_number - 1 and ranked == {
                process.pid for process in alive.values()
            }:
                last = prediction
            time.sleep(0.005)  # pacing of the snapshot loop, not a wait for a condition
        assert len(dead) == 1, f"round {round_number}: several died at once: {dead}"
        [victim] = dead
        assert alive[victim].returncode == -9, f"{victim} died by {alive[victim].returncode}"
        assert last is not None, f"round {round_number}: no prediction before {victim} died"
        assert last.scope == f"/{memcg.name}"
        assert last.totalpages == LIMIT // os.sysconf("SC_PAGE_SIZE")
        print(f"round {round_number}: killed {victim}; predicted {_describe(last, names)}")
        killed.append(victim)
        predicted.append(names[last.victims[0].pid])
        del alive[victim]
        assert _oom_kills(memcg) == kills_before + round_number, "not an OOM kill of this memcg"

    assert killed == predicted
    assert killed[0] == "D"  # adj 900 is worth 58,500 pages here: nothing else comes close

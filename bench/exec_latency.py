"""Benchmark: exec -> oom_score_adj written, proc connector against a 1 s rescan loop.

Spawns `sleep` processes matching a rule at 200 exec/s for 10 s, once with the agent's
exec-event path (ProcConnector + apply_to_process, as NodeAgent wires them) and once
with a rescan of every process each second (the polling baseline of tools like
earlyoom). Latency runs from just before posix_spawn to just after the write, on
CLOCK_MONOTONIC. Then the listener's CPU share at 1,000 exec/s. Run as root:
`python bench/exec_latency.py`. Goal: p50 < 2 ms, p99 < 20 ms, no process missed.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from nodemem.api.manifest import load_policies
from nodemem.host.oom_adj import AdjState
from nodemem.host.originals import AGENT_FILE, Originals
from nodemem.host.paths import HostPaths
from nodemem.host.proc_connector import EventType, LostEvents, ProcConnector
from nodemem.host.procfs import ProcessUnreadable, list_pids
from nodemem.policy.effective import EffectiveOomRule, effective_policy
from nodemem.policy.oom import apply_to_process
from nodemem.policy.pods import PodDirectory

PATHS = HostPaths()
PODS = PodDirectory()
ADJ = 345
SLEEP = "/bin/sleep"


def rules_for(tag: str) -> tuple[EffectiveOomRule, ...]:
    document = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "bench"},
        "spec": {
            "oom": [{"name": "bench", "match": {"cmdline": f"^sleep {tag}"}, "oomScoreAdj": ADJ}]
        },
    }
    policies = load_policies(yaml.safe_dump(document))
    return effective_policy(policies, {}, 1 << 30).oom


class Spawner:
    """posix_spawn at a fixed rate; remembers when each pid was started."""

    def __init__(self, tag: str, rate: float, seconds: float) -> None:
        # The tag is also the sleep time: `sleep 2.1000042` lives 2.1 s.
        self.tag, self.rate, self.seconds = tag, rate, seconds
        self.started: dict[int, int] = {}  # pid -> monotonic ns just before spawn

    def run(self) -> None:
        interval = 1 / self.rate
        begin = time.monotonic()
        for index in range(int(self.rate * self.seconds)):
            delay = begin + index * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.monotonic_ns()
            pid = os.posix_spawn(SLEEP, ["sleep", f"{self.tag}{index:06d}"], os.environ)
            self.started[pid] = t0


def reap(stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            _pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.01)


def percentiles(latencies_ms: list[float]) -> str:
    if not latencies_ms:
        return "no samples"
    ordered = sorted(latencies_ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):7.2f} ms  p99 {p99:7.2f} ms  max {ordered[-1]:7.2f} ms"


def connector_path(
    spawner: Spawner, rules: tuple[EffectiveOomRule, ...], originals: Originals | None = None
) -> dict[int, int]:
    written: dict[int, int] = {}
    with ProcConnector() as connector:
        thread = threading.Thread(target=spawner.run)
        thread.start()
        quiet_until = None
        while thread.is_alive() or quiet_until is None or time.monotonic() < quiet_until:
            if not thread.is_alive() and quiet_until is None:
                quiet_until = time.monotonic() + 1.0
            if not connector.wait(0.1):
                continue
            for event in connector.read_events():
                if isinstance(event, LostEvents):
                    print("  lost events (ENOBUFS)", file=sys.stderr)
                    continue
                if event.what is not EventType.EXEC:
                    continue
                try:
                    outcome = apply_to_process(
                        PATHS, event.tgid, rules, PODS, dry_run=False, originals=originals
                    )
                except ProcessUnreadable:
                    continue
                if outcome is not None and outcome.state == AdjState.ADJUSTED.value:
                    written[event.tgid] = time.monotonic_ns()
        thread.join()
    return written


def recording_connector_path(
    spawner: Spawner, rules: tuple[EffectiveOomRule, ...]
) -> dict[int, int]:
    """The agent's path with its undo record on disk: each original appended first."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as state:
        return connector_path(spawner, rules, Originals(Path(state) / AGENT_FILE))


def polling_path(spawner: Spawner, rules: tuple[EffectiveOomRule, ...]) -> dict[int, int]:
    written: dict[int, int] = {}
    thread = threading.Thread(target=spawner.run)
    thread.start()
    deadline = None
    while thread.is_alive() or deadline is None or time.monotonic() < deadline:
        if not thread.is_alive() and deadline is None:
            deadline = time.monotonic() + 1.5
        tick = time.monotonic()
        for pid in list_pids(PATHS):
            if pid in written:
                continue
            try:
                outcome = apply_to_process(PATHS, pid, rules, PODS, dry_run=False)
            except ProcessUnreadable:
                continue
            if outcome is not None and outcome.state == AdjState.ADJUSTED.value:
                written[pid] = time.monotonic_ns()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    thread.join()
    return written


def measure(name: str, path: Callable[..., dict[int, int]], tag: str) -> None:
    spawner = Spawner(tag, rate=200, seconds=10)
    written = path(spawner, rules_for(tag))
    latencies = [(written[pid] - t0) / 1e6 for pid, t0 in spawner.started.items() if pid in written]
    missed = len(spawner.started) - len(latencies)
    print(f"{name:26s} {percentiles(latencies)}  missed {missed}/{len(spawner.started)}")


def listener_cpu_share(tag: str) -> None:
    rules = rules_for(tag)
    spawner = Spawner(tag, rate=1000, seconds=5)
    cpu = 0.0

    def listen(stop: threading.Event) -> None:
        nonlocal cpu
        start = time.thread_time()
        with ProcConnector() as connector:
            while not stop.is_set():
                if connector.wait(0.1):
                    for event in connector.read_events():
                        if not isinstance(event, LostEvents) and event.what is EventType.EXEC:
                            with contextlib.suppress(ProcessUnreadable):
                                apply_to_process(PATHS, event.tgid, rules, PODS, dry_run=False)
        cpu = time.thread_time() - start

    stop = threading.Event()
    listener = threading.Thread(target=listen, args=(stop,))
    listener.start()
    begin = time.monotonic()
    spawner.run()
    elapsed = time.monotonic() - begin
    rate = len(spawner.started) / elapsed
    stop.set()
    listener.join()
    print(
        f"listener CPU at {rate:6.0f} exec/s:    {cpu / elapsed * 100:5.1f} % of one core "
        f"({cpu:.2f} s CPU in {elapsed:.1f} s)"
    )


def main() -> int:
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 1
    stop = threading.Event()
    threading.Thread(target=reap, args=(stop,), daemon=True).start()
    print("exec -> oom_score_adj written, 200 exec/s for 10 s:")
    measure("proc connector (agent)", connector_path, "2.1")
    measure("proc connector + undo rec.", recording_connector_path, "2.3")
    measure("rescan every 1 s (polling)", polling_path, "2.2")
    listener_cpu_share("0.3")
    stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: what `nodemem report --processes` costs, against `smem -t`.

Starts 1,000 extra processes (forked, so they share the parent's pages and PSS splits
them: a third also hold 1 MiB of private memory, a third map a shared 1 MiB region),
then in the same run, as whole processes, median of interleaved rounds:
`nodemem report --json`, `nodemem report --processes --json` and `smem -t` (Debian's
smem, installed with apt-get when missing). In-process it times `account_processes`
(the --processes part) against the floor of reading every /proc/PID/smaps_rollup
once, and compares the PSS total with smem's over the same processes. Run as root:
`python bench/processes.py`.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nodemem.host.paths import HostPaths
from nodemem.host.shmem import scan_node
from nodemem.host.smaps import account_processes

PROCESSES = 1000
ROUNDS = 7
NODEMEM = str(Path(sys.executable).with_name("nodemem"))


def ensure_smem() -> str | None:
    """smem's path; installs Debian's package when missing (bench only, never the tests)."""
    found = shutil.which("smem")
    if found is None and shutil.which("apt-get") is not None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

        def apt(*args: str) -> int:
            done = subprocess.run(["apt-get", *args], env=env, capture_output=True, check=False)
            return done.returncode

        if apt("install", "-y", "smem"):  # a stale package list: refresh once
            apt("update")
            apt("install", "-y", "smem")
        found = shutil.which("smem")
    return found


def start_children() -> list[int]:
    shared = mmap.mmap(-1, 1 << 20)  # MAP_SHARED | MAP_ANONYMOUS
    pids = []
    for index in range(PROCESSES):
        pid = os.fork()
        if pid == 0:
            if index % 3 == 0:
                private = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                private[:] = b"p" * (1 << 20)
            elif index % 3 == 1:
                shared[:] = b"s" * (1 << 20)
            while True:  # until SIGKILL
                signal.pause()
        pids.append(pid)
    return pids


def whole_process(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def best_of(rounds: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def read_every_rollup() -> int:
    """The floor: each smaps_rollup read once with os.read, nothing parsed."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/smaps_rollup", os.O_RDONLY)
        except OSError:
            continue
        try:
            count += bool(os.read(fd, 65536))
        except OSError:  # kernel threads and zombies: ESRCH
            pass
        finally:
            os.close(fd)
    return count


def smem_pss(smem: str) -> dict[int, int]:
    """PSS by pid as smem reports it (it sums /proc/PID/smaps, KiB)."""
    out = subprocess.run([smem, "-c", "pid pss"], capture_output=True, text=True, check=True)
    rows = (line.split() for line in out.stdout.splitlines()[1:])
    return {int(pid): int(kib) * 1024 for pid, kib in rows}


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (reads every process's smaps_rollup)", file=sys.stderr)
        return 1
    smem = ensure_smem()
    pids: list[int] = []
    try:
        pids = start_children()
        commands = {
            "nodemem report --json": [NODEMEM, "report", "--json"],
            "nodemem report --processes --json": [NODEMEM, "report", "--processes", "--json"],
        }
        if smem is not None:
            commands["smem -t"] = [smem, "-t"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(ROUNDS):  # interleaved: drift hits every command alike
            for name, command in commands.items():
                times[name].append(whole_process(command))
        medians = {name: statistics.median(values) for name, values in times.items()}

        paths = HostPaths()
        statuses = scan_node(paths).processes
        floor = best_of(5, read_every_rollup)
        accounting = best_of(5, lambda: account_processes(paths, statuses))
        ours = account_processes(paths, statuses)

        print(f"processes on the host: {len(statuses)} ({len(ours.processes)} with memory)")
        print(f"whole process, median of {ROUNDS}:")
        base = medians.get("smem -t")
        for name, seconds in medians.items():
            ratio = f"  x{seconds / base:5.2f} smem -t" if base else ""
            print(f"  {name:36} {seconds * 1000:7.0f} ms{ratio}")
        extra = medians["nodemem report --processes --json"] - medians["nodemem report --json"]
        print(f"  --processes adds                     {extra * 1000:7.0f} ms")
        print("in process, best of 5:")
        print(f"  floor: read every smaps_rollup       {floor * 1000:7.1f} ms")
        print(
            f"  account_processes (--processes)      {accounting * 1000:7.1f} ms"
            f"  x{accounting / floor:5.2f} floor"
        )
        if smem is not None:
            # Over the pids both saw: the host's other processes may change meanwhile.
            theirs = smem_pss(smem)
            common = [p for p in ours.processes if p.pid in theirs]
            mine = sum(p.pss for p in common)
            other = sum(theirs[p.pid] for p in common)
            print(
                f"PSS total over the {len(common)} processes both read: nodemem "
                f"{mine / 2**20:.1f} MiB, smem {other / 2**20:.1f} MiB ({mine / other - 1:+.2%})"
            )
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

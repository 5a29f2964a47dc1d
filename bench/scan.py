"""Benchmark: one full Shmem attribution pass against the floor of reading /proc.

Starts 1,000 processes (forked, so they share the parent's pages): a third hold a
memfd and a tmpfs file open, a third have a touched shared mapping, a third are
plain. Times `scan_node()` and, in the same run, the floor: reading every
/proc/PID/status once from Python. Prints both and the ratio (goal: <= 3, and the
pass under 0.5 s on a 2-core machine). Run as root: `python bench/scan.py`.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from nodemem.host.shmem import scan_node

PROCESSES = 1000
ROUNDS = 5


def best_of(rounds: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def read_all_status() -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as file:
                    file.read()
                count += 1
            except OSError:
                pass
    return count


def start_children(tmpfs: str) -> list[int]:
    memfd = os.memfd_create("bench-memfd")
    os.write(memfd, b"x" * (1 << 20))
    tmpfs_file = os.open(os.path.join(tmpfs, "held"), os.O_RDWR | os.O_CREAT, 0o600)
    os.write(tmpfs_file, b"y" * (1 << 20))
    shared = mmap.mmap(-1, 1 << 20)
    shared[:] = b"z" * (1 << 20)
    pids = []
    for index in range(PROCESSES):
        pid = os.fork()
        if pid == 0:
            if index % 3 == 1:
                shared[0] = 1  # touch: RssShmem > 0, so its maps are scanned
            elif index % 3 == 2:
                os.close(memfd)
                os.close(tmpfs_file)
            signal.pause()
            os._exit(0)
        pids.append(pid)
    os.close(memfd)
    os.close(tmpfs_file)
    return pids


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (mounts a tmpfs)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "bench", tmp], check=True)
        pids: list[int] = []
        try:
            pids = start_children(tmp)
            scan = scan_node()
            floor = best_of(ROUNDS, read_all_status)
            full = best_of(ROUNDS, scan_node)
            print(f"processes on the host:        {len(scan.processes)}")
            print(f"floor, read every status:     {floor * 1000:8.1f} ms")
            print(f"full attribution pass:        {full * 1000:8.1f} ms")
            print(f"ratio (goal <= 3):            {full / floor:8.2f}")
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            for pid in pids:
                os.waitpid(pid, 0)
            subprocess.run(["umount", "-l", tmp], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures that create real kernel objects and always remove them."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from memcg_helpers import MEMORY_V1, remove_cgroup_tree

HOLDER = Path(__file__).with_name("shmem_holder.py")


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        line = next(line for line in meminfo if line.startswith("Shmem:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(autouse=True)
def shmem_released() -> Iterator[None]:
    """Every test gives back the Shmem it made before the next one measures.

    Namespaces die asynchronously (the kernel frees an IPC namespace from a work
    item), so teardown waits, with a deadline, instead of leaving noise behind.
    """
    start = _shmem_bytes()
    yield
    deadline = time.monotonic() + 10
    while (now := _shmem_bytes()) > start + (1 << 20):
        if time.monotonic() > deadline:
            pytest.fail(f"test left {now - start} bytes of Shmem behind")
        time.sleep(0.02)


Holder = Callable[..., dict[str, Any]]


@pytest.fixture
def holder() -> Iterator[Holder]:
    """holder(kind, size, path="", prefix=()) -> info; the process ends after the test."""
    started: list[subprocess.Popen[str]] = []
    cleanups: list[Callable[[], None]] = []

    def start(kind: str, size: int, path: str = "", prefix: tuple[str, ...] = ()) -> dict[str, Any]:
        proc = subprocess.Popen(
            [*prefix, sys.executable, str(HOLDER), kind, str(size), path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the object exists (or the holder died)
        if not line:
            raise AssertionError(f"holder {kind} exited with {proc.wait()}")
        info: dict[str, Any] = json.loads(line)
        info["process"] = proc
        if kind.startswith("sysv") and not prefix:  # segments outlive their creator
            shmid = info["shmid"]
            cleanups.append(lambda: _remove_segment(shmid))
        return info

    yield start
    for proc in started:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for cleanup in cleanups:
        cleanup()


def _remove_segment(shmid: int) -> None:
    subprocess.run(["ipcrm", "-m", str(shmid)], check=False, capture_output=True)


@pytest.fixture
def memcg_root() -> Iterator[Path]:
    """This test's own v1 memory cgroup; it and everything below it are removed after."""
    if not (MEMORY_V1 / "cgroup.procs").is_file():
        pytest.skip("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    top = MEMORY_V1 / f"nodemem-test-{secrets.token_hex(4)}"
    top.mkdir()
    try:
        yield top
    finally:
        remove_cgroup_tree(top)

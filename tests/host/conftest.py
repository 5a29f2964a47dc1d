"""Fixtures that create real kernel objects and always remove them."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from memcg_helpers import MEMORY_V1, UNIFIED, remove_cgroup_tree
from shmem_guard import ShmemMeter

HOLDER = Path(__file__).with_name("shmem_holder.py")


@pytest.fixture(scope="session")
def shmem_meter() -> Iterator[ShmemMeter]:
    """Measures the Shmem the tests create (their own memory cgroup), not the machine's:
    other activity on the host cannot fail a test (shmem_guard.py)."""
    meter = ShmemMeter()
    yield meter
    meter.close()


@pytest.fixture(autouse=True)
def shmem_released(shmem_meter: ShmemMeter) -> Iterator[None]:
    """Every test gives back the Shmem it made before the next one measures.

    Namespaces die asynchronously (the kernel frees an IPC namespace from a work
    item), so teardown waits, with a deadline, instead of leaving noise behind.
    """
    start = shmem_meter.bytes()
    yield
    if left := shmem_meter.left_behind(start):
        pytest.fail(f"test left {left} bytes of Shmem behind")


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
def v2_root() -> Iterator[Path]:
    """This test's own v2 cgroup, delegating memory to its subtree; removed with all below.
    guest_v2 tests run where v2 is: its absence under NODEMEM_REQUIRE_PRIVILEGED fails."""
    if not (UNIFIED / "cgroup.controllers").is_file():
        reason = "no cgroup v2 hierarchy at /sys/fs/cgroup"
        if os.environ.get("NODEMEM_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    (UNIFIED / "cgroup.subtree_control").write_text("+memory")
    top = UNIFIED / f"nodemem-test-{secrets.token_hex(4)}"
    top.mkdir()
    (top / "cgroup.subtree_control").write_text("+memory")
    try:
        yield top
    finally:
        remove_cgroup_tree(top)


@pytest.fixture
def memcg_root(shmem_meter: ShmemMeter) -> Iterator[Path]:
    """This test's own v1 memory cgroup; it and everything below it are removed after.
    It is made below the session's cgroup, so the Shmem guard counts what is charged here."""
    if not (MEMORY_V1 / "cgroup.procs").is_file():
        pytest.skip("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    top = (shmem_meter.cgroup or MEMORY_V1) / f"nodemem-test-{secrets.token_hex(4)}"
    top.mkdir()
    try:
        yield top
    finally:
        remove_cgroup_tree(top)

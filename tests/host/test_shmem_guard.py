"""The Shmem guard (shmem_guard.py, shmem_released in conftest.py) counts what the tests
create and only that: a leak of the test's own fails it, another process's Shmem on the
machine does not."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from memcg_helpers import MEMORY_V1, joining, remove_cgroup_tree
from shmem_guard import SLACK, ShmemMeter

pytestmark = pytest.mark.privileged

SIZE = 16 << 20
HOLDER = Path(__file__).with_name("shmem_holder.py")


@pytest.fixture
def meter(shmem_meter: ShmemMeter) -> ShmemMeter:
    if shmem_meter.cgroup is None:
        pytest.skip("no v1 memory hierarchy: the guard measures the machine (the guest)")
    return shmem_meter


def _memfd(size: int) -> int:
    fd = os.memfd_create("nodemem-guard-test")
    os.write(fd, b"\xa5" * size)
    return fd


def test_a_memfd_the_test_keeps_is_counted_until_it_is_closed(meter: ShmemMeter) -> None:
    start = meter.bytes()
    fd = _memfd(SIZE)
    try:
        assert meter.left_behind(start, timeout=0.5) >= SIZE
    finally:
        os.close(fd)
    assert meter.left_behind(start) == 0


def test_shmem_charged_below_memcg_root_is_counted(meter: ShmemMeter, memcg_root: Path) -> None:
    child = memcg_root / "pod"
    child.mkdir()
    start = meter.bytes()
    # preexec_fn is unsafe with threads; this test process starts none.
    holder = subprocess.Popen(
        [sys.executable, str(HOLDER), "memfd", str(SIZE), "guard"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=joining(child),  # noqa: PLW1509
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        assert meter.left_behind(start, timeout=0.5) >= SIZE
    finally:
        holder.kill()
        holder.wait()
    assert meter.left_behind(start) == 0


def _cgroup_shmem(cgroup: Path) -> int:
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    return int(stat["total_shmem"])


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A memory cgroup outside the session's: another workload on the same machine."""
    cgroup = MEMORY_V1 / f"nodemem-elsewhere-{secrets.token_hex(4)}"
    cgroup.mkdir()
    yield cgroup
    remove_cgroup_tree(cgroup)


def test_shmem_made_by_another_process_on_the_machine_is_not_counted(
    meter: ShmemMeter, elsewhere: Path
) -> None:
    start = meter.bytes()
    # preexec_fn is unsafe with threads; this test process starts none.
    stranger = subprocess.Popen(
        [sys.executable, str(HOLDER), "memfd", str(SIZE), "stranger"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=joining(elsewhere),  # noqa: PLW1509
    )
    try:
        assert stranger.stdout is not None and stranger.stdout.readline()
        # The machine's Shmem grew (a host-wide guard would fail), charged over there:
        assert _cgroup_shmem(elsewhere) >= SIZE
        assert meter.bytes() - start <= SLACK
    finally:
        stranger.kill()
        stranger.wait()

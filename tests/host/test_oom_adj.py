"""oom_score_adj on real processes: every AdjState, on processes this test started
(PID 1, kernel threads and the test process are only ever refused, never written)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemem.host.identity import is_kernel_thread
from nodemem.host.oom_adj import (
    AdjState,
    has_cap_sys_resource,
    read_oom_score_adj,
    set_oom_score_adj,
)
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import start_time

pytestmark = pytest.mark.privileged

PATHS = HostPaths()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def _cap_sys_resource_from_status() -> bool:
    status = Path("/proc/self/status").read_text()
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(cap_eff.split()[1], 16) & (1 << 24))


def test_raise_then_unchanged(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    initial = read_oom_score_adj(PATHS, sleeper.pid)  # inherited from this test process
    assert initial != 500
    result = set_oom_score_adj(PATHS, sleeper.pid, 500)
    assert result.state is AdjState.ADJUSTED, result.message
    assert result.previous == initial
    assert Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text().strip() == "500"
    assert read_oom_score_adj(PATHS, sleeper.pid) == 500

    # Same value again: read, compared, and not written at all.
    real_open = os.open

    def no_writes(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: int) -> int:
        if str(path).endswith("oom_score_adj") and flags & os.O_WRONLY:
            raise AssertionError(f"wrote {path} although the value was already set")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_writes)  # the module calls os.open
    again = set_oom_score_adj(PATHS, sleeper.pid, 500)
    assert again.state is AdjState.UNCHANGED
    assert again.previous == 500


def test_lowering_below_the_floor_depends_on_cap_sys_resource(
    sleeper: subprocess.Popen[bytes],
) -> None:
    has_cap = _cap_sys_resource_from_status()
    assert has_cap_sys_resource() is has_cap
    initial = read_oom_score_adj(PATHS, sleeper.pid)

    result = set_oom_score_adj(PATHS, sleeper.pid, -500)
    current = read_oom_score_adj(PATHS, sleeper.pid)
    if has_cap:
        assert result.state is AdjState.ADJUSTED, result.message
        assert current == -500
    else:
        assert result.state is AdjState.FORBIDDEN, result.message
        assert "CAP_SYS_RESOURCE, which this agent lacks" in result.message
        assert "floor" in result.message
        assert current == initial


def test_pid_1_is_refused_and_never_written() -> None:
    before = Path("/proc/1/oom_score_adj").read_text()
    result = set_oom_score_adj(PATHS, 1, 1000)
    assert result.state is AdjState.REFUSED
    assert "PID 1" in result.message
    assert Path("/proc/1/oom_score_adj").read_text() == before


def _a_kernel_thread() -> int:
    """kthreadd (pid 2) normally; any kernel thread otherwise."""
    candidates = [2, *sorted(int(name) for name in os.listdir("/proc") if name.isdigit())]
    for pid in candidates:
        try:
            if is_kernel_thread(PATHS, pid):
                return pid
        except Exception:  # vanished or unreadable: try the next
            continue
    pytest.skip("no kernel thread visible in this PID namespace")


def test_kernel_thread_is_refused() -> None:
    pid = _a_kernel_thread()
    before = Path(f"/proc/{pid}/oom_score_adj").read_text()
    result = set_oom_score_adj(PATHS, pid, 1000)
    assert result.state is AdjState.REFUSED
    assert "kernel thread" in result.message
    assert Path(f"/proc/{pid}/oom_score_adj").read_text() == before


def test_own_process_is_refused() -> None:
    before = read_oom_score_adj(PATHS, os.getpid())
    result = set_oom_score_adj(PATHS, os.getpid(), 1000)
    assert result.state is AdjState.REFUSED
    assert read_oom_score_adj(PATHS, os.getpid()) == before


def test_exited_process_is_gone() -> None:
    process = subprocess.Popen(["true"])
    process.wait(timeout=10)
    # Reaped: the pid is free. It is not reused within these microseconds (the kernel
    # allocates pids cyclically); checked anyway so a stranger is never written.
    if Path(f"/proc/{process.pid}").exists():
        pytest.skip("pid reused at once; refusing to write a process we did not start")
    result = set_oom_score_adj(PATHS, process.pid, 300)
    assert result.state is AdjState.GONE


def test_out_of_range_values_are_rejected(sleeper: subprocess.Popen[bytes]) -> None:
    initial = read_oom_score_adj(PATHS, sleeper.pid)
    for value in (-1001, 1001):
        with pytest.raises(ValueError):
            set_oom_score_adj(PATHS, sleeper.pid, value)
    assert read_oom_score_adj(PATHS, sleeper.pid) == initial


def test_another_start_time_is_vanished_and_not_written(sleeper: subprocess.Popen[bytes]) -> None:
    """The pid is right but the process is not the one matched (pid reuse)."""
    initial = read_oom_score_adj(PATHS, sleeper.pid)
    started = start_time(PATHS, sleeper.pid)
    result = set_oom_score_adj(PATHS, sleeper.pid, 700, expected_start=started - 1)
    assert result.state is AdjState.VANISHED, result.message
    assert f"pid {sleeper.pid} now names another process" in result.message
    assert read_oom_score_adj(PATHS, sleeper.pid) == initial
    # The identity it has: written.
    result = set_oom_score_adj(PATHS, sleeper.pid, 700, expected_start=started)
    assert result.state is AdjState.ADJUSTED, result.message
    assert read_oom_score_adj(PATHS, sleeper.pid) == 700


def test_matched_process_that_exited_is_vanished() -> None:
    process = subprocess.Popen(["sleep", "60"])
    try:
        started = start_time(PATHS, process.pid)
    finally:
        process.kill()
        process.wait(timeout=10)
    if Path(f"/proc/{process.pid}").exists():
        pytest.skip("pid reused at once; refusing to write a process we did not start")
    result = set_oom_score_adj(PATHS, process.pid, 300, expected_start=started)
    assert result.state is AdjState.VANISHED
    assert result.message == "the process exited before the write"

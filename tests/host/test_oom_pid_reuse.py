"""pid reuse between matching a process and writing its oom_score_adj (issue 15.7).

The race is made real: the matched process P is killed and reaped, and clone3 with
set_tid creates a new process Q with P's pid (an unrelated `sleep`). The write, given
P's identity, must leave Q's value alone and say Vanished. Only processes started here
are signalled (Q through its pidfd); no global state (ns_last_pid) is touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import nodemem.policy.oom as policy_oom
from nodemem.api.manifest import load_policies
from nodemem.api.report import ApplyReport
from nodemem.host import oom_adj
from nodemem.host.oom_adj import AdjState, set_oom_score_adj
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import start_time
from nodemem.policy.effective import effective_policy
from nodemem.policy.oom import OomResult, apply_to_process
from nodemem.policy.pods import PodDirectory
from nodemem.policy.report import oom_status
from nodemem.tables import apply_report_text
from samples import exec_done

pytestmark = pytest.mark.privileged

PATHS = HostPaths()
SYS_CLONE3 = {"x86_64": 435, "aarch64": 435}.get(platform.machine())
CLONE_PIDFD = 0x00001000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


# PyDLL keeps the GIL across the call: the child (a raw copy of this process) then owns
# it and can reach os.execv without waiting for a lock another thread held.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _unavailable(reason: str) -> None:
    if os.environ.get("NODEMEM_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"NODEMEM_REQUIRE_PRIVILEGED=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _clone3_exec(pid: int, argv: list[str]) -> tuple[int, int]:
    """Start `argv` as a child with exactly this pid; (pid, pidfd). Raises OSError."""
    if SYS_CLONE3 is None:
        raise OSError(errno.ENOSYS, f"no clone3 number known for {platform.machine()}")
    program = shutil.which(argv[0])
    assert program is not None
    tids = (ctypes.c_int32 * 1)(pid)
    pidfd = ctypes.c_int32(-1)
    args = _CloneArgs(
        flags=CLONE_PIDFD,
        pidfd=ctypes.addressof(pidfd),
        exit_signal=signal.SIGCHLD,
        set_tid=ctypes.addressof(tids),
        set_tid_size=1,
    )
    encoded = [arg.encode() for arg in argv]  # nothing left to allocate in the child
    child = _libc.syscall(
        ctypes.c_long(SYS_CLONE3), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))
    )
    if child == 0:  # the child: never returns into pytest
        try:
            os.execv(program, encoded)
        finally:
            os._exit(127)
    if child < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return child, pidfd.value


def _boot_ticks() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * CLOCK_TICKS // 1_000_000_000


def adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


@dataclass
class Reuse:
    """P (matched) and, once `reuse()` ran, Q (P's pid, started later)."""

    pid: int
    started: int  # P's start time
    token: str
    process: subprocess.Popen[bytes]
    q_pidfd: int | None = None
    q_adj: int | None = None
    spawned: list[tuple[int, int]] = field(default_factory=list)

    def reuse(self) -> None:
        """Kill and reap P, wait for the next clock tick, start Q with P's pid."""
        self.process.kill()
        self.process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _boot_ticks() <= self.started:  # start times have clock-tick resolution
            assert time.monotonic() < deadline, "the boot clock did not advance"
            time.sleep(0.001)
        argv = ["sleep", f"{secrets.randbelow(10**6) + 2 * 10**6}"]
        try:
            q, pidfd = _clone3_exec(self.pid, argv)
        except OSError as exc:
            if exc.errno == errno.EEXIST:  # another process took the pid first
                pytest.skip(f"pid {self.pid} was taken by a stranger before clone3")
            _unavailable(f"clone3 with set_tid unavailable: {exc}")
            raise
        self.spawned.append((q, pidfd))
        assert q == self.pid
        exec_done(q, argv)
        assert start_time(PATHS, q) != self.started
        self.q_pidfd = pidfd
        self.q_adj = adj(q)


@pytest.fixture
def matched() -> Iterator[Reuse]:
    """P: a `sleep` whose cmdline carries a token, with its identity read."""
    token = f"{secrets.randbelow(10**6) + 10**6}.7"
    process = subprocess.Popen(["sleep", token])
    state: Reuse | None = None
    try:
        exec_done(process.pid, ["sleep", token])
        state = Reuse(process.pid, start_time(PATHS, process.pid), token, process)
        yield state
    finally:
        process.kill()  # no-op once reaped
        process.wait(timeout=10)
        for q, pidfd in state.spawned if state else ():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # our Q, never a stranger
            os.waitpid(q, 0)
            os.close(pidfd)


def test_write_with_the_matched_identity_spares_the_new_owner_of_the_pid(
    matched: Reuse,
) -> None:
    """Match P, pid reused by Q, then the write with P's identity: Q untouched."""
    matched.reuse()
    target = 1000 if matched.q_adj != 1000 else 999
    result = set_oom_score_adj(PATHS, matched.pid, target, expected_start=matched.started)
    assert result.state is AdjState.VANISHED, result.message
    assert "now names another process" in result.message
    assert result.previous is None  # Q's value is not reported as P's
    assert adj(matched.pid) == matched.q_adj


def _rules(token: str, value: int) -> Any:
    document = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "reuse-test"},
        "spec": {"oom": [{"name": "p", "match": {"cmdline": token}, "oomScoreAdj": value}]},
    }
    return effective_policy(load_policies(yaml.safe_dump(document)), {}, 1 << 30).oom


def test_matcher_passes_the_identity_it_matched(
    matched: Reuse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule matched P's cmdline; the pid is reused before the write is called."""
    rules = _rules(matched.token, 1000)
    real_set = set_oom_score_adj

    def reuse_then_set(*args: Any, **kwargs: Any) -> oom_adj.AdjResult:
        matched.reuse()
        return real_set(*args, **kwargs)

    monkeypatch.setattr(policy_oom, "set_oom_score_adj", reuse_then_set)
    outcome = apply_to_process(PATHS, matched.pid, rules, PodDirectory(), dry_run=False)
    assert outcome is not None
    assert outcome.state == AdjState.VANISHED.value, outcome.message
    assert matched.q_adj is not None and matched.q_adj != 1000
    assert adj(matched.pid) == matched.q_adj

    # The report lists it per process and counts it, and it is not a failure.
    result = OomResult()
    result.record(outcome)
    assert not result.failed
    status = oom_status(rules, result)
    assert (status.vanished, status.adjusted, status.failed, status.forbidden) == (1, 0, 0, 0)
    assert [(f.pid, f.state) for f in status.failures] == [(matched.pid, "Vanished")]
    report = ApplyReport(policies=[], dry_run=False, tmpfs=[], cleanup=[], oom=status)
    text = apply_report_text(report)
    assert "0 failed, 1 vanished before the write" in text
    assert f"p: pid {matched.pid} sleep: Vanished: pid {matched.pid} now names another" in text


def test_reuse_after_the_file_is_opened_is_caught_before_the_write(
    matched: Reuse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delay sits between opening oom_score_adj and writing it (the issue's strace
    fault injection): P is replaced by Q there. Nothing reaches Q."""
    real_open: Callable[..., int] = os.open
    opened: list[str] = []

    def open_then_reuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith("oom_score_adj") and flags & os.O_WRONLY and not opened:
            opened.append(str(path))
            assert kwargs.get("dir_fd") is not None, "opened by path, not through the dir fd"
            matched.reuse()
        return fd

    monkeypatch.setattr(oom_adj.os, "open", open_then_reuse)
    result = set_oom_score_adj(PATHS, matched.pid, 1000, expected_start=matched.started)
    monkeypatch.undo()
    assert opened, "the write never opened oom_score_adj"
    assert result.state is AdjState.VANISHED, result.message
    assert matched.q_adj is not None and matched.q_adj != 1000
    assert adj(matched.pid) == matched.q_adj

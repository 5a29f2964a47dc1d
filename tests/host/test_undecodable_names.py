"""Names that are not UTF-8 (any process may choose them) never break a scan or a report.

A process renames itself to bytes that are not UTF-8 (prctl PR_SET_NAME, as any
process may), and holds files with such names open on a tmpfs: one deleted, one
still linked. Every command a user runs on such a node must finish, print valid
text, and show the bytes it cannot decode as U+FFFD.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemem.host.identity import read_identity
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import read_status, start_time
from nodemem.host.shmem import ShmemTracker, scan_node
from nodemem.policy.report import host_report

pytestmark = pytest.mark.privileged

MiB = 1 << 20
COMM = b"nm-\xff\xfe"
DELETED = b"deleted-\xff.log"
HELD = b"held-\xfe.log"
OLD = b"old-\xff\xfe.log"

# Renames itself, opens the files it is given (unlinking the first), raises its own
# oom_score_adj so it tops the victim preview, and waits for stdin to close.
RENAMED = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(bytes.fromhex(sys.argv[1])), 0, 0, 0)
fds = [os.open(bytes.fromhex(path), os.O_RDWR | os.O_CREAT, 0o600) for path in sys.argv[2:]]
for fd in fds:
    os.write(fd, b"x" * (1 << 20))
os.unlink(bytes.fromhex(sys.argv[2]))
with open("/proc/self/oom_score_adj", "w") as adj:
    adj.write("1000")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def renamed(mount_tmpfs) -> Iterator[tuple[int, Path]]:
    point: Path = mount_tmpfs()
    base = os.fsencode(point)
    old = base + b"/" + OLD
    with open(old, "wb") as file:
        file.write(b"y" * MiB)
    os.utime(old, (1, 1))  # 1970: older than any cleanup's olderThan
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-c",
            RENAMED,
            COMM.hex(),
            (base + b"/" + DELETED).hex(),
            (base + b"/" + HELD).hex(),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline() == b"ready\n"
    yield process.pid, point
    process.stdin.close()
    process.wait(timeout=10)
    process.stdout.close()


def nodemem(*args: str) -> subprocess.CompletedProcess[bytes]:
    # As a user runs it: a real stdout, strict UTF-8.
    return subprocess.run(
        [sys.executable, "-m", "nodemem.cli", *args],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        check=False,
    )


def nodemem_json(*args: str) -> dict[str, Any]:
    result = nodemem(*args, "--json")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    document: dict[str, Any] = json.loads(result.stdout.decode("utf-8"))
    return document


def write_policy(directory: Path, spec: dict[str, Any]) -> Path:
    policy = directory / "policy.yaml"
    document = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "undecodable"},
        "spec": spec,
    }
    policy.write_text(yaml.safe_dump(document))
    return policy


def test_the_host_readers_replace_what_they_cannot_decode(renamed: tuple[int, Path]) -> None:
    pid, _point = renamed
    paths = HostPaths()
    assert read_status(paths, pid).comm == "nm-\ufffd\ufffd"
    assert start_time(paths, pid) > 0
    assert read_identity(paths, pid).comm == "nm-\ufffd\ufffd"


def test_scans_keep_the_real_names_and_reports_make_them_text(
    renamed: tuple[int, Path],
) -> None:
    pid, point = renamed
    tracker = ShmemTracker()
    for scan in (scan_node(), tracker.scan(), tracker.scan()):
        [deleted] = [f for f in scan.shmem.deleted_open_files if f.pid == pid]
        # The host side keeps the bytes (a path that still works in system calls) ...
        assert os.fsencode(deleted.path) == os.fsencode(point) + b"/" + DELETED
        assert deleted.comm == "nm-\ufffd\ufffd"
        # ... the report, which is JSON and API text, has U+FFFD for them.
        [reported] = [f for f in host_report(scan).shmem.deleted_open_files if f.pid == pid]
        assert reported.path == f"{point}/deleted-\ufffd.log"
        reported.model_dump_json()


def test_a_tmpfs_mounted_at_such_a_path_is_measured_and_limited(
    mount_tmpfs, tmp_path: Path
) -> None:
    point = mount_tmpfs(at=Path(os.fsdecode(os.fsencode(tmp_path) + b"/mnt-\xff")))
    with open(point / "data", "wb") as file:
        file.write(b"z" * (2 * MiB))
    [item] = [
        o for o in nodemem_json("report", "--top", "100")["shmem"]["top"] if "mnt-" in o["name"]
    ]
    assert item["name"] == f"{tmp_path}/mnt-\ufffd"
    assert item["bytes"] == 2 * MiB
    assert item["note"] == ""

    policy = write_policy(tmp_path, {"tmpfs": [{"path": f"{tmp_path}/mnt-*", "size": "8Mi"}]})
    [limit] = nodemem_json("apply", "-f", str(policy))["tmpfs"]
    assert (limit["path"], limit["state"]) == (f"{tmp_path}/mnt-\ufffd", "Applied")
    assert os.statvfs(point).f_blocks * os.statvfs(point).f_frsize == 8 * MiB


def test_report_prints_valid_text(renamed: tuple[int, Path]) -> None:
    pid, _point = renamed
    report = nodemem_json("report")
    [victim] = [v for v in report["oom"]["predictedVictims"] if v["pid"] == pid]
    assert victim["comm"] == "nm-\ufffd\ufffd"

    tables = nodemem("report")
    assert tables.returncode == 0, tables.stderr.decode(errors="replace")
    assert "nm-\ufffd\ufffd" in tables.stdout.decode("utf-8")


def test_apply_cleans_up_and_reports_such_files(renamed: tuple[int, Path], tmp_path: Path) -> None:
    _pid, point = renamed
    rule = {"name": "logs", "paths": [f"{point}/*.log"], "schedule": "0 * * * *", "olderThan": "1s"}
    policy = write_policy(tmp_path, {"cleanup": [rule]})
    os.utime(os.fsencode(point) + b"/" + HELD, (1, 1))
    [cleanup] = nodemem_json("apply", "-f", str(policy), "--run-cleanup")["cleanup"]
    assert cleanup["filesRemoved"] == 1
    assert sorted(os.listdir(os.fsencode(point))) == [HELD]  # held open: kept
    assert [held["path"] for held in cleanup["heldOpen"]] == [f"{point}/held-\ufffd.log"]

    tables = nodemem("apply", "-f", str(policy), "--run-cleanup", "--dry-run")
    assert tables.returncode == 0, tables.stderr.decode(errors="replace")
    tables.stdout.decode("utf-8")

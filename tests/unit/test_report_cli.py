"""`nodemem report`: the JSON document's shape and the refusals it survives."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodemem.cli import main

MEMORY_KEYS = {
    "totalBytes",
    "availableBytes",
    "shmemBytes",
    "slabBytes",
    "slabReclaimableBytes",
    "slabUnreclaimableBytes",
    "kernelStackBytes",
    "pageTablesBytes",
    "vmallocUsedBytes",
    "processRssBytes",
    "pressure",  # /proc/pressure/memory, null without PSI: tests/unit/test_memcg_futile.py
    "oomKills",
}
ITEM_KEYS = {"kind", "name", "bytes", "pids", "pod", "note"}
EXAMPLE = Path(__file__).parents[2] / "examples" / "dev-shm-limit.yaml"


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:  # type: ignore[type-arg]
    assert main(["report", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_json_has_the_documented_shape_and_adds_up(capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(capsys)
    assert set(report) == {
        "warnings",
        "memory",
        "shmem",
        "oom",
        "unreadableProcesses",
        "unreadable",
        "pods",
    }
    assert isinstance(report["pods"], list)  # this host has no kubepods: tests/unit/test_podmem.py
    assert report["warnings"] == []  # this host's /proc is sane
    oom = report["oom"]
    assert oom["scope"] == "node"
    assert isinstance(oom["badnessTruncationRisk"], bool)
    scores = [victim["score"] for victim in oom["predictedVictims"]]
    assert scores == sorted(scores, reverse=True)
    for victim in oom["predictedVictims"]:
        assert set(victim) == {
            *("pid", "comm", "oomScoreAdj", "score", "rssBytes", "pod"),
            *("oomGroup", "killedWith", "groupRssBytes"),
        }
        assert victim["pid"] != 1
        assert victim["oomGroup"] is None  # this host's memory controller is v1
        assert victim["groupRssBytes"] == victim["rssBytes"]
    assert set(report["memory"]) == MEMORY_KEYS
    shmem = report["shmem"]
    assert set(shmem["byKind"]) == {"tmpfs", "sysv", "memfd", "sharedAnon", "detachedTmpfs"}
    assert sum(shmem["byKind"].values()) == shmem["attributedBytes"]
    assert shmem["totalBytes"] - shmem["attributedBytes"] == shmem["unaccountedBytes"]
    assert shmem["totalBytes"] == report["memory"]["shmemBytes"]
    sizes = [item["bytes"] for item in shmem["top"]]
    assert sizes == sorted(sizes, reverse=True)
    for item in shmem["top"]:
        assert set(item) == ITEM_KEYS
        assert all(set(p) == {"pid", "comm"} for p in item["pids"])


def test_top_limits_the_items(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(report_json(capsys, "--top", "1")["shmem"]["top"]) <= 1


def test_text_report_names_the_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "Shmem:" in out
    assert "attributed" in out
    assert "unaccounted" in out


@pytest.mark.privileged  # root is needed to drop to another user
def test_refusals_are_counted_not_fatal() -> None:
    # As an unprivileged user most processes' fds and maps are refused (EACCES): the scan
    # still completes and says how many processes it could not read.
    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is needed"
    result = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "nodemem.cli",
            "report",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["unreadableProcesses"] >= 1
    assert {entry["reason"] for entry in report["unreadable"]} <= {
        "Permission denied",
        "Operation not permitted",
    }


def fake_proc(tmp_path: Path, meminfo: str | bytes) -> Path:
    """A --proc-root with nothing but this meminfo (no processes, no mounts)."""
    root = tmp_path / "proc"
    root.mkdir()
    data = meminfo.encode() if isinstance(meminfo, str) else meminfo
    (root / "meminfo").write_bytes(data)
    return root


def with_field(key: str, value: str) -> str:
    real = Path("/proc/meminfo").read_text()
    return re.sub(rf"^{key}:.*$", f"{key}: {value}", real, count=1, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("meminfo", "warning"),
    [
        (with_field("Shmem", "99999999999 kB"), "Shmem (102399999998976 bytes) exceeds MemTotal"),
        (with_field("MemTotal", "0 kB"), "MemTotal is 0"),
        (with_field("Slab", f"{10**24} kB"), "more than any machine has"),
    ],
    ids=["shmem-above-total", "no-memory", "10^27-bytes"],
)
def test_impossible_numbers_are_shown_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], meminfo: str, warning: str
) -> None:
    proc = fake_proc(tmp_path, meminfo)
    assert main(["report", "--proc-root", str(proc), "--json"]) == 0
    captured = capsys.readouterr()
    (found,) = json.loads(captured.out)["warnings"]
    assert warning in found
    assert warning in captured.err
    assert main(["report", "--proc-root", str(proc)]) == 0
    assert f"WARNING: {found}" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize(
    ("meminfo", "message"),
    [
        ("MemTotal: 2465 kB\nMemFree:", "meminfo line 2: malformed: 'MemFree:'"),
        ("MemTotal:       24683568 kB\n", "meminfo lacks MemAvailable"),
        ("\x00\xff garbage\n", "meminfo line 1: malformed"),
        ("MemTotal: lots kB\n", "meminfo line 1: MemTotal is not a number"),
        (b"MemTotal: \xff\xfe kB\n", "meminfo line 1: MemTotal is not a number"),
    ],
    ids=["truncated-line", "truncated-file", "garbage", "not-a-number", "not-utf8"],
)
def test_a_meminfo_that_cannot_be_trusted_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], meminfo: str | bytes, message: str
) -> None:
    proc = fake_proc(tmp_path, meminfo)
    for command in (["report"], ["apply", "-f", str(EXAMPLE), "--dry-run"]):
        assert main([*command, "--proc-root", str(proc)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"nodemem: {proc}/meminfo: {message}"), err


def test_a_wrong_proc_root_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--proc-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nodemem: --proc-root {tmp_path / 'nope'}: cannot read"), err
    assert "--oom-cgroup" not in err


@pytest.mark.parametrize("top", ["-1", "0", "ten"])
def test_top_must_be_a_positive_number(top: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["report", "--top", top])
    assert exited.value.code == 2
    assert "--top" in capsys.readouterr().err


def test_apply_names_a_proc_root_without_a_mount_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = fake_proc(tmp_path, Path("/proc/meminfo").read_text())
    assert main(["apply", "-f", str(EXAMPLE), "--dry-run", "--proc-root", str(proc)]) == 2
    assert f"--proc-root {proc}: cannot read {proc}/self/mountinfo" in capsys.readouterr().err
    (proc / "self").mkdir()
    (proc / "self" / "mountinfo").write_text("garbage\n")
    assert main(["apply", "-f", str(EXAMPLE), "--dry-run", "--proc-root", str(proc)]) == 1
    assert "mountinfo line 1: malformed: 'garbage'" in capsys.readouterr().err

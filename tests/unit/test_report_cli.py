"""`nodemem report`: the JSON document's shape and the refusals it survives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

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
}
ITEM_KEYS = {"kind", "name", "bytes", "pids", "pod", "note"}


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:  # type: ignore[type-arg]
    assert main(["report", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_json_has_the_documented_shape_and_adds_up(capsys: pytest.CaptureFixture[str]) -> None:
    report = report_json(capsys)
    assert set(report) == {"memory", "shmem", "oom", "unreadableProcesses", "unreadable"}
    oom = report["oom"]
    assert oom["scope"] == "node"
    assert isinstance(oom["badnessTruncationRisk"], bool)
    scores = [victim["score"] for victim in oom["predictedVictims"]]
    assert scores == sorted(scores, reverse=True)
    for victim in oom["predictedVictims"]:
        assert set(victim) == {"pid", "comm", "oomScoreAdj", "score", "rssBytes", "pod"}
        assert victim["pid"] != 1
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

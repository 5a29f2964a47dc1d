"""`nodemem report --processes`: RSS, PSS, USS and Shmem of real processes whose memory
the test made, and refusals counted when the view is unprivileged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nodemem.cli import main
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import read_status
from nodemem.host.smaps import ProcessMemory, account_processes

HOLDER = Path(__file__).with_name("memory_holder.py")
MIB = 1 << 20
EVIL_COMM = "big\x1b[2J\nfake"  # a terminal escape and a newline: cannot forge a line
Started = list[subprocess.Popen[bytes]]


def hold(processes: Started, *args: object, comm: str | None = None) -> dict[str, Any]:
    """Start a memory holder (killed by the `processes` fixture); its JSON line once ready."""
    env = {**os.environ, "HOLDER_COMM": comm} if comm is not None else None
    proc = subprocess.Popen(
        [sys.executable, str(HOLDER), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    processes.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the memory is in place
    assert line, f"holder {args} exited with {proc.wait()}"
    info: dict[str, Any] = json.loads(line)
    return info


def measure(*pids: int) -> dict[int, ProcessMemory]:
    paths = HostPaths()
    accounting = account_processes(paths, {pid: read_status(paths, pid) for pid in pids})
    assert not accounting.failures
    return {p.pid: p for p in accounting.processes}


def near(value: int, expected: int, tolerance: int = 2 * MIB) -> bool:
    return abs(value - expected) <= tolerance


def test_private_memory_is_in_uss_pss_and_rss(
    processes: Started, capsys: pytest.CaptureFixture[str]
) -> None:
    base = hold(processes, "private", 0)["pid"]  # the interpreter alone
    big = hold(processes, "private", 64 * MIB, comm=EVIL_COMM)["pid"]
    got = measure(base, big)
    for field in ("uss", "pss", "rss"):
        grown = getattr(got[big], field) - getattr(got[base], field)
        assert near(grown, 64 * MIB), (field, grown)
    assert got[big].pss_shmem == got[big].rss_shmem == 0

    assert main(["report", "--processes", "100000", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["processes"]
    rows = {row["pid"]: row for row in summary["top"]}
    assert near(rows[big]["ussBytes"], got[big].uss)
    assert rows[big]["pod"] is None
    assert rows[big]["comm"] == EVIL_COMM.replace("\n", "\\n")  # as status escapes it
    pss = [row["pssBytes"] for row in summary["top"]]
    assert pss == sorted(pss, reverse=True)
    assert 2 not in rows  # kthreadd: no memory of its own, not listed
    total = summary["total"]
    assert total["processes"] == len(summary["top"])
    assert total["pssBytes"] == sum(pss)
    assert total["ussBytes"] <= total["pssBytes"] <= total["rssBytes"]

    assert main(["report", "--processes", "1"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("Processes by PSS") :].splitlines()
    assert section[1].split() == ["PID", "COMM", "USS", "PSS", "RSS", "SHMEM", "POD"]
    assert "total (" in section[3]  # one process, then the total line

    assert main(["report", "--processes", "100000"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("Processes by PSS") :].splitlines()
    (line,) = [line for line in section if line.startswith(f"  {big} ")]
    assert line.split()[:2] == [str(big), "big\\x1b[2J\\nfake"]


def test_a_shared_memfd_is_split_between_the_two_processes_mapping_it(
    processes: Started,
) -> None:
    base = hold(processes, "private", 0)["pid"]
    owner = hold(processes, "memfd", 32 * MIB)
    other = hold(processes, "map", f"/proc/{owner['pid']}/fd/{owner['fd']}", 32 * MIB)["pid"]
    got = measure(base, owner["pid"], other)
    for pid in (owner["pid"], other):
        memory = got[pid]
        assert near(memory.rss_shmem, 32 * MIB, MIB), memory
        assert memory.pss_shmem is not None
        assert near(memory.pss_shmem, 16 * MIB, MIB), memory  # each pays half
        assert memory.rss - got[base].rss >= 31 * MIB
        assert near(memory.pss - got[base].pss, 16 * MIB), memory
        assert memory.uss - got[base].uss < 2 * MIB  # shared: killing one frees none of it


@pytest.mark.privileged  # root is needed to drop to another user
def test_other_users_processes_are_counted_refusals(processes: Started) -> None:
    root_holder = hold(processes, "private", 0)["pid"]
    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is needed"
    command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    report = subprocess.Popen(
        [*command, "-m", "nodemem.cli", "report", "--processes", "100000", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = report.communicate(timeout=60)
    assert report.returncode == 0, err
    summary = json.loads(out)["processes"]
    listed = {row["pid"] for row in summary["top"]}
    assert report.pid in listed  # setpriv execs: the report reads itself
    assert root_holder not in listed
    assert summary["unreadableProcesses"] >= 2  # at least the holder and this test
    assert len(summary["unreadable"]) == min(summary["unreadableProcesses"], 20)
    assert {entry["what"] for entry in summary["unreadable"]} == {"smaps_rollup"}
    assert {entry["reason"] for entry in summary["unreadable"]} <= {
        "Permission denied",
        "Operation not permitted",
    }


def test_the_count_defaults_to_top_and_must_be_positive(
    processes: Started, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        hold(processes, "private", 0)  # more processes than asked for, whatever the host runs
    assert main(["report", "--processes", "--top", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["processes"]["top"]) == 2
    assert main(["report", "--json", "--processes", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["processes"]["top"]) == 3
    for wrong in ("0", "-1", "many"):
        with pytest.raises(SystemExit) as exited:
            main(["report", "--processes", wrong])
        assert exited.value.code == 2
        assert "--processes" in capsys.readouterr().err

"""Benchmark: `nodemem --help` and `nodemem report` as whole processes, against smem and the shell.

What an SRE runs in a loop during an incident is a whole process, so that is what is timed:
wall time from fork to exit, median of --runs rounds, the commands interleaved within each
round so that a busy moment of the machine costs every command alike. Baselines, same run:

- `smem -t` (Debian's smem, also Python: per-process PSS from every smaps; installed with
  apt-get when missing),
- `cat /proc/meminfo; df -t tmpfs; ipcs -m` (the shell's answer, the floor).

Twice: on the node as it is, and with 1,000 extra idle processes (`sleep`, started by this
script and killed by PID at the end). Goals (issue 12): `nodemem --help` <= 0.15 s, and
`nodemem report` <= 4x `smem -t` with the 1,000 extra processes.

Python's bytecode cache is on for every command (a private PYTHONPYCACHEPREFIX, filled by a
warm-up run): `pip install` compiles nodemem's bytecode, so that is what a user starts.
One extra row shows `nodemem --help` from this source tree with PYTHONDONTWRITEBYTECODE=1
(how `make test` and a fresh checkout run it: nodemem's own modules compiled every start).
Run as root (smem reads every process's smaps): `python bench/cli_startup.py`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

EXTRA_PROCESSES = 1000
HELP_GOAL_S = 0.15
REPORT_GOAL_RATIO = 4.0
TRIO = "cat /proc/meminfo; df -t tmpfs; ipcs -m"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dev-shm-limit.yaml"


def ensure_smem() -> str:
    found = shutil.which("smem")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "smem"]
        if subprocess.run(install, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(install, env=env, check=True)
        found = shutil.which("smem")
    if found is None:
        raise SystemExit("smem is needed (Debian: apt-get install smem), as root to install it")
    return found


class Run(NamedTuple):
    wall: float
    cpu: float  # user + sys of the process and its children (the shell trio's commands)


def run_once(argv: Sequence[str], env: Mapping[str, str]) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{tail}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Run(elapsed, cpu)


def measure(
    commands: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], runs: int
) -> dict[str, list[Run]]:
    """Every command once per round (warm-up first, not counted); the order rotates."""
    names = list(commands)
    for argv, env in commands.values():
        run_once(argv, env)
    times: dict[str, list[Run]] = {name: [] for name in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            argv, env = commands[name]
            times[name].append(run_once(argv, env))
    return times


def start_sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    # The Popen objects are kept: a dropped one would be polled by every later Popen.
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            sleepers.append(subprocess.Popen(["sleep", "3600"]))
        deadline = time.monotonic() + 30
        for sleeper in sleepers:  # exec'd, so that each looks like any idle process
            while Path(f"/proc/{sleeper.pid}/comm").read_text().strip() != "sleep":
                if time.monotonic() > deadline:
                    raise SystemExit(f"sleep {sleeper.pid} did not start within 30 s")
                time.sleep(0.001)
    except BaseException:
        stop_sleepers(sleepers)
        raise
    return sleepers


def stop_sleepers(sleepers: list[subprocess.Popen[bytes]]) -> None:
    for sleeper in sleepers:  # our children, not reaped yet: the PID is still theirs
        os.kill(sleeper.pid, signal.SIGKILL)
    for sleeper in sleepers:
        sleeper.wait()


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def report_phase(title: str, times: Mapping[str, list[Run]]) -> dict[str, float]:
    """Prints the phase's table; returns the median wall time of each command."""
    medians = {name: statistics.median(run.wall for run in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(run.cpu for run in runs) for name, runs in times.items()}
    rows = [["command", "wall median", "min", "max", "÷ smem -t", "÷ shell trio", "CPU median"]]
    for name, runs in times.items():
        rows.append(
            [
                name,
                f"{medians[name]:.3f} s",
                f"{min(run.wall for run in runs):.3f} s",
                f"{max(run.wall for run in runs):.3f} s",
                f"{medians[name] / medians['smem -t']:.2f}",
                f"{medians[name] / medians['shell trio']:.1f}",
                f"{cpu[name]:.3f} s",
            ]
        )
    print(f"\n{title} ({len(next(iter(times.values())))} runs each, interleaved)")
    print_table(rows)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="rounds per phase (default 10)")
    parser.add_argument("--extra", type=int, default=EXTRA_PROCESSES, help="extra processes")
    args = parser.parse_args()
    smem = ensure_smem()
    nodemem = str(Path(sys.executable).with_name("nodemem"))

    with tempfile.TemporaryDirectory(prefix="nodemem-bench-pyc-") as pycache:
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = pycache
        uncached = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
        uncached["PYTHONDONTWRITEBYTECODE"] = "1"
        commands: dict[str, tuple[Sequence[str], Mapping[str, str]]] = {
            "nodemem --help": ([nodemem, "--help"], cached),
            "nodemem report": ([nodemem, "report"], cached),
            "nodemem apply --dry-run": (
                [nodemem, "apply", "-f", str(EXAMPLE), "--dry-run"],
                cached,
            ),
            "smem -t": ([smem, "-t"], cached),
            "shell trio": (["sh", "-c", TRIO], cached),
            "nodemem --help, no bytecode cache": ([nodemem, "--help"], uncached),
        }
        processes = sum(name.isdigit() for name in os.listdir("/proc"))
        plain = report_phase(f"This node ({processes} processes)", measure(commands, args.runs))
        sleepers = start_sleepers(args.extra)
        try:
            crowded = report_phase(
                f"With {args.extra:,} extra idle processes", measure(commands, args.runs)
            )
        finally:
            stop_sleepers(sleepers)

    help_s = max(plain["nodemem --help"], crowded["nodemem --help"])
    ratio = crowded["nodemem report"] / crowded["smem -t"]
    print("\nGoals")
    print(
        f"  nodemem --help {help_s:.3f} s (the slower phase) <= {HELP_GOAL_S} s: "
        + ("met" if help_s <= HELP_GOAL_S else f"NOT MET by {help_s - HELP_GOAL_S:.3f} s")
    )
    print(
        f"  nodemem report {ratio:.2f}x smem -t with {args.extra:,} extra processes "
        f"<= {REPORT_GOAL_RATIO}x: "
        + ("met" if ratio <= REPORT_GOAL_RATIO else f"NOT MET by {ratio - REPORT_GOAL_RATIO:.2f}x")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

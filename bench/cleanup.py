"""Benchmark: nodemem cleanup against find(1) and systemd-tmpfiles on identical tmpfs trees.

Run as root (it mounts a tmpfs under a temporary directory): `python bench/cleanup.py`.
Each round builds identical trees of small files spread over a few hundred directories,
half of them older than the threshold, on one tmpfs, and removes the old half of each:

- `run_cleanup` in this process (the engine alone) against `find DIR -type f -mmin +N -delete`
  (goal: at most 1.5x find);
- the whole `nodemem apply -f P --run-cleanup` process against `systemd-tmpfiles --clean C`
  with the equivalent line `d DIR - - - m:Nm` (goal: at most 2x). The same apply on an empty
  tree is timed too: what the process costs before and besides the walk (start-up, policy,
  held-open scan, report).

systemd-tmpfiles runs only with `--clean` and the bench's own config file, given by path, so
it reads no other configuration and touches nothing but its tree; Debian's systemd package is
installed with apt-get when the command is missing. Ratios are per round (paired runs on the
same tmpfs, each pair back to back, who goes first alternating); their median is the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from nodemem.host.cleanup import CleanupSpec, run_cleanup
from nodemem.host.paths import HostPaths

THRESHOLD_MINUTES = 60
OLD_AGE_S = 2 * THRESHOLD_MINUTES * 60
GOAL_FIND = 1.5
GOAL_TMPFILES = 2.0
TREES = ("engine", "find", "tmpfiles", "apply")


def build_tree(root: Path, files: int, dirs: int, file_bytes: int) -> int:
    """Create `files` files round-robin over `dirs` directories; every other one is old.

    Returns the number of old files.
    """
    for index in range(dirs):
        (root / f"d{index:03}").mkdir(parents=True)
    payload = b"x" * file_bytes
    old = time.time() - OLD_AGE_S
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for index in range(files):
        fd = os.open(f"{root}/d{index % dirs:03}/f{index}", flags, 0o644)
        try:
            os.write(fd, payload)
            if index % 2:
                os.utime(fd, (old, old))
        finally:
            os.close(fd)
    return files // 2


def count_files(root: Path) -> tuple[int, int]:
    """(files, directories) below root."""
    files = dirs = 0
    for _, subdirs, names in os.walk(root):
        files += len(names)
        dirs += len(subdirs)
    return files, dirs


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return elapsed


def time_run_cleanup(tree: Path) -> float:
    spec = CleanupSpec(
        name="bench", paths=(f"{tree}/**",), older_than=timedelta(minutes=THRESHOLD_MINUTES)
    )
    start = time.perf_counter()
    result = run_cleanup(HostPaths(), spec, {}, dry_run=False)
    elapsed = time.perf_counter() - start
    if result.errors or result.skipped_not_tmpfs:
        raise SystemExit(f"run_cleanup failed: {result.errors or result.skipped_not_tmpfs}")
    return elapsed


def write_policy(path: Path, tree: Path) -> Path:
    path.write_text(
        "apiVersion: nodemem.dev/v1alpha1\n"
        "kind: NodeMemoryPolicy\n"
        "metadata: {name: bench-cleanup}\n"
        "spec:\n"
        "  cleanup:\n"
        "    - name: bench\n"
        f'      paths: ["{tree}/**"]\n'
        '      schedule: "0 * * * *"\n'
        f"      olderThan: {THRESHOLD_MINUTES}m\n"
    )
    return path


def write_tmpfiles_config(path: Path, tree: Path) -> Path:
    # m: only mtime decides, as the nodemem rule (age: [mtime]); tmpfiles.d(5) "age-by".
    path.write_text(f"d {tree} - - - m:{THRESHOLD_MINUTES}m -\n")
    return path


def ensure_systemd_tmpfiles() -> str:
    found = shutil.which("systemd-tmpfiles")
    if found is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], check=True, env=env)
        found = shutil.which("systemd-tmpfiles")
    if found is None:
        raise SystemExit("systemd-tmpfiles not found after installing Debian's systemd")
    return found


def one_round(
    mnt: Path, workdir: Path, args: argparse.Namespace, tmpfiles: str, number: int
) -> dict[str, float]:
    """Build the trees, clean each with its tool, check they all kept the same files."""
    nodemem = str(Path(sys.executable).with_name("nodemem"))
    trees = {name: mnt / name for name in TREES}
    old = {
        name: build_tree(tree, args.files, args.dirs, args.file_bytes)
        for name, tree in trees.items()
    }
    (mnt / "empty").mkdir()
    policy = write_policy(workdir / "policy.yaml", trees["apply"])
    empty_policy = write_policy(workdir / "empty.yaml", mnt / "empty")
    config = write_tmpfiles_config(workdir / "bench.conf", trees["tmpfiles"])

    find = ["find", str(trees["find"]), "-type", "f", "-mmin", f"+{THRESHOLD_MINUTES}", "-delete"]
    runs: dict[str, Callable[[], float]] = {
        "engine": lambda: time_run_cleanup(trees["engine"]),
        "find": lambda: timed(find),
        "tmpfiles": lambda: timed([tmpfiles, "--clean", str(config)]),
        "apply": lambda: timed([nodemem, "apply", "-f", str(policy), "--run-cleanup"]),
        "apply_empty": lambda: timed([nodemem, "apply", "-f", str(empty_policy), "--run-cleanup"]),
    }
    # Each pair back to back, so that both see the same load; who goes first alternates.
    times: dict[str, float] = {}
    for pair in (("engine", "find"), ("apply", "tmpfiles")):
        for key in pair if number % 2 == 0 else reversed(pair):
            times[key] = runs[key]()
    times["apply_empty"] = runs["apply_empty"]()

    expected = (args.files - old["engine"], args.dirs)
    left = {name: count_files(tree) for name, tree in trees.items()}
    if any(counts != expected for counts in left.values()):
        raise SystemExit(f"trees differ after cleanup: left {left}")
    for path in (*trees.values(), mnt / "empty"):
        shutil.rmtree(path)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files per tree")
    parser.add_argument("--dirs", type=int, default=300, help="directories per tree")
    parser.add_argument("--file-bytes", type=int, default=64, help="size of each file")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (median taken)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/cleanup.py needs root: it mounts a tmpfs", file=sys.stderr)
        return 2
    tmpfiles = ensure_systemd_tmpfiles()

    workdir = Path(tempfile.mkdtemp(prefix="nodemem-bench-cleanup-"))
    mount_point = workdir / "mnt"
    mount_point.mkdir()
    pages = -(-args.file_bytes // 4096)
    size_mib = 64 + len(TREES) * args.files * pages * 4096 // (1024 * 1024)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "nodemem-bench", str(mount_point)],
        check=True,
    )
    try:
        rounds = [
            one_round(mount_point, workdir, args, tmpfiles, number) for number in range(args.rounds)
        ]
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        shutil.rmtree(workdir)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratios(ours: str, theirs: str) -> list[float]:
        return [r[ours] / r[theirs] for r in rounds]

    print(
        f"{args.rounds} rounds; each: {len(TREES)} trees of {args.files} files in {args.dirs} "
        f"directories on one tmpfs, {args.files // 2} old each (median time, s)"
    )
    rows = [
        ("find -type f -mmin +N -delete", "find"),
        ("run_cleanup (in-process engine)", "engine"),
        ("systemd-tmpfiles --clean (d DIR - - - m:Nm)", "tmpfiles"),
        ("nodemem apply --run-cleanup (whole process)", "apply"),
        ("  same, on an empty tree (start-up, policy, held-open scan, report)", "apply_empty"),
    ]
    for label, key in rows:
        print(f"  {label:<70} {median(key):.3f}")
    walk = median("apply") - median("apply_empty")
    print(f"  {'  difference (the walk and removal)':<70} {walk:.3f}")
    verdicts = []
    for ours, theirs, goal in (("engine", "find", GOAL_FIND), ("apply", "tmpfiles", GOAL_TMPFILES)):
        values = ratios(ours, theirs)
        mid = statistics.median(values)
        met = mid <= goal
        verdicts.append(met)
        each = ", ".join(f"{value:.2f}" for value in values)
        verdict = "met" if met else "missed"
        print(
            f"ratio {ours} / {theirs}: median {mid:.2f}x "
            f"(rounds {each}; goal <= {goal}x: {verdict})"
        )
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

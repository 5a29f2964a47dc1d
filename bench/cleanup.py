"""Benchmark: run_cleanup against `find DIR -type f -mmin +N -delete` on identical tmpfs trees.

Run as root (it mounts a tmpfs under a temporary directory): `python bench/cleanup.py`.
Builds two identical trees of small files spread over a few hundred directories, half of
them older than the threshold, removes the old half of one tree with run_cleanup and of the
other with find(1), and prints both times and their ratio (goal: at most 2x find).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from nodemem.host.cleanup import CleanupSpec, run_cleanup
from nodemem.host.paths import HostPaths

THRESHOLD_MINUTES = 60
OLD_AGE_S = 2 * THRESHOLD_MINUTES * 60


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


def count_files(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def time_run_cleanup(host_root: Path, tree: str) -> tuple[float, int]:
    spec = CleanupSpec(
        name="bench", paths=(f"/{tree}/**",), older_than=timedelta(minutes=THRESHOLD_MINUTES)
    )
    start = time.perf_counter()
    result = run_cleanup(HostPaths(host_root=host_root), spec, {}, dry_run=False)
    elapsed = time.perf_counter() - start
    if result.errors or result.skipped_not_tmpfs:
        raise SystemExit(f"run_cleanup failed: {result.errors or result.skipped_not_tmpfs}")
    return elapsed, result.files_removed


def time_find(tree: Path) -> float:
    argv = ["find", str(tree), "-type", "f", "-mmin", f"+{THRESHOLD_MINUTES}", "-delete"]
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files per tree")
    parser.add_argument("--dirs", type=int, default=300, help="directories per tree")
    parser.add_argument("--file-bytes", type=int, default=64, help="size of each file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/cleanup.py needs root: it mounts a tmpfs", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="nodemem-bench-cleanup-"))
    mount_point = workdir / "mnt"
    mount_point.mkdir()
    pages = -(-args.file_bytes // 4096)
    size_mib = 64 + 2 * args.files * pages * 4096 // (1024 * 1024)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "nodemem-bench", str(mount_point)],
        check=True,
    )
    try:
        started = time.perf_counter()
        old = [
            build_tree(mount_point / tree, args.files, args.dirs, args.file_bytes) for tree in "ab"
        ]
        print(
            f"built 2 trees of {args.files} files in {args.dirs} directories "
            f"({old[0]} old each) in {time.perf_counter() - started:.1f} s"
        )

        ours, removed = time_run_cleanup(workdir, "mnt/a")
        theirs = time_find(mount_point / "b")

        left = [count_files(mount_point / tree) for tree in "ab"]
        if removed != old[0] or left != [args.files - old[0]] * 2:
            print(f"trees differ after cleanup: removed {removed}, left {left}", file=sys.stderr)
            return 1
        ratio = ours / theirs
        print(f"run_cleanup: {ours:.3f} s ({removed} files removed)")
        print(f"find -delete: {theirs:.3f} s")
        print(f"ratio: {ratio:.2f}x find (goal <= 2x)")
        return 0
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())

"""Cleanup rules on real tmpfs mounts: age, watermarks, symlinks, bind mounts, other
filesystems, files held open by a real process, dry run against the real run.

Each test builds a host root under tmp_path (HostPaths(host_root=...)), mounts its own tmpfs
there and unmounts it afterwards; patterns name paths inside that root only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from nodemem.host.cleanup import (
    CleanupResult,
    CleanupSpec,
    CleanupState,
    HeldOpenFile,
    PatternResult,
    PatternState,
    run_cleanup,
)
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import Holder
from nodemem.host.statx import BirthTime
from nodemem.policy.apply import CleanupOutcome
from nodemem.policy.report import cleanup_status
from samples import exec_done, names, write

pytestmark = pytest.mark.privileged

HOUR = 3600.0
MIB = 1024 * 1024
NO_HOLDERS: dict[tuple[int, int], Sequence[Holder]] = {}

Mount = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """mount(*mount_args, point=...): mount(8) at point (created); unmounted after the test."""
    mounted: list[Path] = []

    def do_mount(*args: str, point: Path) -> Path:
        if not point.exists():
            point.mkdir(parents=True)
        subprocess.run(["mount", *args, str(point)], check=True, capture_output=True)
        mounted.append(point)
        return point

    yield do_mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.fixture
def host(tmp_path: Path, mount: Mount) -> HostPaths:
    """A host root in tmp_path with a 16 MiB tmpfs at its /mnt."""
    root = tmp_path / "host"
    mount("-t", "tmpfs", "-o", "size=16m", "nodemem-test", point=root / "mnt")
    return HostPaths(host_root=root)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """spawn(argv, **popen_kwargs): a child process, killed (by its pid) after the test."""
    children: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(argv, **kwargs)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait(timeout=10)


def clean(host: HostPaths, *paths: str, dry_run: bool = False, **options: Any) -> CleanupResult:
    spec = CleanupSpec(name="rule", paths=paths, **options)
    return run_cleanup(host, spec, NO_HOLDERS, dry_run=dry_run)


def usage(path: Path) -> float:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) / st.f_blocks


def held_by(pid: int, comm: str) -> dict[tuple[int, int], Sequence[Holder]]:
    """What an fd scan of one process reports: (st_dev, st_ino) of each open file -> holder."""
    held: dict[tuple[int, int], Sequence[Holder]] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        held[(st.st_dev, st.st_ino)] = [Holder(pid, comm)]
    return held


def test_removes_exactly_the_files_older_than_the_threshold(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for index in range(10):
        write(mnt / "logs" / f"old-{index}.log", age=2 * HOUR, size=5000)
        write(mnt / "logs" / f"new-{index}.log", age=30 * 60, size=5000)

    result = clean(host, "/mnt/logs/*.log", older_than=timedelta(hours=1))

    assert names(mnt) == {f"logs/new-{index}.log" for index in range(10)}
    assert {file.path for file in result.removed} == {f"/mnt/logs/old-{i}.log" for i in range(10)}
    assert (result.files_removed, result.bytes_removed) == (10, 10 * 8192)  # 5000 B: 2 pages
    assert result.errors == result.skipped_not_tmpfs == []


def test_age_by_atime_or_mtime_and_the_walk_leaves_atimes_alone(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    now = time.time()
    old, new = now - 2 * HOUR, now - 60
    for name, atime, mtime in (("read-lately", new, old), ("written-lately", old, new)):
        write(mnt / name)
        os.utime(mnt / name, (atime, mtime))
    atimes = {path.name: path.stat().st_atime_ns for path in mnt.iterdir()}

    by_mtime = clean(host, "/mnt/*", dry_run=True, older_than=timedelta(hours=1))
    by_atime = clean(host, "/mnt/*", dry_run=True, older_than=timedelta(hours=1), age=("atime",))

    assert [file.path for file in by_mtime.would_remove] == ["/mnt/read-lately"]
    assert [file.path for file in by_atime.would_remove] == ["/mnt/written-lately"]
    assert {path.name: path.stat().st_atime_ns for path in mnt.iterdir()} == atimes


def test_watermark_removes_oldest_first_until_under_target(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    files = [
        write(mnt / f"blob-{index:02}", age=(20 - index) * HOUR, size=MIB) for index in range(13)
    ]
    assert usage(mnt) == pytest.approx(13 / 16)
    options: dict[str, Any] = {"when_usage_above": 0.5, "target_usage": 0.3}

    planned = clean(host, "/mnt/blob-*", dry_run=True, **options)
    assert len(names(mnt)) == 13
    result = clean(host, "/mnt/blob-*", **options)

    oldest_nine = [f"/mnt/{path.name}" for path in files[:9]]
    assert [file.path for file in planned.would_remove] == oldest_nine
    assert [file.path for file in result.removed] == oldest_nine
    assert result.bytes_removed == 9 * MIB
    assert names(mnt) == {path.name for path in files[9:]}
    assert usage(mnt) == pytest.approx(4 / 16)


def test_watermark_does_nothing_below_the_threshold(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for index in range(7):  # 7/16 < 0.5
        write(mnt / f"blob-{index}", age=2 * HOUR, size=MIB)
    (mnt / "empty").mkdir()

    result = clean(host, "/mnt/**", when_usage_above=0.5, remove_empty_dirs=True)

    assert (result.files_removed, result.dirs_removed) == (0, 0)
    assert len(names(mnt)) == 7


def test_watermark_with_older_than_takes_only_old_files(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for index in range(12):  # 12/16 used; only 4 old ones may go, so 8/16 stays
        write(mnt / f"blob-{index:02}", age=(2 if index < 4 else 0) * HOUR, size=MIB)

    result = clean(
        host, "/mnt/*", when_usage_above=0.5, target_usage=0.3, older_than=timedelta(hours=1)
    )

    assert result.files_removed == 4
    assert names(mnt) == {f"blob-{index:02}" for index in range(4, 12)}


def test_watermark_on_an_unlimited_tmpfs_is_refused(tmp_path: Path, mount: Mount) -> None:
    root = tmp_path / "host"
    mount("-t", "tmpfs", "-o", "size=0", "nodemem-test", point=root / "mnt")
    write(root / "mnt" / "x", age=2 * HOUR)

    result = clean(HostPaths(host_root=root), "/mnt/*", when_usage_above=0.1)

    assert result.files_removed == 0
    assert result.errors == ["/mnt: mount has no size limit, usage watermarks do not apply"]


def test_excluded_files_survive(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for name in ("a.log", "a.keep", "state/b.log", "cache/c.log"):
        write(mnt / name, age=2 * HOUR)

    result = clean(host, "/mnt/**", exclude=("*.keep", "/mnt/state/*"))

    assert result.files_removed == 2
    assert names(mnt) == {"a.keep", "state/b.log"}


def test_symlink_is_removed_as_a_link_and_its_target_survives(
    host: HostPaths, tmp_path: Path
) -> None:
    target = write(tmp_path / "outside.log", age=2 * HOUR)
    link = host.host("/mnt/app.log")
    link.symlink_to(target)
    stamp = time.time() - 2 * HOUR
    os.utime(link, (stamp, stamp), follow_symlinks=False)

    result = clean(host, "/mnt/*.log", older_than=timedelta(hours=1))

    assert [file.path for file in result.removed] == ["/mnt/app.log"]
    assert not link.is_symlink()
    assert target.read_bytes() == b"x"


def test_symlink_to_a_directory_is_never_entered(host: HostPaths, tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "x.log", age=2 * HOUR)
    host.host("/mnt/dir").symlink_to(outside.parent)

    through = clean(host, "/mnt/*/x.log", "/mnt/dir/*")
    link_itself = clean(host, "/mnt/**")

    assert through.files_removed == 0
    assert through.patterns == [
        PatternResult("/mnt/*/x.log", PatternState.WALKED),
        PatternResult(
            "/mnt/dir/*",
            PatternState.FAILED,
            "/mnt/dir: symlink 'dir' on a tmpfs in the pattern's base, not followed",
        ),
    ]
    assert [file.path for file in link_itself.removed] == ["/mnt/dir"]
    assert outside.exists()


def test_other_filesystems_and_bind_mounts_are_not_entered(
    host: HostPaths, tmp_path: Path, mount: Mount
) -> None:
    mnt = host.host("/mnt")
    disk = write(tmp_path / "disk" / "old.log", age=2 * HOUR).parent
    mount("--bind", str(disk), point=mnt / "tree" / "disk")
    mount("-t", "tmpfs", "-o", "size=1m", "nodemem-test", point=mnt / "tree" / "other-tmpfs")
    write(mnt / "tree" / "other-tmpfs" / "old.log", age=2 * HOUR)
    write(mnt / "outside-tree" / "old.log", age=2 * HOUR)  # same superblock, another mount:
    mount("--bind", str(mnt / "outside-tree"), point=mnt / "tree" / "alias")
    write(mnt / "tree" / "mine" / "old.log", age=2 * HOUR)
    write(mnt / "tree" / "file-mount.log", age=2 * HOUR)  # a file mount point: not ours
    mount(
        "--bind",
        str(write(tmp_path / "disk.log", age=2 * HOUR)),
        point=mnt / "tree" / "file-mount.log",
    )

    result = clean(host, "/mnt/tree/**", older_than=timedelta(hours=1), remove_empty_dirs=True)

    assert [file.path for file in result.removed] == ["/mnt/tree/mine/old.log"]
    assert result.dirs_removed == 0  # mine is new; mount points are never removed
    assert (disk / "old.log").exists()
    assert (mnt / "tree" / "other-tmpfs" / "old.log").exists()
    assert (mnt / "outside-tree" / "old.log").exists()
    assert (tmp_path / "disk.log").exists()
    assert result.errors == []


def test_base_not_on_tmpfs_is_skipped_and_untouched(host: HostPaths) -> None:
    disk = write(host.host("/disk/old.log"), age=2 * HOUR).parent

    result = clean(host, "/disk/*", "/disk/**", "/mnt/*")

    assert result.skipped_not_tmpfs == ["/disk"]
    assert (disk / "old.log").exists()
    assert result.errors == []
    fstype = fstype_of(disk)  # the test root's filesystem: ext4, xfs, overlay...
    assert fstype != "tmpfs"
    skipped = PatternResult("", PatternState.SKIPPED, f"not on tmpfs: /disk is on {fstype}")
    assert result.patterns == [
        replace(skipped, pattern="/disk/*"),
        replace(skipped, pattern="/disk/**"),
        PatternResult("/mnt/*", PatternState.WALKED),
    ]
    assert result.state is CleanupState.INCOMPLETE


def test_host_symlink_in_the_base_resolves_inside_the_host_root(
    tmp_path: Path, mount: Mount
) -> None:
    root = tmp_path / "host"
    run = mount("-t", "tmpfs", "-o", "size=1m", "nodemem-test", point=root / "run")
    write(run / "app" / "old.log", age=2 * HOUR)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # as on hosts: on the root fs, absolute

    result = clean(HostPaths(host_root=root), "/var/run/app/*.log")

    assert [file.path for file in result.removed] == ["/var/run/app/old.log"]
    assert not (run / "app" / "old.log").exists()


def test_symlink_on_a_tmpfs_in_the_base_is_not_followed(
    host: HostPaths, tmp_path: Path, mount: Mount
) -> None:
    other = mount("-t", "tmpfs", "-o", "size=1m", "nodemem-test", point=tmp_path / "host" / "other")
    write(other / "old.log", age=2 * HOUR)
    host.host("/mnt/link").symlink_to("/other")

    result = clean(host, "/mnt/link/*.log")

    assert result.files_removed == 0
    assert result.state is CleanupState.FAILED
    assert result.patterns == [
        PatternResult(
            "/mnt/link/*.log",
            PatternState.FAILED,
            "/mnt/link: symlink 'link' on a tmpfs in the pattern's base, not followed",
        )
    ]
    assert (other / "old.log").exists()


def test_file_held_open_by_a_process_is_kept_and_reported(
    host: HostPaths, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    held = write(host.host("/mnt/app.log"), age=2 * HOUR, size=3 * 4096)
    with held.open("ab") as log:
        child = spawn(["sleep", "60"], stdout=log)
    os.utime(held, (time.time() - 2 * HOUR,) * 2)
    write(host.host("/mnt/rotated.log"), age=2 * HOUR)
    exec_done(child.pid, ["sleep", "60"])
    holders = held_by(child.pid, "sleep")
    spec = CleanupSpec(name="rule", paths=("/mnt/*.log",), older_than=timedelta(hours=1))

    result = run_cleanup(host, spec, holders, dry_run=False)

    assert result.held_open == [
        HeldOpenFile("/mnt/app.log", 3 * 4096, (Holder(child.pid, "sleep"),))
    ]
    assert [file.path for file in result.removed] == ["/mnt/rotated.log"]
    assert held.exists()


def test_dry_run_removes_nothing_and_lists_what_the_real_run_removes(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for index in range(30):
        write(mnt / f"d{index % 4}" / f"sub{index % 3}" / f"f{index}", age=(index % 3) * HOUR)
    write(mnt / "d0" / "f.keep", age=2 * HOUR)
    (mnt / "d1" / "link").symlink_to("/nowhere")
    os.utime(mnt / "d1" / "link", (time.time() - 2 * HOUR,) * 2, follow_symlinks=False)
    for directory in mnt.rglob("*"):
        if directory.is_dir() and not directory.is_symlink():
            os.utime(directory, (time.time() - 2 * HOUR,) * 2)
    before = names(mnt)
    options: dict[str, Any] = {
        "older_than": timedelta(minutes=90),
        "exclude": ("*.keep",),
        "remove_empty_dirs": True,
    }

    planned = clean(host, "/mnt/**", dry_run=True, **options)
    assert names(mnt) == before
    assert planned.removed == []
    result = clean(host, "/mnt/**", **options)

    assert result.removed == planned.would_remove
    assert len(result.removed) == 11  # index % 3 == 2: ten files, plus the link
    assert (result.files_removed, result.bytes_removed) == (planned.files_removed, 10 * 4096)
    assert result.dirs_removed == planned.dirs_removed == 4  # every d*/sub2
    assert names(mnt) == {
        name for name in before if not name.endswith("/link") and "/sub2/" not in name
    }


def test_devtmpfs_is_never_a_cleanup_base() -> None:
    # /dev is devtmpfs: statfs calls it tmpfs, the mount table does not. Dry run, so that
    # even a regression here cannot touch the machine's /dev.
    spec = CleanupSpec(name="dev", paths=("/dev/*",), older_than=timedelta(seconds=1))
    result = run_cleanup(HostPaths(), spec, {}, dry_run=True)
    assert result.skipped_not_tmpfs == ["/dev"]
    assert result.patterns == [
        PatternResult("/dev/*", PatternState.SKIPPED, "not on tmpfs: /dev is on devtmpfs")
    ]
    assert result.would_remove == []


# --- excludes: relative to each pattern's base, either spelling of a directory ----------


def test_relative_exclude_with_a_slash_is_relative_to_each_patterns_base(host: HostPaths) -> None:
    # The issue: paths /m/logs/**, exclude sub/keep.log deleted /m/logs/sub/keep.log.
    mnt = host.host("/mnt")
    for name in (
        "logs/sub/keep.log",
        "logs/sub/other.log",
        "logs/deeper/sub/keep.log",  # sub/keep.log is anchored at the base, not anywhere
        "logs/cache/a/b.bin",
        "tmp/sub/keep.log",
        "tmp/sub/x.tmp",
    ):
        write(mnt / name, age=2 * HOUR)

    result = clean(
        host,
        "/mnt/logs/**",
        "/mnt/tmp/*/*",
        older_than=timedelta(hours=1),
        exclude=("sub/keep.log", "cache/*"),
    )

    assert names(mnt) == {"logs/sub/keep.log", "logs/cache/a/b.bin", "tmp/sub/keep.log"}
    assert {file.path for file in result.removed} == {
        "/mnt/logs/sub/other.log",
        "/mnt/logs/deeper/sub/keep.log",
        "/mnt/tmp/sub/x.tmp",
    }
    assert result.state is CleanupState.COMPLETED


def test_excludes_name_a_directory_through_a_symlink_or_by_its_real_path(
    host: HostPaths,
) -> None:
    mnt = host.host("/mnt")
    (host.host_root / "var").mkdir()
    (host.host_root / "var" / "logs").symlink_to("/mnt/logs")  # on the root fs: followed
    (mnt / "alias").symlink_to("logs")  # on the tmpfs: never followed by paths
    spellings = [
        # (paths, exclude): every exclude below names /mnt/logs/sub/keep.log
        ("/var/logs/**", "/mnt/logs/sub/keep.log"),  # pattern via the symlink, exclude real
        ("/mnt/logs/**", "/var/logs/sub/keep.log"),  # pattern real, exclude via the symlink
        ("/var/logs/**", "/var/logs/sub/*.log"),
        ("/var/logs/**", "sub/keep.log"),
        ("/mnt/logs/**", "/mnt/alias/sub/keep.log"),  # an exclude may go through a tmpfs link
    ]
    for pattern, exclude in spellings:
        keep = write(mnt / "logs" / "sub" / "keep.log", age=2 * HOUR)
        drop = write(mnt / "logs" / "sub" / "drop.txt", age=2 * HOUR)

        result = clean(host, pattern, older_than=timedelta(hours=1), exclude=(exclude,))

        assert keep.exists(), (pattern, exclude)
        assert not drop.exists(), (pattern, exclude)
        assert result.files_removed == 1
        assert result.state is CleanupState.COMPLETED

    # The tmpfs symlink in a pattern's base is refused, whatever the excludes say.
    write(mnt / "logs" / "sub" / "drop.txt", age=2 * HOUR)
    through_tmpfs_link = clean(host, "/mnt/alias/**", exclude=("sub/keep.log",))
    assert [p.state for p in through_tmpfs_link.patterns] == [PatternState.FAILED]
    assert (mnt / "logs" / "sub" / "drop.txt").exists()


# --- patterns that can do nothing are reported -------------------------------------------


def fstype_of(path: Path) -> str:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def test_a_typo_in_the_base_is_skipped_and_reported(host: HostPaths) -> None:
    old = write(host.host("/mnt/logs/old.log"), age=2 * HOUR)

    result = clean(host, "/mnt/lgos/*.log", older_than=timedelta(hours=1))

    assert result.patterns == [
        PatternResult("/mnt/lgos/*.log", PatternState.SKIPPED, "/mnt/lgos does not exist")
    ]
    assert result.state is CleanupState.INCOMPLETE
    assert old.exists()


def test_a_glob_crossing_into_separate_mounts_is_reported(host: HostPaths, mount: Mount) -> None:
    users = host.host("/mnt/users")
    for uid in ("1000", "1001"):
        mount("-t", "tmpfs", "-o", "size=1m", "nodemem-test", point=users / uid)
        write(users / uid / "x.log", age=2 * HOUR)
    write(users / "local" / "x.log", age=2 * HOUR)  # on the base's own mount

    result = clean(host, "/mnt/users/*/x.log", older_than=timedelta(hours=1))
    excluded = clean(host, "/mnt/users/*/x.log", exclude=("1000", "/mnt/users/1001"))

    assert [file.path for file in result.removed] == ["/mnt/users/local/x.log"]
    [pattern] = result.patterns
    assert pattern.state is PatternState.INCOMPLETE
    assert pattern.message.startswith("crosses into another mount at ")
    assert set(pattern.message.split(": ")[0].split(" at ")[1].split(", ")) == {
        "/mnt/users/1000",
        "/mnt/users/1001",
    }
    assert result.state is CleanupState.INCOMPLETE
    assert (users / "1000" / "x.log").exists() and (users / "1001" / "x.log").exists()
    # Excluding the mount points says they are meant to be left alone: nothing to report.
    assert [p.state for p in excluded.patterns] == [PatternState.WALKED]


# --- conventions of systemd-tmpfiles: birth time, directories locked with flock ----------


def test_age_by_btime_is_the_birth_time_statx_reports_on_tmpfs(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    born = time.time()
    written_long_ago = write(mnt / "a.log", age=2 * HOUR)  # mtime 2 h back, born now
    touched_later = write(mnt / "b.log")
    os.utime(touched_later, (born + 3 * HOUR,) * 2)  # mtime after the later run below
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ino, btime_ns = BirthTime().ns(fd, "a.log")
    finally:
        os.close(fd)
    kernel = subprocess.run(
        ["stat", "--format=%i %W", str(written_long_ago)], check=True, capture_output=True
    )
    assert (ino, btime_ns // 10**9) == tuple(map(int, kernel.stdout.split()))

    def planned(age: tuple[str, ...], now: float) -> list[str]:
        spec = CleanupSpec(name="r", paths=("/mnt/*.log",), older_than=timedelta(hours=1), age=age)
        result = run_cleanup(host, spec, NO_HOLDERS, dry_run=True, now=now)
        assert result.errors == []
        return [file.path for file in result.would_remove]

    assert planned(("mtime",), born) == ["/mnt/a.log"]
    assert planned(("btime",), born) == []  # just born, whatever its mtime says
    later = born + 2 * HOUR
    assert sorted(planned(("btime",), later)) == ["/mnt/a.log", "/mnt/b.log"]
    assert planned(("mtime", "btime"), later) == ["/mnt/a.log"]
    result = clean(host, "/mnt/*.log", older_than=timedelta(hours=1), age=("btime",))
    assert result.files_removed == 0 and names(mnt) == {"a.log", "b.log"}


# Takes a BSD lock on a directory, says so, and holds it until its stdin closes.
LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, getattr(fcntl, sys.argv[2]))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("lock", ["LOCK_EX", "LOCK_SH"])
def test_a_directory_a_process_holds_an_flock_on_is_kept_with_its_subtree(
    host: HostPaths, spawn: Callable[..., subprocess.Popen[bytes]], lock: str
) -> None:
    mnt = host.host("/mnt")
    for name in ("cache/locked/a.log", "cache/locked/deep/b.log", "cache/free/c.log", "d.log"):
        write(mnt / name, age=2 * HOUR)
    for directory in ("cache/locked/deep", "cache/locked", "cache/free", "cache"):
        os.utime(mnt / directory, (time.time() - 2 * HOUR,) * 2)
    holder = spawn(
        [sys.executable, "-c", LOCKER, str(mnt / "cache" / "locked"), lock],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == b"locked\n"  # the lock is held from here on

    options: dict[str, Any] = {"older_than": timedelta(hours=1), "remove_empty_dirs": True}
    planned = clean(host, "/mnt/**", dry_run=True, **options)
    result = clean(host, "/mnt/**", **options)  # returns: the check never waits for the lock

    assert names(mnt) == {"cache/locked/a.log", "cache/locked/deep/b.log"}
    assert sorted(file.path for file in result.removed) == ["/mnt/cache/free/c.log", "/mnt/d.log"]
    assert result.dirs_removed == 1  # cache/free; cache still holds the locked directory
    assert result.locked == planned.locked == ["/mnt/cache/locked"]
    assert result.state is CleanupState.COMPLETED
    assert cleanup_status(CleanupOutcome("policy", result)).locked == ["/mnt/cache/locked"]
    assert holder.poll() is None  # still running, still holding its lock

    holder.stdin.close()  # the lock goes with the process
    holder.wait(timeout=10)
    after = clean(host, "/mnt/**", **options)
    assert after.locked == [] and names(mnt) == set()


def test_a_locked_base_keeps_the_whole_pattern(
    host: HostPaths, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    mnt = host.host("/mnt")
    write(mnt / "logs" / "sub" / "old.log", age=2 * HOUR)
    holder = spawn(
        [sys.executable, "-c", LOCKER, str(mnt / "logs"), "LOCK_EX"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"

    result = clean(host, "/mnt/logs/**", older_than=timedelta(hours=1))

    assert (result.files_removed, result.locked) == (0, ["/mnt/logs"])
    assert names(mnt) == {"logs/sub/old.log"}

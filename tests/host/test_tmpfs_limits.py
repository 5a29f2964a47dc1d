"""tmpfs limits on real mounts: applied, idempotent, refused where the kernel would refuse
(and told in the kernel's words where it does), per-mount flags kept on both remount
paths, globs, stacked mounts, another mount namespace, vanished mounts."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from nodemem.host import tmpfs_limits
from nodemem.host.mounts import Mount, parse_mountinfo
from nodemem.host.paths import HostPaths
from nodemem.host.remount import RemountError, reconfigure_tmpfs
from nodemem.host.tmpfs_limits import LimitResult, LimitState, Target, apply_limit, find_targets

pytestmark = pytest.mark.privileged

MiB = 1 << 20
HOST = HostPaths()
MountTmpfs = Callable[..., Path]


def mounts_at(point: Path, pid: int | str = "self") -> list[Mount]:
    """The mounts stacked at `point` in `pid`'s namespace, bottom first."""
    text = Path(f"/proc/{pid}/mountinfo").read_text()
    return [mount for mount in parse_mountinfo(text) if mount.mount_point == str(point)]


def top_mount(point: Path, pid: int | str = "self") -> Mount:
    stack = mounts_at(point, pid)
    assert stack, f"{point} is not a mount point"
    return stack[-1]


def size_of(point: Path) -> int:
    stat = os.statvfs(point)
    return stat.f_blocks * stat.f_frsize


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        for _ in range(size // MiB):
            file.write(b"\xa5" * MiB)


def the_target(pattern: Path | str, namespace_pid: int | None = None) -> Target:
    [target] = find_targets(HOST, str(pattern), namespace_pid)
    return target


def limit(
    point: Path,
    size: int,
    *,
    nr_inodes: int | None = None,
    headroom_bytes: int | None = None,
    dry_run: bool = False,
) -> LimitResult:
    return apply_limit(the_target(point), size, nr_inodes, headroom_bytes, dry_run)


def forbid_remount(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any remount by apply_limit fail the test: it must not even be attempted."""

    def refuse(path: str | int, options: Mapping[str, str], **_: bool) -> None:
        raise AssertionError(f"remount attempted: {options}")

    monkeypatch.setattr(tmpfs_limits, "reconfigure_tmpfs", refuse)


@pytest.fixture
def mount_other(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """mount_other(*mount_args, point): any mount(8) call; the point is unmounted after."""
    mounted: list[Path] = []

    def mount(*args: str, point: Path) -> None:
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(point)], check=True, capture_output=True)
        mounted.append(point)

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


@pytest.fixture
def not_tmpfs(tmp_path: Path, mount_other: Callable[..., None]) -> Path:
    """A bind mount of a directory of a ramfs: a mount point that is certainly not tmpfs."""
    mount_other("-t", "ramfs", "nodemem-test", point=tmp_path / "ramfs")
    (tmp_path / "ramfs" / "dir").mkdir()
    point = tmp_path / "mnt3"
    mount_other("--bind", str(tmp_path / "ramfs" / "dir"), point=point)
    return point


@pytest.fixture
def private_tmpfs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """(pid, point): a 64 MiB tmpfs at `point` that exists only in `pid`'s mount namespace."""
    point = tmp_path / "private"
    point.mkdir()
    script = 'mount -t tmpfs -o size=64m nodemem-test "$1" && echo ready && exec sleep 1000'
    child = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(point)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 10
        line = ""
        while not line:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no 'ready' from the namespace child"
            if select.select([child.stdout], [], [], remaining)[0]:
                line = child.stdout.readline()
                assert line, f"namespace child exited with {child.wait()}"
        assert line.strip() == "ready"
        yield child.pid, point
    finally:
        child.kill()
        child.wait()


def test_limit_is_applied_and_visible_in_mountinfo_and_statvfs(mount_tmpfs: MountTmpfs) -> None:
    point = mount_tmpfs("mnt", "size=64m")
    result = limit(point, 8 * MiB)
    assert result.state is LimitState.APPLIED, result.message
    assert (result.size_before, result.size_after) == (64 * MiB, 8 * MiB)
    assert top_mount(point).super_option("size") == "8192k"
    assert size_of(point) == 8 * MiB


def test_second_apply_is_unchanged_even_for_a_size_the_kernel_rounds(
    mount_tmpfs: MountTmpfs,
) -> None:
    point = mount_tmpfs("mnt", "size=64m")
    odd_size = 10_000_001  # not a page multiple: the kernel rounds it up
    first = limit(point, odd_size, nr_inodes=500)
    assert first.state is LimitState.APPLIED, first.message
    assert first.size_after == -(-odd_size // os.sysconf("SC_PAGE_SIZE")) * os.sysconf(
        "SC_PAGE_SIZE"
    )
    mount_before = top_mount(point)
    second = limit(point, odd_size, nr_inodes=500)
    assert second.state is LimitState.UNCHANGED, second.message
    assert top_mount(point) == mount_before


def test_shrink_below_use_is_refused_without_asking_the_kernel(
    mount_tmpfs: MountTmpfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    point = mount_tmpfs("mnt", "size=64m")
    write_file(point / "data", 8 * MiB)
    forbid_remount(monkeypatch)
    result = limit(point, 4 * MiB)
    assert result.state is LimitState.REFUSED
    assert "would shrink below current use (used 8 MiB, asked 4 MiB)" in result.message
    assert result.used_bytes == 8 * MiB
    assert size_of(point) == 64 * MiB


def test_headroom_limits_to_used_plus_headroom_and_never_ratchets_up(
    mount_tmpfs: MountTmpfs,
) -> None:
    point = mount_tmpfs("mnt", "size=64m")
    write_file(point / "data", 8 * MiB)
    first = limit(point, 4 * MiB, headroom_bytes=2 * MiB)
    assert first.state is LimitState.APPLIED, first.message
    assert first.size_after == 10 * MiB == size_of(point)
    assert "used + headroom" in first.message
    # The tmpfs grows within its new limit; used + headroom would now exceed it.
    write_file(point / "more", 1 * MiB)
    again = limit(point, 4 * MiB, headroom_bytes=2 * MiB)
    assert again.state is LimitState.UNCHANGED, again.message
    assert size_of(point) == 10 * MiB
    # Once the files are gone the asked size is reached.
    (point / "data").unlink()
    (point / "more").unlink()
    last = limit(point, 4 * MiB, headroom_bytes=2 * MiB)
    assert last.state is LimitState.APPLIED, last.message
    assert size_of(point) == 4 * MiB


def test_unlimited_tmpfs_is_refused_and_left_unlimited(
    mount_tmpfs: MountTmpfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    point = mount_tmpfs("mnt", "size=0")
    forbid_remount(monkeypatch)
    result = limit(point, 16 * MiB)
    assert result.state is LimitState.REFUSED
    assert "can never be limited again" in result.message
    assert size_of(point) == 0
    assert top_mount(point).super_option("size") == "0k"


@pytest.mark.parametrize("flags", ["nosuid,nodev,noexec", "ro"])
def test_fspick_keeps_per_mount_flags(mount_tmpfs: MountTmpfs, flags: str) -> None:
    point = mount_tmpfs("mnt", f"size=16m,{flags}")
    result = limit(point, 8 * MiB)
    assert result.state is LimitState.APPLIED, result.message
    mount = top_mount(point)
    assert set(flags.split(",")) <= set(mount.mount_options.split(","))
    assert mount.super_option("size") == "8192k"


@pytest.mark.parametrize(
    "flags", ["nosuid,nodev,noexec", "noatime", "strictatime,nodiratime", "nosymfollow"]
)
@pytest.mark.parametrize("by_fd", [False, True])
def test_mount2_fallback_keeps_per_mount_flags(
    mount_tmpfs: MountTmpfs, flags: str, by_fd: bool
) -> None:
    point = mount_tmpfs("mnt", f"size=16m,{flags}")
    options_before = top_mount(point).mount_options
    fd = os.open(point, os.O_PATH | os.O_DIRECTORY)
    try:
        reconfigure_tmpfs(fd if by_fd else str(point), {"size": "8m"}, use_mount_api=False)
    finally:
        os.close(fd)
    mount = top_mount(point)
    assert mount.super_option("size") == "8192k"
    assert mount.mount_options == options_before


def test_mount2_fallback_refuses_a_read_only_mount(mount_tmpfs: MountTmpfs) -> None:
    point = mount_tmpfs("mnt", "size=16m,ro")
    with pytest.raises(OSError, match="read-only") as raised:
        reconfigure_tmpfs(str(point), {"size": "8m"}, use_mount_api=False)
    assert not isinstance(raised.value, RemountError)
    assert top_mount(point).super_option("size") == "16384k"
    assert "ro" in top_mount(point).mount_options.split(",")


def test_kernel_refusal_comes_in_the_kernels_words(mount_tmpfs: MountTmpfs) -> None:
    point = mount_tmpfs("mnt", "size=16m")
    write_file(point / "data", 8 * MiB)
    with pytest.raises(RemountError) as too_small:
        reconfigure_tmpfs(str(point), {"size": "4m"})
    assert too_small.value.from_kernel
    assert "Too small a size for current use" in too_small.value.reason
    unlimited = mount_tmpfs("unlimited", "size=0")
    with pytest.raises(RemountError, match="Cannot retroactively limit size"):
        reconfigure_tmpfs(str(unlimited), {"size": "16m"})
    assert size_of(point) == 16 * MiB
    assert size_of(unlimited) == 0


def test_mount2_fallback_explains_its_bare_einval(mount_tmpfs: MountTmpfs) -> None:
    point = mount_tmpfs("mnt", "size=16m")
    write_file(point / "data", 8 * MiB)
    with pytest.raises(RemountError) as raised:
        reconfigure_tmpfs(str(point), {"size": "4m"}, use_mount_api=False)
    assert not raised.value.from_kernel
    assert "below current use" in raised.value.reason
    assert size_of(point) == 16 * MiB


def test_kernel_refusal_after_a_racing_write_is_refused_with_its_reason(
    mount_tmpfs: MountTmpfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    point = mount_tmpfs("mnt", "size=64m")
    write_file(point / "data", 8 * MiB)

    def writer_races_the_remount(path: str | int, options: Mapping[str, str]) -> None:
        write_file(point / "racing", 8 * MiB)  # after the check, before the remount
        reconfigure_tmpfs(path, options)

    monkeypatch.setattr(tmpfs_limits, "reconfigure_tmpfs", writer_races_the_remount)
    result = limit(point, 12 * MiB)
    assert result.state is LimitState.REFUSED
    assert "Too small a size for current use" in result.message
    assert size_of(point) == 64 * MiB


def test_glob_matches_mount_points_one_component_deep(
    tmp_path: Path, mount_tmpfs: MountTmpfs, not_tmpfs: Path
) -> None:
    first = mount_tmpfs("mnt1", "size=64m")
    second = mount_tmpfs("mnt2", "size=64m")
    nested = mount_tmpfs(at=first / "sub", options="size=64m")
    other = mount_tmpfs("other", "size=64m")
    bind_before = top_mount(not_tmpfs)

    targets = find_targets(HOST, f"{tmp_path}/mnt*")
    results = {target.mount_point: apply_limit(target, 8 * MiB) for target in targets}

    # Non-tmpfs matches of a glob are reported, explicitly, and left alone.
    assert {point: result.state for point, result in results.items()} == {
        str(first): LimitState.APPLIED,
        str(second): LimitState.APPLIED,
        str(not_tmpfs): LimitState.NOT_TMPFS,
    }
    assert size_of(first) == size_of(second) == 8 * MiB
    assert size_of(nested) == size_of(other) == 64 * MiB
    assert top_mount(not_tmpfs) == bind_before


def test_exact_paths_that_are_no_tmpfs_mount(tmp_path: Path, not_tmpfs: Path) -> None:
    bind_before = top_mount(not_tmpfs)
    assert limit(not_tmpfs, 8 * MiB).state is LimitState.NOT_TMPFS
    assert top_mount(not_tmpfs) == bind_before
    (tmp_path / "plain").mkdir()
    assert limit(tmp_path / "plain", 8 * MiB).state is LimitState.NOT_FOUND
    assert limit(tmp_path / "absent", 8 * MiB).state is LimitState.NOT_FOUND


def test_stacked_mounts_only_the_top_one_is_limited(mount_tmpfs: MountTmpfs) -> None:
    lower = mount_tmpfs("stack", "size=16m")
    upper = mount_tmpfs("stack", "size=32m")
    assert lower == upper
    target = the_target(upper)
    assert target.mount is not None and target.mount.dev == os.stat(upper).st_dev
    assert apply_limit(target, 24 * MiB).state is LimitState.APPLIED
    bottom, top = mounts_at(upper)
    assert (bottom.super_option("size"), top.super_option("size")) == ("16384k", "24576k")


def test_tmpfs_in_another_mount_namespace(private_tmpfs: tuple[int, Path]) -> None:
    pid, point = private_tmpfs
    assert not os.path.ismount(point)  # not in ours
    assert the_target(point).mount is None
    target = the_target(point, namespace_pid=pid)
    assert target.path == Path(f"/proc/{pid}/root") / str(point).lstrip("/")
    result = apply_limit(target, 40 * MiB)
    assert result.state is LimitState.APPLIED, result.message
    assert top_mount(point, pid).super_option("size") == "40960k"
    # mount(2) cannot remount a mount of another namespace (do_remount checks it).
    with pytest.raises(RemountError):
        reconfigure_tmpfs(str(target.path), {"size": "32m"}, use_mount_api=False)
    assert top_mount(point, pid).super_option("size") == "40960k"


def test_dry_run_plans_and_changes_nothing(mount_tmpfs: MountTmpfs) -> None:
    point = mount_tmpfs("mnt", "size=64m")
    result = limit(point, 8 * MiB, dry_run=True)
    assert result.state is LimitState.PLANNED
    assert (result.size_before, result.size_after, result.desired_bytes) == (
        64 * MiB,
        64 * MiB,
        8 * MiB,
    )
    assert size_of(point) == 64 * MiB


def test_inode_limit(mount_tmpfs: MountTmpfs) -> None:
    point = mount_tmpfs("mnt", "size=16m,nr_inodes=100")
    for number in range(10):
        (point / f"file{number}").touch()
    assert limit(point, 16 * MiB, nr_inodes=50).state is LimitState.APPLIED
    assert os.statvfs(point).f_files == 50
    assert limit(point, 16 * MiB, nr_inodes=50).state is LimitState.UNCHANGED
    too_few = limit(point, 16 * MiB, nr_inodes=5)
    assert too_few.state is LimitState.REFUSED
    assert "fewer inodes than in use" in too_few.message
    assert os.statvfs(point).f_files == 50
    unlimited = mount_tmpfs("unlimited", "size=16m,nr_inodes=0")
    assert limit(unlimited, 16 * MiB, nr_inodes=50).state is LimitState.REFUSED
    assert os.statvfs(unlimited).f_files == 0


def test_vanished_or_replaced_mount_is_never_touched(
    tmp_path: Path, mount_tmpfs: MountTmpfs, mount_other: Callable[..., None]
) -> None:
    gone = mount_tmpfs("gone", "size=64m")
    target = the_target(gone)
    subprocess.run(["umount", str(gone)], check=True)
    result = apply_limit(target, 8 * MiB)
    assert result.state is LimitState.NOT_FOUND
    assert "no longer shows" in result.message

    removed = mount_tmpfs("removed", "size=64m")
    target = the_target(removed)
    subprocess.run(["umount", str(removed)], check=True)
    removed.rmdir()
    assert apply_limit(target, 8 * MiB).state is LimitState.NOT_FOUND

    # The first tmpfs stays alive elsewhere, so the one replacing it gets another st_dev.
    replaced = mount_tmpfs("replaced", "size=64m")
    target = the_target(replaced)
    kept = tmp_path / "kept"
    mount_other("--bind", str(replaced), point=kept)
    subprocess.run(["umount", str(replaced)], check=True)
    mount_tmpfs("replaced", "size=32m")
    result = apply_limit(target, 8 * MiB)
    assert result.state is LimitState.NOT_FOUND
    assert "no longer shows" in result.message
    assert (size_of(replaced), size_of(kept)) == (32 * MiB, 64 * MiB)

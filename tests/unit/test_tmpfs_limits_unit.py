"""tmpfs limits without privileges: target discovery on a fake /proc, and every refusal
that must happen before the kernel (or the filesystem) is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemem.host.mounts import Mount
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone
from nodemem.host.remount import reconfigure_tmpfs
from nodemem.host.tmpfs_limits import LimitState, Target, apply_limit, find_targets

MOUNTINFO = """\
1 0 254:0 / / rw,relatime - ext4 /dev/vda rw
20 1 0:20 / /run rw,nosuid - tmpfs tmpfs rw,size=100k
21 20 0:21 / /run/lock rw - tmpfs tmpfs rw,size=5120k
22 20 0:22 / /run/user rw - tmpfs tmpfs rw
23 22 0:23 / /run/user/1000 rw - tmpfs tmpfs rw,size=1024k
24 23 0:24 / /run/user/1000/gvfs rw - fuse.gvfsd-fuse gvfsd rw
25 20 0:25 / /run/rpc_pipefs rw - rpc_pipefs sunrpc rw
26 1 0:6 / /dev rw - devtmpfs devtmpfs rw,size=1024k
41 40 0:41 / /stack rw - tmpfs upper rw,size=2048k
40 1 0:40 / /stack rw - tmpfs lower rw,size=1024k
"""


def fake_proc(root: Path, mountinfo_of: dict[str, str]) -> Path:
    """A proc root holding only `<pid>/mountinfo` files."""
    proc = root / "proc"
    for pid, text in mountinfo_of.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "mountinfo").write_text(text)
    return proc


@pytest.fixture
def own_namespace(tmp_path: Path) -> HostPaths:
    return HostPaths(host_root=Path("/"), proc_root=fake_proc(tmp_path, {"self": MOUNTINFO}))


def points(targets: list[Target]) -> list[str]:
    return [target.mount_point for target in targets]


def test_star_matches_within_one_path_component(own_namespace: HostPaths) -> None:
    assert points(find_targets(own_namespace, "/run/user/*")) == ["/run/user/1000"]
    assert points(find_targets(own_namespace, "/run/*")) == [
        "/run/lock",
        "/run/rpc_pipefs",
        "/run/user",
    ]
    assert points(find_targets(own_namespace, "/run/user/[0-9]*/g?fs")) == ["/run/user/1000/gvfs"]
    assert find_targets(own_namespace, "/srv/*") == []


def test_glob_reports_its_non_tmpfs_matches_as_not_tmpfs(own_namespace: HostPaths) -> None:
    results = {
        target.mount_point: apply_limit(target, 1 << 20)
        for target in find_targets(own_namespace, "/run/*")
    }
    assert results["/run/rpc_pipefs"].state is LimitState.NOT_TMPFS
    assert "rpc_pipefs" in results["/run/rpc_pipefs"].message


def test_devtmpfs_is_not_a_target(own_namespace: HostPaths) -> None:
    [target] = find_targets(own_namespace, "/dev")
    assert target.mount is not None and target.mount.fstype == "devtmpfs"
    assert apply_limit(target, 1 << 20).state is LimitState.NOT_TMPFS


def test_exact_path_that_is_no_mount_point_is_not_found(own_namespace: HostPaths) -> None:
    [target] = find_targets(own_namespace, "/run/user/1000/")  # trailing slash: same point
    assert target.mount is not None and target.mount.mount_id == 23
    [missing] = find_targets(own_namespace, "/run/nothing")
    assert missing.mount is None
    result = apply_limit(missing, 1 << 20)
    assert result.state is LimitState.NOT_FOUND
    assert result.path == "/run/nothing"


def test_stacked_mounts_resolve_to_the_one_on_top(own_namespace: HostPaths) -> None:
    # Listed upper first: the parent chain decides, not the line order.
    [target] = find_targets(own_namespace, "/stack")
    assert target.mount is not None and target.mount.source == "upper"


def test_default_namespace_is_the_one_the_host_root_shows(tmp_path: Path) -> None:
    pid1_view = "1 0 254:0 / / rw - ext4 /dev/vda rw\n9 1 0:9 / /host-only rw - tmpfs t rw\n"
    proc = fake_proc(tmp_path, {"self": MOUNTINFO, "1": pid1_view})
    paths = HostPaths(host_root=proc / "1" / "root", proc_root=proc)
    [target] = find_targets(paths, "/host-only")
    assert target.mount is not None and target.mount.mount_id == 9
    assert target.path == proc / "1" / "root" / "host-only"
    assert target.namespace_pid is None


def test_namespace_pid_reads_that_process_and_acts_through_its_root(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {"self": MOUNTINFO, "42": "7 1 0:7 / /private rw - tmpfs t rw\n"})
    [target] = find_targets(HostPaths(proc_root=proc), "/private", namespace_pid=42)
    assert target.mount is not None and target.mount.mount_id == 7
    assert target.path == proc / "42" / "root" / "private"
    assert target.namespace_pid == 42
    with pytest.raises(ProcessGone):
        find_targets(HostPaths(proc_root=proc), "/private", namespace_pid=43)


def test_host_root_without_a_mount_table_is_an_error(tmp_path: Path) -> None:
    paths = HostPaths(host_root=tmp_path / "host", proc_root=fake_proc(tmp_path, {}))
    with pytest.raises(ValueError, match="neither"):
        find_targets(paths, "/run")


def test_relative_pattern_is_an_error(own_namespace: HostPaths) -> None:
    with pytest.raises(ValueError, match="absolute"):
        find_targets(own_namespace, "run/*")


@pytest.mark.parametrize(
    "options",
    [
        {"size": "0"},
        {"size": "0k"},
        {"size": "000"},
        {"size": "0%"},
        {"size": "010"},  # memparse reads a leading 0 as octal
        {"size": "0x10"},
        {"size": ""},
        {"size": "-1"},
        {"size": "1m,size=0"},  # would smuggle size=0 into the mount(2) data string
        {"nr_inodes": "0"},
        {"size": "64m", "nr_inodes": "0"},
        {"size=0,x": "1"},
        {},
    ],
)
@pytest.mark.parametrize("use_mount_api", [True, False])
def test_reconfigure_refuses_zero_and_odd_values_before_the_kernel(
    tmp_path: Path, options: dict[str, str], use_mount_api: bool
) -> None:
    # The path does not exist: had the kernel been asked, this would be an OSError.
    with pytest.raises(ValueError):
        reconfigure_tmpfs(str(tmp_path / "absent"), options, use_mount_api=use_mount_api)


def tmpfs_target(path: Path) -> Target:
    mount = Mount(1, 0, 1, "/", str(path), "rw", "tmpfs", "tmpfs", "rw,size=1024k")
    return Target(str(path), path, mount, None)


@pytest.mark.parametrize(("size", "nr_inodes"), [(0, None), (-1, None), (1 << 20, 0)])
def test_zero_limits_are_refused_before_the_mount_is_looked_at(
    tmp_path: Path, size: int, nr_inodes: int | None
) -> None:
    # The path does not exist: had apply_limit looked, this would be NotFound.
    result = apply_limit(tmpfs_target(tmp_path / "absent"), size, nr_inodes)
    assert result.state is LimitState.REFUSED
    assert "unlimited" in result.message


def test_vanished_path_is_not_found(tmp_path: Path) -> None:
    assert apply_limit(tmpfs_target(tmp_path / "absent"), 1 << 20).state is LimitState.NOT_FOUND


def test_negative_headroom_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="headroom"):
        apply_limit(tmpfs_target(tmp_path), 1 << 20, headroom_bytes=-1)

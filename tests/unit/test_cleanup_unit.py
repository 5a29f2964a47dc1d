"""Cleanup rules without mounts: spec validation, pattern semantics, races, in-root resolution.

The walker refuses anything that is not tmpfs. These tests run it on a plain directory by
replacing only that check (`cleanup._is_tmpfs`) with one that calls chosen directories tmpfs;
everything else is the real code on a real filesystem. tests/host/test_cleanup.py covers the
same walker on real tmpfs mounts, with the real check.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from nodemem.api.crd import policy_crd
from nodemem.api.manifest import PolicyError, validate_policy
from nodemem.api.report import PolicyRef
from nodemem.api.status import NodeMemoryReportStatus
from nodemem.controller.rollup import failures_of
from nodemem.host import cleanup
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
from nodemem.policy.apply import ApplyResult, CleanupOutcome, cleanup_spec
from nodemem.policy.effective import EffectiveCleanup
from nodemem.policy.report import cleanup_status
from samples import names, write

HOUR = 3600.0


def _crd_cleanup_path_pattern() -> str:
    [version] = policy_crd()["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    pattern: str = spec["properties"]["cleanup"]["items"]["properties"]["paths"]["items"]["pattern"]
    return pattern


CRD_CLEANUP_PATH = _crd_cleanup_path_pattern()
NO_HOLDERS: dict[tuple[int, int], Sequence[Holder]] = {}


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostPaths:
    """A host root in tmp_path whose /mnt counts as tmpfs (the only faked fact)."""
    root = tmp_path / "host"
    (root / "mnt").mkdir(parents=True)
    fake_tmpfs(monkeypatch, root / "mnt")
    return HostPaths(host_root=root)


def fake_tmpfs(monkeypatch: pytest.MonkeyPatch, *trees: Path) -> None:
    def is_tmpfs(fd: int) -> bool:
        where = os.readlink(f"/proc/self/fd/{fd}")
        return any(where == str(tree) or where.startswith(f"{tree}/") for tree in trees)

    monkeypatch.setattr(cleanup, "_is_tmpfs", is_tmpfs)


def clean(host: HostPaths, *paths: str, dry_run: bool = False, **options: Any) -> CleanupResult:
    spec = CleanupSpec(name="rule", paths=paths, **options)
    return run_cleanup(host, spec, NO_HOLDERS, dry_run=dry_run)


def removed_paths(result: CleanupResult) -> set[str]:
    return {file.path for file in result.removed}


# --- the spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"paths": ("run/app/*.log",)}, "absolute"),
        ({"paths": ("/run/app/../../etc/*",)}, r"'\.\.'"),
        ({"paths": ("/run/./app/*",)}, r"'\.'"),
        ({"paths": ("/run/app/",)}, "names files"),
        ({"paths": ("/run/a\0b",)}, "NUL"),
        ({"paths": ()}, "no paths"),
        ({"paths": ("/run/*",), "age": ("birthtime",)}, "age"),
        ({"paths": ("/run/*",), "age": ()}, "age"),
        ({"paths": ("/run/*",), "older_than": timedelta(seconds=-1)}, "negative"),
        ({"paths": ("/run/*",), "when_usage_above": 1.5}, "0..1"),
        ({"paths": ("/run/*",), "when_usage_above": 0.5, "target_usage": -0.1}, "0..1"),
        ({"paths": ("/run/*",), "target_usage": 0.3}, "needs when_usage_above"),
        ({"paths": ("/run/*",), "when_usage_above": 0.3, "target_usage": 0.5}, "above"),
        ({"paths": ("/run/*",), "exclude": ("",)}, "empty exclude"),
        ({"paths": ("/x.log",)}, "literal directory is /"),
        ({"paths": ("/*",)}, "literal directory is /"),
        ({"paths": ("/**",)}, "literal directory is /"),
        ({"paths": ("/*/shm/*",)}, "literal directory is /"),
    ],
)
def test_spec_rejects_unsafe_or_inconsistent_rules(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CleanupSpec(name="rule", **options)


def test_spec_keeps_lists_as_tuples() -> None:
    spec = CleanupSpec(name="rule", paths=["/run/*"], exclude=["*.keep"])  # type: ignore[arg-type]
    assert spec.paths == ("/run/*",)
    assert spec.exclude == ("*.keep",)
    assert hash(spec) == hash(CleanupSpec(name="rule", paths=("/run/*",), exclude=("*.keep",)))


@pytest.mark.parametrize(
    ("pattern", "base", "components"),
    [
        ("/run/app/logs/*.log", ("run", "app", "logs"), ("*.log",)),
        ("/dev/shm/app-*", ("dev", "shm"), ("app-*",)),
        ("/run/app/x.log", ("run", "app"), ("x.log",)),
        ("/run//app/*/cache/[0-9]*", ("run", "app"), ("*", "cache", "[0-9]*")),
        ("/run/app/**", ("run", "app"), ("**", "*")),
        ("/run/**/**/*.tmp", ("run",), ("**", "*.tmp")),
    ],
)
def test_pattern_splits_into_literal_base_and_glob_components(
    pattern: str, base: tuple[str, ...], components: tuple[str, ...]
) -> None:
    parsed = cleanup._parse_pattern(pattern)
    assert parsed.base == base
    assert tuple(component.text for component in parsed.components) == components


# --- matching ------------------------------------------------------------------------------


def test_star_stays_in_one_directory_and_double_star_goes_any_depth(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for name in ("a.log", ".hidden.log", "b.txt", "d1/c.log", "d1/d2/e.log", "d1/d2/f.txt"):
        write(mnt / name, age=2 * HOUR)

    assert removed_paths(clean(host, "/mnt/*.log", dry_run=False)) == {
        "/mnt/a.log",
        "/mnt/.hidden.log",
    }
    assert removed_paths(clean(host, "/mnt/**/*.log")) == {"/mnt/d1/c.log", "/mnt/d1/d2/e.log"}
    assert removed_paths(clean(host, "/mnt/d1/**")) == {"/mnt/d1/d2/f.txt"}
    assert names(mnt) == {"b.txt"}


def test_final_component_matches_files_only(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    write(mnt / "cache-1" / "inner", age=2 * HOUR)
    write(mnt / "cache-2", age=2 * HOUR)
    os.mkfifo(mnt / "cache-fifo")

    result = clean(host, "/mnt/cache-*")

    assert removed_paths(result) == {"/mnt/cache-2"}
    assert names(mnt) == {"cache-1/inner", "cache-fifo"}
    assert result.errors == []


def test_overlapping_patterns_remove_each_file_once(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    write(mnt / "app" / "x.log", size=5000)

    result = clean(host, "/mnt/**/*.log", "/mnt/app/*", "/mnt/app/x.log", dry_run=True)

    assert [file.path for file in result.would_remove] == ["/mnt/app/x.log"]
    assert result.files_removed == 1


def test_excludes_match_names_without_slash_and_full_paths_with_slash(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for name in ("a.log", "a.keep", "keep/b.log", "sub/c.log", "sub/d.log"):
        write(mnt / name, age=2 * HOUR)

    result = clean(host, "/mnt/**", exclude=("*.keep", "keep", "/mnt/sub/c*"))

    assert removed_paths(result) == {"/mnt/a.log", "/mnt/sub/d.log"}
    assert names(mnt) == {"a.keep", "keep/b.log", "sub/c.log"}


def test_age_needs_every_listed_timestamp_to_be_old(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    now = time.time()
    old, new = now - 2 * HOUR, now
    for name, atime, mtime in (("both", old, old), ("atime", old, new), ("mtime", new, old)):
        write(mnt / name)
        os.utime(mnt / name, (atime, mtime))

    def would_remove(*age: str) -> set[str]:
        result = clean(host, "/mnt/*", dry_run=True, older_than=timedelta(hours=1), age=age)
        return {Path(file.path).name for file in result.would_remove}

    assert would_remove("mtime") == {"both", "mtime"}
    assert would_remove("atime") == {"both", "atime"}
    assert would_remove("atime", "mtime") == {"both"}
    assert would_remove("ctime") == set()  # ctime is now for all of them


def test_file_held_by_this_process_is_kept_and_reported(host: HostPaths) -> None:
    held = write(host.host("/mnt/held.log"), age=2 * HOUR, size=10_000)
    write(host.host("/mnt/free.log"), age=2 * HOUR)
    with held.open("rb"):
        st = os.stat(held)
        holders = {(st.st_dev, st.st_ino): [Holder(os.getpid(), "pytest")]}
        spec = CleanupSpec(name="rule", paths=("/mnt/*.log",))
        result = run_cleanup(host, spec, holders, dry_run=False)

    assert held.exists()
    assert removed_paths(result) == {"/mnt/free.log"}
    assert result.held_open == [
        HeldOpenFile("/mnt/held.log", st.st_blocks * 512, (Holder(os.getpid(), "pytest"),))
    ]


def test_trees_deeper_than_the_limit_are_reported_not_walked(
    host: HostPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cleanup, "MAX_DEPTH", 2)
    write(host.host("/mnt/1/x"))
    write(host.host("/mnt/1/2/x"))
    write(host.host("/mnt/1/2/3/x"))

    result = clean(host, "/mnt/**")

    assert removed_paths(result) == {"/mnt/1/x", "/mnt/1/2/x"}
    assert result.errors == ["/mnt/1/2/3: deeper than 2 levels below the base, not walked"]


# --- the base: resolved inside the host root ---------------------------------------------


def test_base_symlinks_resolve_inside_the_host_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "host"
    inside = write(root / "mnt" / "x.log", age=2 * HOUR)
    outside = write(tmp_path / "mnt" / "x.log", age=2 * HOUR)  # where `..` would lead outside
    (root / "up").symlink_to("../..")  # on a non-tmpfs: followed, but clamped at the root
    (root / "abs").symlink_to("/mnt")  # absolute: the host's /mnt, not ours
    fake_tmpfs(monkeypatch, root / "mnt", tmp_path / "mnt")
    host = HostPaths(host_root=root)

    result = clean(host, "/up/mnt/*.log", "/abs/*.log", dry_run=True)

    assert [file.path for file in result.would_remove] == ["/up/mnt/x.log"]
    assert clean(host, "/abs/*.log").files_removed == 1
    assert not inside.exists()
    assert outside.exists()


def test_missing_base_is_skipped_and_reported(host: HostPaths) -> None:
    result = clean(host, "/mnt/not-yet/*.log", "/nowhere/*", "/mnt/*")
    assert result.files_removed == 0
    assert result.errors == []
    assert result.skipped_not_tmpfs == []
    assert result.patterns == [
        PatternResult("/mnt/not-yet/*.log", PatternState.SKIPPED, "/mnt/not-yet does not exist"),
        PatternResult("/nowhere/*", PatternState.SKIPPED, "/nowhere does not exist"),
        PatternResult("/mnt/*", PatternState.WALKED),
    ]
    assert result.state is CleanupState.INCOMPLETE


def test_base_on_a_file_is_an_error(host: HostPaths) -> None:
    write(host.host("/mnt/file"))
    result = clean(host, "/mnt/file/*")
    assert result.patterns == [
        PatternResult("/mnt/file/*", PatternState.SKIPPED, "/mnt/file is not a directory")
    ]
    assert result.state is CleanupState.INCOMPLETE


# --- races: the walk saw one thing, removal finds another --------------------------------


class SwapOnLookup(dict[tuple[int, int], Sequence[Holder]]):
    """Holds nothing; its first lookup (a watermark rule's: after the walk, before removal)
    runs `swap`."""

    def __init__(self, swap: Callable[[], None]) -> None:
        super().__init__()
        self._swap: Callable[[], None] | None = swap

    def get(self, key: Any, default: Any = None) -> Any:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap()
        return super().get(key, default)


def run_with_swap(host: HostPaths, pattern: str, swap: Callable[[], None]) -> CleanupResult:
    # A watermark rule selects every candidate first and removes them afterwards, oldest
    # first: the one gap between selecting a file and removing it. (0 %: any use is above.)
    spec = CleanupSpec(
        name="rule",
        paths=(pattern,),
        older_than=timedelta(hours=1),
        when_usage_above=0.0,
        target_usage=0.0,
    )
    return run_cleanup(host, spec, SwapOnLookup(swap), dry_run=False)


class SwapOnListing(dict[tuple[int, int], Sequence[Holder]]):
    """Holds nothing; read once per superblock when the walk has listed a directory and
    is about to stat its files: that first read runs `swap`."""

    def __init__(self, swap: Callable[[], None]) -> None:
        super().__init__()
        self._swap: Callable[[], None] | None = swap

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap()
        return super().__iter__()


def test_without_a_watermark_each_file_is_judged_by_a_stat_taken_just_before_its_unlink(
    host: HostPaths,
) -> None:
    # The directory was listed while a.log was old; a fresh file took its name before the
    # files were looked at. The old inode is gone, the fresh one is judged on its own.
    victim = write(host.host("/mnt/a.log"), age=2 * HOUR)
    fresh = write(host.host("/mnt/fresh.tmp"))
    other = write(host.host("/mnt/b.log"), age=2 * HOUR)
    spec = CleanupSpec(name="rule", paths=("/mnt/*.log",), older_than=timedelta(hours=1))

    result = run_cleanup(host, spec, SwapOnListing(lambda: fresh.rename(victim)), dry_run=False)

    assert victim.stat().st_mtime > time.time() - HOUR  # the fresh file, kept
    assert not other.exists()
    assert [file.path for file in result.removed] == ["/mnt/b.log"]
    assert result.errors == []


def test_file_replaced_after_the_walk_is_left_alone(host: HostPaths) -> None:
    victim = write(host.host("/mnt/a.log"), age=2 * HOUR)
    fresh = write(host.host("/mnt/fresh.tmp"))

    def swap() -> None:
        fresh.rename(victim)

    result = run_with_swap(host, "/mnt/*.log", swap)

    assert victim.read_bytes() == b"x"
    assert victim.stat().st_mtime > time.time() - HOUR  # the fresh file, not the old one
    assert result.files_removed == 0
    assert result.errors == ["/mnt/a.log: replaced during cleanup, left alone"]


def test_directory_swapped_for_a_symlink_after_the_walk_redirects_nothing(
    host: HostPaths, tmp_path: Path
) -> None:
    sub = host.host("/mnt/sub")
    write(sub / "a.log", age=2 * HOUR)
    elsewhere = write(tmp_path / "elsewhere" / "a.log", age=2 * HOUR)

    def swap() -> None:
        sub.rename(sub.with_name("sub.orig"))
        sub.symlink_to(elsewhere.parent)

    result = run_with_swap(host, "/mnt/*/*.log", swap)

    assert elsewhere.exists()
    assert (sub.with_name("sub.orig") / "a.log").exists()
    assert result.files_removed == 0
    assert len(result.errors) == 1
    assert result.errors[0].startswith("/mnt/sub/a.log: ")


# --- empty directories -------------------------------------------------------------------


@pytest.fixture
def tree_of_old_dirs(host: HostPaths) -> Iterator[Path]:
    mnt = host.host("/mnt")
    write(mnt / "a" / "b" / "old.log", age=2 * HOUR)
    write(mnt / "keep" / "new.log")
    (mnt / "a" / "empty").mkdir()
    (mnt / "fresh-empty").mkdir()
    stamp = time.time() - 2 * HOUR
    for directory in ("a", "a/b", "a/empty", "keep"):
        os.utime(mnt / directory, (stamp, stamp))
    yield mnt


def test_empty_dirs_stay_unless_the_rule_says_so(host: HostPaths, tree_of_old_dirs: Path) -> None:
    result = clean(host, "/mnt/**", older_than=timedelta(hours=1))

    assert result.dirs_removed == 0
    assert (tree_of_old_dirs / "a" / "b").is_dir()


def test_empty_dirs_removed_deepest_first_when_old(host: HostPaths, tree_of_old_dirs: Path) -> None:
    options: dict[str, Any] = {"older_than": timedelta(hours=1), "remove_empty_dirs": True}
    planned = clean(host, "/mnt/**", dry_run=True, **options)
    assert (planned.files_removed, planned.dirs_removed) == (1, 3)  # a/b, a/empty, then a

    result = clean(host, "/mnt/**", **options)

    assert (result.files_removed, result.dirs_removed) == (1, 3)
    assert sorted(p.name for p in tree_of_old_dirs.iterdir()) == ["fresh-empty", "keep"]
    assert host.host("/mnt").is_dir()  # the base is never removed


def test_a_nested_base_is_never_removed(host: HostPaths, tree_of_old_dirs: Path) -> None:
    result = clean(
        host, "/mnt/**", "/mnt/a/b/*", older_than=timedelta(hours=1), remove_empty_dirs=True
    )

    assert result.dirs_removed == 1  # a/empty; a/b is a base and so a is not empty
    assert (tree_of_old_dirs / "a" / "b").is_dir()


# --- the model: what validation refuses before any run ------------------------------------


def _policy_with_cleanup(**fields: Any) -> dict[str, Any]:
    rule = {"name": "c", "paths": ["/run/app/*"], "schedule": "0 * * * *", "olderThan": "1h"}
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "p"},
        "spec": {"cleanup": [rule | fields]},
    }


@pytest.mark.parametrize("path", ["/", "/*", "/**", "/x.log", "/*/shm/*", "/[a-z]*/x"])
def test_a_cleanup_path_whose_literal_directory_is_root_is_refused_naming_the_field(
    path: str,
) -> None:
    with pytest.raises(PolicyError) as refused:
        validate_policy(_policy_with_cleanup(paths=["/dev/shm/*", path]))
    [message] = refused.value.messages
    assert message.startswith("spec.cleanup[0].paths[1]: ")
    assert "literal (glob-free) directory is /" in message
    with pytest.raises(ValueError, match=r"literal directory is /|names files"):  # the engine too
        CleanupSpec(name="c", paths=(path,))


@pytest.mark.parametrize("path", ["/dev/shm/*", "/run/user/*/x", "/a/**"])
def test_a_cleanup_path_below_a_literal_directory_is_accepted(path: str) -> None:
    validate_policy(_policy_with_cleanup(paths=[path]))
    assert re.match(CRD_CLEANUP_PATH, path)


@pytest.mark.parametrize("path", ["/", "/*", "/**", "/x.log", "/*/shm/*"])
def test_the_crd_refuses_the_same_paths(path: str) -> None:
    assert not re.match(CRD_CLEANUP_PATH, path)


@pytest.mark.parametrize("exclude", ["./keep", "sub//keep", "sub/", "/run/./app/x"])
def test_an_exclude_that_could_never_match_is_refused(exclude: str) -> None:
    with pytest.raises(PolicyError) as refused:
        validate_policy(_policy_with_cleanup(exclude=["*.keep", exclude]))
    [message] = refused.value.messages
    assert message.startswith("spec.cleanup[0].exclude[1]: ")


def test_relative_exclude_with_a_slash_joins_each_patterns_base(host: HostPaths) -> None:
    mnt = host.host("/mnt")
    for name in ("a/sub/keep", "a/sub/x", "b/sub/keep", "b/c/sub/keep"):
        write(mnt / name, age=2 * HOUR)

    result = clean(host, "/mnt/a/**", "/mnt/b/**", exclude=("sub/keep",))

    assert removed_paths(result) == {"/mnt/a/sub/x", "/mnt/b/c/sub/keep"}


def test_a_skipped_or_failed_cleanup_is_a_failure_of_its_policy_on_the_node() -> None:
    outcome = CleanupOutcome(
        "p",
        CleanupResult(
            "logs",
            False,
            0,
            0,
            0,
            [],
            [],
            [],
            [],
            [],
            patterns=[
                PatternResult("/run/lgos/*", PatternState.SKIPPED, "/run/lgos does not exist")
            ],
        ),
    )
    failed = CleanupOutcome("p", CleanupResult.failed("bad", dry_run=False, message="boom"))
    statuses = [cleanup_status(outcome), cleanup_status(failed)]
    report = NodeMemoryReportStatus(policies=[PolicyRef(name="p", generation=1)], cleanup=statuses)

    assert [s.state for s in statuses] == ["Incomplete", "Failed"]
    assert ApplyResult(cleanup=[outcome]).failed and ApplyResult(cleanup=[failed]).failed
    assert failures_of("p", report) == [
        "cleanup bad: Failed: boom",
        "cleanup logs: /run/lgos/*: Skipped: /run/lgos does not exist",
    ]


def test_a_filesystem_without_birth_times_keeps_every_file_of_a_btime_rule(
    host: HostPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # statx leaves STATX_BTIME out of stx_mask there (tmpfs on this kernel reports it; the
    # host test covers that): no data, no removal, and the rule says why.
    monkeypatch.setattr(
        cleanup.BirthTime,
        "ns",
        lambda self, fd, name: (os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino, None),
    )
    for name in ("a.log", "b.log"):
        write(host.host(f"/mnt/{name}"), age=2 * HOUR)

    result = clean(host, "/mnt/*.log", older_than=timedelta(hours=1), age=("mtime", "btime"))
    by_mtime = clean(host, "/mnt/*.log", dry_run=True, older_than=timedelta(hours=1))

    assert result.files_removed == 0
    assert result.errors == ["2 files left alone: their filesystem reports no birth time (btime)"]
    assert result.state is CleanupState.INCOMPLETE
    assert len(by_mtime.would_remove) == 2  # old by mtime: kept only for the missing btime


def test_btime_is_an_age_timestamp_from_the_model_to_the_engine() -> None:
    policy = validate_policy(_policy_with_cleanup(age=["btime", "mtime"]))
    [rule] = policy.spec.cleanup
    item = EffectiveCleanup(item=rule, dry_run=False, policy="p", generation=1)

    assert cleanup_spec(item).age == ("btime", "mtime")

"""The badness formula against the measured memcg experiment (docs/kernel-facts.md#oom),
exclusions and ordering on a fake /proc, cgroup limits on a fake cgroup tree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from nodemem.host import oom_predict
from nodemem.host.oom_predict import badness, candidate_from_status, predict_victims
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import parse_status
from nodemem.policy.pods import PodDirectory
from nodemem.policy.report import oom_preview
from nodemem.tables import _group_kill_lines

MEMCG_256M_PAGES = (256 << 20) // 4096  # 65,536 → adj multiplier 65


def _status(pid: int, name: str, rss_kb: int, pte_kb: int, swap_kb: int = 0) -> str:
    return (
        f"Name:\t{name}\nState:\tS (sleeping)\nPPid:\t1\nUid:\t0\t0\t0\t0\n"
        f"VmSize:\t  200000 kB\nVmRSS:\t  {rss_kb} kB\nRssShmem:\t       0 kB\n"
        f"VmPTE:\t     {pte_kb} kB\nVmSwap:\t       {swap_kb} kB\nKthread:\t0\n"
    )


# Round 1 of the experiment: scores recomputed from the kernel's own task dump.
# (name, adj, VmRSS kB, VmPTE kB, expected score)
ROUND_1 = [
    ("A", 0, 103_880, 400, 26_070),
    ("B", 100, 52_676, 400, 19_769),
    ("C", 300, 16_740, 192, 23_733),
    ("D", 900, 11_588, 192, 61_445),
    ("G", 0, 83_036, 192, 20_807),
]


@pytest.mark.parametrize(("name", "adj", "rss_kb", "pte_kb", "expected"), ROUND_1)
def test_formula_matches_the_measured_round(
    name: str, adj: int, rss_kb: int, pte_kb: int, expected: int
) -> None:
    status = parse_status(100, _status(100, name, rss_kb, pte_kb))
    candidate = candidate_from_status(status, adj, MEMCG_256M_PAGES, page_size=4096)
    assert candidate is not None
    assert candidate.score == expected


def test_round_1_order_is_d_a_c_g_b() -> None:
    candidates = [
        candidate_from_status(
            parse_status(pid, _status(pid, name, rss, pte)), adj, MEMCG_256M_PAGES, 4096
        )
        for pid, (name, adj, rss, pte, _) in enumerate(ROUND_1, start=10)
    ]
    ranked = sorted((c for c in candidates if c is not None), key=lambda c: -c.score)
    assert [c.comm for c in ranked] == ["D", "A", "C", "G", "B"]


def test_multiplier_is_integer_division_first() -> None:
    # 65,536 // 1000 = 65, not 65.536: adj 900 adds 58,500 pages, not 58,982.
    assert badness(0, 0, 0, 900, totalpages=65_536, page_size=4096) == 58_500
    # A negative adj multiplies the (positive) quotient: C semantics, no rounding.
    assert badness(4096 * 10, 0, 0, -999, totalpages=65_536, page_size=4096) == 10 - 64_935
    assert badness(0, 0, 0, -1, totalpages=999, page_size=4096) == 0


def test_each_counter_is_converted_to_pages_separately() -> None:
    # rss + swap + pte, each bytes // PAGE_SIZE as the kernel counts them.
    assert badness(8192, 4096 * 3, 4096, 0, totalpages=1000, page_size=4096) == 2 + 3 + 1
    status = parse_status(7, _status(7, "s", 400, 8, swap_kb=1200))
    candidate = candidate_from_status(status, 0, 1000, page_size=4096)
    assert candidate is not None
    assert candidate.score == 100 + 300 + 2
    assert candidate.swap_bytes == 1200 * 1024


def _fake_proc(root: Path, *, mem_kb: int, swap_kb: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    others = ("MemAvailable", "Shmem", "Slab", "SReclaimable", "SUnreclaim", "KernelStack")
    (root / "meminfo").write_text(
        f"MemTotal:       {mem_kb} kB\nMemFree:        1000 kB\nSwapTotal:      {swap_kb} kB\n"
        + "".join(f"{key}: 0 kB\n" for key in (*others, "PageTables", "VmallocUsed"))
    )


def _fake_pid(root: Path, pid: int, status: str, adj: int) -> None:
    directory = root / str(pid)
    directory.mkdir()
    (directory / "status").write_text(status)
    (directory / "oom_score_adj").write_text(f"{adj}\n")


KTHREAD_STATUS = "Name:\tkworker/0:1\nPPid:\t2\nUid:\t0\t0\t0\t0\nKthread:\t1\n"
ZOMBIE_STATUS = "Name:\tdefunct\nState:\tZ (zombie)\nPPid:\t1\nUid:\t0\t0\t0\t0\nKthread:\t0\n"


def test_node_prediction_exclusions_and_order(tmp_path: Path) -> None:
    page = oom_predict.PAGE_SIZE
    # 4 GiB RAM + 1 GiB swap
    _fake_proc(tmp_path, mem_kb=4 << 20, swap_kb=1 << 20)
    _fake_pid(tmp_path, 1, _status(1, "init", 50_000, 100), 0)  # PID 1: never
    _fake_pid(tmp_path, 2, KTHREAD_STATUS, 0)  # kernel thread: never
    _fake_pid(tmp_path, 30, ZOMBIE_STATUS, 500)  # no mm: never
    _fake_pid(tmp_path, 40, _status(40, "unkillable", 900_000, 100), -1000)  # never
    _fake_pid(tmp_path, 50, _status(50, "big", 400_000, 800), 0)
    _fake_pid(tmp_path, 60, _status(60, "besteffort", 10_000, 40), 1000)
    _fake_pid(tmp_path, 70, _status(70, "tie-low-pid", 20_000, 0), 0)
    _fake_pid(tmp_path, 80, _status(80, "tie-high-pid", 20_000, 0), 0)
    (tmp_path / "90").mkdir()  # vanished between listing and reading: skipped

    prediction = predict_victims(HostPaths(proc_root=tmp_path), kernel_release="6.18.0")

    totalpages = ((4 << 30) + (1 << 30)) // page
    assert prediction.scope == "node"
    assert prediction.totalpages == totalpages
    assert [c.pid for c in prediction.victims] == [60, 50, 80, 70]
    besteffort = prediction.victims[0]
    assert besteffort.score == (10_000 + 40) * 1024 // page + 1000 * (totalpages // 1000)
    assert prediction.badness_truncation_risk is False
    assert prediction.kernel_release == "6.18.0"

    limited = predict_victims(HostPaths(proc_root=tmp_path), limit=2, kernel_release="6.18.0")
    assert [c.pid for c in limited.victims] == [60, 50]


@pytest.mark.parametrize(
    ("release", "adj", "risk"),
    [
        ("5.4.0-150-generic", -997, True),
        ("4.19.0", -1, True),
        ("5.8.18", -998, True),
        ("5.9.0", -997, False),
        ("6.18.44-fc-v595", -997, False),
        ("5.4.0", 0, False),  # old kernel, but nothing can go negative
    ],
)
def test_pre_5_9_truncation_risk(tmp_path: Path, release: str, adj: int, risk: bool) -> None:
    _fake_proc(tmp_path, mem_kb=1 << 20)
    _fake_pid(tmp_path, 100, _status(100, "pause", 400, 8), -998 if adj else 0)
    _fake_pid(tmp_path, 101, _status(101, "app", 100_000, 200), adj)
    prediction = predict_victims(HostPaths(proc_root=tmp_path), kernel_release=release)
    assert prediction.badness_truncation_risk is risk


def _fake_memcg(
    tmp_path: Path, *, limit: str, memsw: str | None, swappiness: int = 60, swap_kb: int = 0
) -> tuple[HostPaths, Path]:
    """A host root with a v1 memory hierarchy at /sys/fs/cgroup/memory, cgroup /app/web."""
    host = tmp_path / "host"
    proc = tmp_path / "proc"
    _fake_proc(proc, mem_kb=16 << 20, swap_kb=swap_kb)
    (proc / "sys" / "vm").mkdir(parents=True)
    (proc / "sys" / "vm" / "swappiness").write_text("60\n")
    (proc / "1").mkdir()
    (proc / "1" / "mountinfo").write_text(
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    app = host / "sys/fs/cgroup/memory/app"
    web = app / "web"
    web.mkdir(parents=True)
    (app / "cgroup.procs").write_text("200\n")
    (web / "cgroup.procs").write_text("300\n301\n300\n")
    (app / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (app / "memory.swappiness").write_text(f"{swappiness}\n")
    if memsw is not None:
        (app / "memory.memsw.limit_in_bytes").write_text(f"{memsw}\n")
    for pid, rss_kb in ((200, 10_000), (300, 30_000), (301, 20_000), (400, 900_000)):
        _fake_pid(proc, pid, _status(pid, f"p{pid}", rss_kb, 0), 0)
    return HostPaths(host_root=host, proc_root=proc), app


UNLIMITED_V1 = str(2**63 - 1 - (2**63 - 1) % oom_predict.PAGE_SIZE)


def test_memcg_prediction_covers_the_subtree_only(tmp_path: Path) -> None:
    paths, app = _fake_memcg(tmp_path, limit=str(256 << 20), memsw=UNLIMITED_V1)
    prediction = predict_victims(paths, cgroup="/app")
    assert prediction.scope == "/app"
    assert prediction.totalpages == (256 << 20) // oom_predict.PAGE_SIZE  # no swap on host
    assert [c.pid for c in prediction.victims] == [300, 301, 200]  # 400 is outside

    by_mount_path = predict_victims(paths, cgroup="/sys/fs/cgroup/memory/app")
    by_reachable_path = predict_victims(paths, cgroup=str(app))
    assert by_mount_path.scope == by_reachable_path.scope == "/app"
    assert by_mount_path.victims == by_reachable_path.victims == prediction.victims


@pytest.mark.parametrize(
    ("memsw_mib", "swappiness", "expected_extra_mib"),
    [
        (None, 60, 1024),  # no memsw file: memsw.max unlimited, capped by total swap
        (256, 60, 0),  # memsw == limit: no swap allowed
        (384, 60, 128),  # 128 MiB of swap allowed
        (8192, 60, 1024),  # more than the host has: capped by total swap
        (384, 0, 0),  # swappiness 0: the kernel adds no swap
    ],
)
def test_memcg_v1_swap_follows_mem_cgroup_get_max(
    tmp_path: Path, memsw_mib: int | None, swappiness: int, expected_extra_mib: int
) -> None:
    paths, _ = _fake_memcg(
        tmp_path,
        limit=str(256 << 20),
        memsw=None if memsw_mib is None else str(memsw_mib << 20),
        swappiness=swappiness,
        swap_kb=1 << 20,
    )
    prediction = predict_victims(paths, cgroup="/app")
    assert prediction.totalpages == ((256 + expected_extra_mib) << 20) // oom_predict.PAGE_SIZE


def test_unlimited_memcg_uses_node_totalpages_but_its_own_processes(tmp_path: Path) -> None:
    paths, _ = _fake_memcg(tmp_path, limit=UNLIMITED_V1, memsw=UNLIMITED_V1)
    prediction = predict_victims(paths, cgroup="/app")
    assert prediction.totalpages == (16 << 30) // oom_predict.PAGE_SIZE
    assert {c.pid for c in prediction.victims} == {200, 300, 301}


def test_missing_memcg_is_an_error(tmp_path: Path) -> None:
    paths, _ = _fake_memcg(tmp_path, limit=str(256 << 20), memsw=None)
    with pytest.raises(FileNotFoundError):
        predict_victims(paths, cgroup="/nope")


def test_v2_hierarchy_is_found_by_its_controllers(tmp_path: Path) -> None:
    host = tmp_path / "host"
    proc = tmp_path / "proc"
    _fake_proc(proc, mem_kb=16 << 20, swap_kb=1 << 20)
    (proc / "sys" / "vm").mkdir(parents=True)
    (proc / "sys" / "vm" / "swappiness").write_text("60\n")
    (proc / "1").mkdir()
    (proc / "1" / "mountinfo").write_text(
        "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    root = host / "sys/fs/cgroup"
    pod = root / "kubepods.slice" / "pod.slice"
    pod.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (pod / "cgroup.procs").write_text("500\n")
    (pod / "memory.max").write_text(f"{512 << 20}\n")
    (pod / "memory.swap.max").write_text(f"{64 << 20}\n")
    _fake_pid(proc, 500, _status(500, "app", 1000, 0), 0)
    paths = HostPaths(host_root=host, proc_root=proc)
    prediction = predict_victims(paths, cgroup="/kubepods.slice/pod.slice")
    assert prediction.totalpages == (576 << 20) // oom_predict.PAGE_SIZE
    assert [c.pid for c in prediction.victims] == [500]
    (pod / "memory.max").write_text("max\n")
    unlimited = predict_victims(paths, cgroup="/kubepods.slice/pod.slice")
    assert unlimited.totalpages == (17 << 30) // oom_predict.PAGE_SIZE


# --- group kills (memory.oom.group, cgroup v2): docs/kernel-facts.md#oom-group-kills ---------


class V2Tree:
    """A host root with cgroup2 at /sys/fs/cgroup and a fake /proc, for group kills."""

    def __init__(self, tmp_path: Path, *, mountinfo: str | None = None) -> None:
        self.host = tmp_path / "host"
        self.proc = tmp_path / "proc"
        _fake_proc(self.proc, mem_kb=16 << 20)
        (self.proc / "sys" / "vm").mkdir(parents=True)
        (self.proc / "sys" / "vm" / "swappiness").write_text("60\n")
        (self.proc / "1").mkdir()
        (self.proc / "1" / "mountinfo").write_text(
            mountinfo or "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
        )
        self.root = self.host / "sys/fs/cgroup"
        self.root.mkdir(parents=True)
        (self.root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (self.root / "cgroup.procs").write_text("")
        self.paths = HostPaths(host_root=self.host, proc_root=self.proc)

    def cgroup(self, relative: str, *, group: int | None = 0, limit: str = "max") -> Path:
        """A memcg (memory.* files) unless group is None (no memory controller there)."""
        directory = self.root / relative
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("")
        if group is not None:
            (directory / "memory.oom.group").write_text(f"{group}\n")
            (directory / "memory.max").write_text(f"{limit}\n")
        return directory

    def process(
        self, directory: Path, pid: int, rss_mib: int, adj: int = 0, status: str | None = None
    ) -> None:
        procs = directory / "cgroup.procs"
        procs.write_text(procs.read_text() + f"{pid}\n")
        if pid != 1 or not (self.proc / "1" / "status").exists():
            (self.proc / str(pid)).mkdir(exist_ok=True)
        (self.proc / str(pid) / "status").write_text(
            status or _status(pid, f"p{pid}", rss_mib * 1024, 0)
        )
        (self.proc / str(pid) / "oom_score_adj").write_text(f"{adj}\n")


def _groups(prediction: oom_predict.OomPrediction) -> dict[int, oom_predict.GroupKill | None]:
    return {c.pid: c.group for c in prediction.victims}


POD = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice"


def test_group_on_the_container_kills_its_other_tasks(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    app = tree.cgroup(f"{POD}/cri-containerd-app.scope", group=1)
    sidecar = tree.cgroup(f"{POD}/cri-containerd-sidecar.scope", group=0)
    tree.process(app, 100, 300)  # the victim
    tree.process(app, 101, 20)
    tree.cgroup(f"{POD}/cri-containerd-app.scope/sub", group=None)  # no memory controller
    tree.process(app / "sub", 102, 10)  # in the group's subtree: killed with it
    tree.process(sidecar, 200, 50)  # another container: survives
    tree.process(tree.root, 300, 5)  # the root memcg: never a group

    prediction = predict_victims(tree.paths)

    assert [c.pid for c in prediction.victims] == [100, 200, 101, 102, 300]
    group = _groups(prediction)[100]
    assert group == oom_predict.GroupKill(
        cgroup=f"/{POD}/cri-containerd-app.scope",
        killed_with=(101, 102),
        killed_with_rss_bytes=30 << 20,
    )
    assert _groups(prediction)[101] == replace(
        group, killed_with=(100, 102), killed_with_rss_bytes=310 << 20
    )
    assert _groups(prediction)[200] is None  # oom.group 0
    assert _groups(prediction)[300] is None  # the root memcg


def test_the_highest_group_up_to_the_domain_wins(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    tree.cgroup("kubepods.slice", group=0)
    pod = tree.cgroup(POD, group=1, limit=str(512 << 20))
    tree.cgroup(POD.rsplit("/", 1)[0], group=1)  # above the pod
    ctr = tree.cgroup(f"{POD}/ctr.scope", group=1, limit=str(256 << 20))
    other = tree.cgroup(f"{POD}/other.scope", group=0)
    tree.process(ctr, 100, 200)
    tree.process(other, 101, 10)

    # Node OOM: the domain is the root; the highest group is the burstable slice.
    node = _groups(predict_victims(tree.paths))[100]
    assert node is not None
    assert node.cgroup == "/kubepods.slice/kubepods-burstable.slice"
    assert node.killed_with == (101,)
    # OOM in the pod: the walk stops at the pod, which has oom.group set.
    in_pod = _groups(predict_victims(tree.paths, cgroup=f"/{POD}"))[100]
    assert in_pod is not None
    assert in_pod.cgroup == f"/{POD}"
    assert in_pod.killed_with == (101,)
    # OOM in the container: only the container's own group counts.
    in_ctr = _groups(predict_victims(tree.paths, cgroup=f"/{POD}/ctr.scope"))[100]
    assert in_ctr == oom_predict.GroupKill(f"/{POD}/ctr.scope", (), 0)
    # ... and with oom.group unset there, the pod's group (above the domain) does not.
    (ctr / "memory.oom.group").write_text("0\n")
    assert _groups(predict_victims(tree.paths, cgroup=f"/{POD}/ctr.scope"))[100] is None
    assert pod.is_dir()


def test_unkillable_init_kthreads_and_zombies_are_not_killed_with_it(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    ctr = tree.cgroup("ctr", group=1, limit=str(64 << 20))
    tree.process(ctr, 100, 40)
    tree.process(ctr, 101, 5, adj=-1000)  # OOM_SCORE_ADJ_MIN: spared
    tree.process(ctr, 102, 5, adj=-999)  # killed: only -1000 is spared
    tree.process(ctr, 103, 0, status=KTHREAD_STATUS)  # no mm
    tree.process(ctr, 104, 0, status=ZOMBIE_STATUS)  # no mm
    tree.process(ctr, 1, 3)  # global init (a container's pid 1 is no global init)
    (ctr / "cgroup.procs").write_text((ctr / "cgroup.procs").read_text() + "105\n")  # gone

    group = _groups(predict_victims(tree.paths, cgroup="/ctr"))[100]

    assert group == oom_predict.GroupKill("/ctr", (102,), 5 << 20)


def test_unreadable_members_are_counted_as_killed(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    ctr = tree.cgroup("ctr", group=1)
    tree.process(ctr, 100, 40)
    tree.process(ctr, 101, 5)
    (tree.proc / "101" / "status").write_text("not a status file\n")  # ValueError: unreadable

    prediction = predict_victims(tree.paths, cgroup="/ctr")

    assert prediction.unreadable == 1
    assert _groups(prediction)[100] == oom_predict.GroupKill("/ctr", (101,), 0)


def test_an_exiting_victim_kills_nobody_else(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    ctr = tree.cgroup("ctr", group=1)
    tree.process(ctr, 100, 40)
    tree.process(ctr, 101, 5)
    fields = ["S", "1", "100", "100", "0", "-1", "{flags}", *["0"] * 44]
    stat = "100 (p100) " + " ".join(fields)
    (tree.proc / "100" / "stat").write_text(stat.format(flags=0x400000))
    assert _groups(predict_victims(tree.paths))[100] is not None
    (tree.proc / "100" / "stat").write_text(stat.format(flags=0x400000 | oom_predict.PF_EXITING))
    assert _groups(predict_victims(tree.paths))[100] is None


def test_an_unlimited_cgroup_oom_is_a_node_oom_for_groups(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    tree.cgroup("pod", group=1)
    ctr = tree.cgroup("pod/ctr", group=0)  # no limit: the OOM happens above it
    other = tree.cgroup("pod/other", group=0)
    tree.process(ctr, 100, 40)
    tree.process(other, 101, 5)

    prediction = predict_victims(tree.paths, cgroup="/pod/ctr")

    assert [c.pid for c in prediction.victims] == [100]  # ranked: its own processes
    assert _groups(prediction)[100] == oom_predict.GroupKill("/pod", (101,), 5 << 20)


def test_v1_and_no_memory_hierarchy_never_kill_a_group(tmp_path: Path) -> None:
    paths, app = _fake_memcg(tmp_path, limit=str(256 << 20), memsw=None)
    (app / "memory.oom.group").write_text("1\n")  # not a v1 file; ignored even if present
    v1 = predict_victims(paths, cgroup="/app")
    assert v1.victims
    assert all(c.group is None for c in v1.victims)
    assert all(c.group is None for c in predict_victims(paths).victims)

    _fake_proc(tmp_path / "bare", mem_kb=1 << 20)
    _fake_pid(tmp_path / "bare", 10, _status(10, "a", 100, 0), 0)
    bare = predict_victims(HostPaths(proc_root=tmp_path / "bare"))  # no mountinfo at all
    assert [c.group for c in bare.victims] == [None]


def test_cgroup_namespace_mount_root_shows_host_paths(tmp_path: Path) -> None:
    # A cgroup2 mount of a sub-tree (bind or cgroup namespace): paths keep its root.
    tree = V2Tree(
        tmp_path,
        mountinfo="30 23 0:27 /kubepods.slice /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
    )
    ctr = tree.cgroup("pod/ctr", group=1)
    tree.process(ctr, 100, 40)
    group = _groups(predict_victims(tree.paths))[100]
    assert group is not None
    assert group.cgroup == "/kubepods.slice/pod/ctr"


def test_preview_json_and_text_name_the_group(tmp_path: Path) -> None:
    tree = V2Tree(tmp_path)
    cid = "ab" * 32
    uid = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    pod = f"kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice"
    app = tree.cgroup(f"{pod}/cri-containerd-{cid}.scope", group=1)
    tree.process(app, 100, 300)
    tree.process(app, 101, 20)
    above = tree.cgroup("system.slice/db.service", group=1)
    tree.process(above, 200, 50)
    tree.process(tree.root, 300, 5)

    preview = oom_preview(tree.paths, predict_victims(tree.paths), PodDirectory())
    document = preview.model_dump(mode="json", by_alias=True)

    by_pid = {v["pid"]: v for v in document["predictedVictims"]}
    assert by_pid[100]["oomGroup"] == f"/{pod}/cri-containerd-{cid}.scope"
    assert by_pid[100]["killedWith"] == [101]
    assert by_pid[100]["groupRssBytes"] == 320 << 20
    assert by_pid[300]["oomGroup"] is None
    assert by_pid[300]["killedWith"] == []
    assert by_pid[300]["groupRssBytes"] == 5 << 20
    lines = _group_kill_lines(preview.predicted_victims)
    # Named by pod (UID here: no pod directory) and container, or by cgroup path.
    assert lines == [
        f"  #1 (pid 100) kills 2 processes of {uid}/{cid[:12]}, 320 MiB (memory.oom.group)",
        "  #2 (pid 200) kills 1 process of /system.slice/db.service, 50 MiB (memory.oom.group)",
        f"  #3 (pid 101) kills 2 processes of {uid}/{cid[:12]}, 320 MiB (memory.oom.group)",
    ]

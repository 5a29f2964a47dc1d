"""Futile OOM loops and the node's pressure and kill counters, from fake cgroup trees and a
fake /proc under tmp_path: which memcgs are flagged, their holders, the loop count across
cycles, and their place in the report JSON, the status, the Events, the text and the
metrics. (On real kernels: tests/host/test_futile_oom.py.)"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from nodemem.agent.main import Reporter
from nodemem.agent.metrics import MAX_POD_SERIES, AgentMetrics
from nodemem.api.report import HostReport, OomPreview
from nodemem.host.memcg import (
    MAX_FILES,
    FutileMemcg,
    OomLoopWatch,
    futile_below,
    largest_files,
)
from nodemem.host.meminfo import MemoryBreakdown
from nodemem.host.paths import HostPaths
from nodemem.host.podmem import PodMemory
from nodemem.host.shmem import NodeScan, ShmemAttribution, ShmemObject, TmpfsMount
from nodemem.host.vmstat import parse_pressure_lines
from nodemem.policy.apply import ApplyResult
from nodemem.policy.effective import EffectivePolicy
from nodemem.policy.pods import PodDirectory, PodInfo
from nodemem.policy.report import futile_items, host_report, node_counters, node_report_status
from nodemem.tables import host_report_text

MiB = 1 << 20
UID = "7d6f3c2e-1b4a-4c8d-9e0f-a1b2c3d4e5f6"
OTHER = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
CID = "ab" * 32
V1_UNLIMITED = "9223372036854771712"


def _v2(directory: Path, current: int, limit: str, shmem: int, kills: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.max").write_text(f"{limit}\n")
    (directory / "memory.stat").write_text(f"anon 0\nfile {shmem}\nshmem {shmem}\n")
    (directory / "memory.events").write_text(f"oom {kills}\noom_kill {kills}\n")
    return directory


def _v1(directory: Path, usage: int, limit: str, shmem: int, kills: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (directory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (directory / "memory.stat").write_text(f"shmem 0\ntotal_shmem {shmem}\n")
    (directory / "memory.oom_control").write_text(f"oom_kill_disable 0\noom_kill {kills}\n")
    return directory


def _scan(objects: list[ShmemObject], mounts: list[TmpfsMount]) -> NodeScan:
    return NodeScan(
        full=True,
        memory=MemoryBreakdown(*([0] * 11)),
        processes={},
        shmem=ShmemAttribution(total=0, objects=objects, deleted_open_files=[]),
        unreadable=[],
        vanished=0,
        open_tmpfs_files={},
        tmpfs_mounts=mounts,
    )


def test_v2_flags_a_memcg_near_its_limit_with_mostly_shmem(tmp_path: Path) -> None:
    pods = tmp_path / "kubepods.slice" / "kubepods-burstable.slice"
    _v2(tmp_path / "kubepods.slice", 500 * MiB, "max", 400 * MiB)
    slice_name = f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    pod = _v2(
        pods / slice_name,
        95 * MiB,
        str(100 * MiB),
        80 * MiB,
        kills=2,
    )
    _v2(pod / f"cri-containerd-{CID}.scope", 94 * MiB, "max", 80 * MiB)  # unlimited: not flagged
    # A cgroup the container made below itself is its own business: never walked.
    _v2(pod / f"cri-containerd-{CID}.scope" / "inner", 90 * MiB, str(91 * MiB), 90 * MiB)
    _v2(pods / "anon-full", 95 * MiB, str(100 * MiB), 10 * MiB)  # a kill frees it: not futile
    _v2(pods / "half-full", 50 * MiB, str(100 * MiB), 50 * MiB)  # far from its limit
    (pods / "not-a-memcg").mkdir()  # no +memory delegated: no files

    [futile] = futile_below(HostPaths(), None, tmp_path, "/")

    assert futile.path == f"/kubepods.slice/kubepods-burstable.slice/{slice_name}"
    assert (futile.pod_uid, futile.usage, futile.limit, futile.shmem) == (
        UID,
        95 * MiB,
        100 * MiB,
        80 * MiB,
    )
    assert futile.freeable == 15 * MiB
    assert futile.oom_kills == 2


def test_the_thresholds_are_inclusive(tmp_path: Path) -> None:
    _v2(tmp_path / "at", 90 * MiB, str(100 * MiB), 45 * MiB)  # exactly 90 % and 50 %
    _v2(tmp_path / "below", 90 * MiB - 4096, str(100 * MiB), 89 * MiB)
    assert [f.path for f in futile_below(HostPaths(), None, tmp_path, "/top")] == ["/top/at"]


def test_v1_uses_total_shmem_and_sums_the_kills_below(tmp_path: Path) -> None:
    pod = _v1(tmp_path / "kubepods" / "burstable" / f"pod{UID}", 60 * MiB, str(64 * MiB), 58 * MiB)
    _v1(pod / CID, 60 * MiB, V1_UNLIMITED, 58 * MiB, kills=3)  # v1 counts in the victim's memcg
    _v1(pod / ("cd" * 32), 0, V1_UNLIMITED, 0, kills=1)

    [futile] = futile_below(HostPaths(), None, tmp_path, "/")

    assert (futile.path, futile.pod_uid, futile.oom_kills) == (
        f"/kubepods/burstable/pod{UID}",
        UID,
        4,
    )


def test_holders_are_the_pods_objects_and_those_held_from_inside(tmp_path: Path) -> None:
    cgroups = tmp_path / "cgroup"
    memcg = _v2(cgroups / "job", 95 * MiB, str(100 * MiB), 90 * MiB)
    _v2(cgroups / "kubepods" / f"pod{UID}", 95 * MiB, str(100 * MiB), 90 * MiB)
    proc = tmp_path / "proc"
    for pid, cgroup in ((10, "/job/worker"), (11, "/elsewhere")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(f"0::{cgroup}\n")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "big").write_bytes(b"x" * (2 * MiB))
    (volume / "sub").mkdir()
    (volume / "sub" / "small").write_bytes(b"x" * 8192)
    objects = [
        ShmemObject("tmpfs", str(volume), 70 * MiB, pod=UID),
        ShmemObject("sysv", "shmid 7", 20 * MiB, holders={10: "worker"}),
        ShmemObject("memfd", "memfd:other", 5 * MiB, holders={11: "other"}),
        ShmemObject("tmpfs", "/dev/shm", 1 * MiB, pod=OTHER),
    ]
    mounts = [TmpfsMount(volume.stat().st_dev, str(volume), 0, 70 * MiB, UID)]
    assert memcg.is_dir()

    futile = futile_below(HostPaths(proc_root=proc), _scan(objects, mounts), cgroups, "/")

    by_path = {f.path: [(h.kind, h.name) for h in f.holders] for f in futile}
    assert by_path == {
        "/job": [("sysv", "shmid 7")],  # held by a task inside; not the memfd of one outside
        f"/kubepods/pod{UID}": [
            ("tmpfs", str(volume)),
            ("file", str(volume / "big")),  # the tmpfs's largest files, named
            ("file", str(volume / "sub" / "small")),
        ],
    }


def test_largest_files_only_walk_the_superblock_the_object_is(tmp_path: Path) -> None:
    for n in range(MAX_FILES + 2):
        (tmp_path / f"f{n}").write_bytes(b"x" * (4096 * (n + 1)))
    obj = ShmemObject("tmpfs", str(tmp_path), 0)
    dev = tmp_path.stat().st_dev
    files = largest_files(obj, [TmpfsMount(dev, str(tmp_path), 0, 0, None)])
    assert [h.name for h in files] == [str(tmp_path / f"f{n}") for n in (4, 3, 2)][:MAX_FILES]
    # a name whose mount point is now another superblock (or in another namespace): none
    assert largest_files(obj, [TmpfsMount(dev + 1, str(tmp_path), 0, 0, None)]) == []
    assert largest_files(ShmemObject("tmpfs", "/x (other mount namespace)", 0), []) == []


def _futile(kills: int | None, path: str = "/pod") -> FutileMemcg:
    return FutileMemcg(path, UID, 95 * MiB, 100 * MiB, 90 * MiB, kills)


def test_kills_across_cycles_count_as_a_loop() -> None:
    watch = OomLoopWatch()
    assert [f.loop_kills for f in watch.track([_futile(5)])] == [0]  # history before: not seen
    [once] = watch.track([_futile(6)])
    assert (once.loop_kills, once.looping) == (1, False)
    [twice] = watch.track([_futile(8)])
    assert (twice.loop_kills, twice.looping) == (3, True)
    assert watch.track([]) == []  # no longer futile: forgotten
    assert [f.loop_kills for f in watch.track([_futile(9)])] == [0]
    assert [f.loop_kills for f in watch.track([_futile(1)])] == [0]  # recreated: restarted
    assert [f.loop_kills for f in watch.track([_futile(None)])] == [0]  # v1 before 4.13


def _host(futile: FutileMemcg, proc: Path) -> HostReport:
    preview = OomPreview(
        scope="node", total_pages=1, predicted_victims=[], badness_truncation_risk=False
    )
    directory = PodDirectory([PodInfo(UID, "shop", "cart-0")])
    preview.futile = futile_items([futile], directory)
    pressure, kills = node_counters(HostPaths(proc_root=proc))
    return host_report(_scan([], []), oom=preview, pressure=pressure, oom_kills=kills)


def _proc(tmp_path: Path, psi: bool = True) -> Path:
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "vmstat").write_text("pgfault 10\noom_kill 7\n")
    if psi:
        (proc / "pressure" / "memory").write_text(
            "some avg10=1.25 avg60=0.50 avg300=0.10 total=12345\n"
            "full avg10=0.75 avg60=0.25 avg300=0.05 total=678\n"
        )
    return proc


def test_report_json_status_condition_and_event(tmp_path: Path) -> None:
    futile = _futile(3)
    futile.loop_kills = 2
    futile.holders = []
    host = _host(futile, _proc(tmp_path))

    document = host.model_dump(by_alias=True)
    assert document["oom"]["futile"] == [
        {
            "cgroup": "/pod",
            "pod": "shop/cart-0",
            "usageBytes": 95 * MiB,
            "limitBytes": 100 * MiB,
            "shmemBytes": 90 * MiB,
            "freeableBytes": 5 * MiB,
            "oomKills": 3,
            "loopKills": 2,
            "holders": [],
        }
    ]
    assert document["memory"]["pressure"] == {
        "some": {"avg10": 1.25, "avg60": 0.5, "totalMicroseconds": 12345},
        "full": {"avg10": 0.75, "avg60": 0.25, "totalMicroseconds": 678},
    }
    assert document["memory"]["oomKills"] == 7

    status = node_report_status(EffectivePolicy((), (), (), (), None), ApplyResult(), host, [])
    assert status.oom is not None and status.oom.futile == host.oom.futile  # type: ignore[union-attr]
    assert status.memory is not None and status.memory.oom_kills == 7
    [condition] = [c for c in status.conditions if c.type == "OOMLoopRisk"]
    assert (condition.status, condition.reason) == ("True", "RepeatedOOMKills")
    assert "shop/cart-0" in condition.message and "2 kills seen" in condition.message

    writer = _Writer()
    Reporter(None, writer, AgentMetrics(), HostPaths())._post_events(status, {}, {})  # type: ignore[arg-type]
    assert [reason for reason, _ in writer.events] == ["OOMLoopRisk"]
    writer.events.clear()
    Reporter(None, writer, AgentMetrics(), HostPaths())._post_events(  # type: ignore[arg-type]
        status, {"OOMLoopRisk": "True"}, {"OOMLoopRisk": "ShmemFillsLimit"}
    )
    assert [reason for reason, _ in writer.events] == ["OOMLoop"]  # the risk became a loop


def test_no_futile_memcg_is_condition_false(tmp_path: Path) -> None:
    host = host_report(_scan([], []), oom=None)
    status = node_report_status(EffectivePolicy((), (), (), (), None), ApplyResult(), host, [])
    [condition] = [c for c in status.conditions if c.type == "OOMLoopRisk"]
    assert (condition.status, condition.reason) == ("False", "NoFutileMemcg")


def test_without_psi_pressure_is_null(tmp_path: Path) -> None:
    assert node_counters(HostPaths(proc_root=_proc(tmp_path, psi=False))) == (None, 7)
    assert node_counters(HostPaths(proc_root=tmp_path / "nothing")) == (None, None)
    document = host_report(_scan([], [])).model_dump(by_alias=True)
    assert document["memory"]["pressure"] is None and document["memory"]["oomKills"] is None


def test_pressure_lines_that_do_not_parse_are_left_out() -> None:
    lines = parse_pressure_lines("some avg10=1.00 avg60=2.00 avg300=0 total=5\nfull avg10=x\n")
    assert list(lines) == ["some"] and lines["some"].total_us == 5


def test_text_names_the_futile_memcg_and_the_counters(tmp_path: Path) -> None:
    futile = _futile(1)
    futile.holders = []
    text = host_report_text(_host(futile, _proc(tmp_path)))
    assert "memory pressure some 1.25% (10 s) 0.50% (60 s), full 0.75% (10 s)" in text
    assert "7 OOM kills since boot" in text
    assert "OOM kills that free nothing" in text and "shop/cart-0" in text


class _Writer:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def event(self, reason: str, message: str) -> None:
        self.events.append((reason, message))


def _pod(uid: str, kills: int | None, memory: int) -> PodMemory:
    return PodMemory(uid, "Burstable", Path("/x"), memory, None, 0, 0, 0, kills, None)


def test_metrics_pressure_gauges_pod_kills_and_futile(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    proc = _proc(tmp_path)
    metrics.observe_scan(_scan([], []), PodDirectory(), HostPaths(proc_root=proc))
    futile = _futile(3)
    futile.loop_kills = 2
    host = _host(futile, proc)
    pods = [_pod(f"{n:08d}-0000-0000-0000-000000000000", n % 3, n) for n in range(300)]
    pods.append(_pod(UID, None, 1))  # v1 before 4.13: no count, no series
    metrics.observe_pods(pods, PodDirectory([PodInfo(pods[5].uid, "shop", "cart-0")]), host)

    text = generate_latest(metrics.registry).decode()
    assert 'nodemem_memory_pressure_avg10{kind="some"} 1.25' in text
    assert 'nodemem_memory_pressure_avg60{kind="full"} 0.25' in text
    assert 'nodemem_pod_oom_kills_total{pod="shop/cart-0"} 2.0' in text
    assert text.count("nodemem_pod_oom_kills_total{") == MAX_POD_SERIES
    assert f'pod="{UID}"' not in text
    assert "nodemem_oom_futile_cgroups 1.0" in text
    assert 'nodemem_oom_loop_kills{cgroup="/pod",pod="shop/cart-0"} 2.0' in text

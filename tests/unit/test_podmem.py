"""Memory per pod from fake cgroup trees (v1 and v2 layouts, both drivers) under tmp_path,
and its place in the report JSON, the NodeMemoryReport status and the text table."""

from __future__ import annotations

from pathlib import Path

from nodemem.api.report import HostReport, MemorySummary
from nodemem.api.status import NodeMemoryReportStatus
from nodemem.host.paths import HostPaths
from nodemem.host.podmem import PodMemory, pod_cgroups, read_pod_memory
from nodemem.policy.pods import PodDirectory, PodInfo
from nodemem.policy.report import pod_memory_items
from nodemem.tables import host_report_text

UID_A = "7d6f3c2e-1b4a-4c8d-9e0f-a1b2c3d4e5f6"
UID_B = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
UID_C = "11111111-2222-3333-4444-555555555555"
CID = "ab" * 32
MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"


def _v2(directory: Path, current: int, limit: str = "max", kills: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.max").write_text(f"{limit}\n")
    (directory / "memory.stat").write_text(
        f"anon {current // 2}\nfile {current // 4}\nkernel 4096\nshmem {current // 8}\n"
    )
    (directory / "memory.events").write_text(
        f"low 0\nhigh 0\nmax 3\noom {kills}\noom_kill {kills}\noom_group_kill 0\n"
    )
    (directory / "memory.pressure").write_text(
        "some avg10=1.25 avg60=0.50 avg300=0.10 total=12345\n"
        "full avg10=0.75 avg60=0.25 avg300=0.05 total=678\n"
    )
    (directory / "cgroup.procs").write_text("")
    return directory


def _v1(directory: Path, usage: int, limit: str = V1_UNLIMITED, kills: int | None = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (directory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    # Plain keys count the cgroup's own tasks, total_* the subtree: the latter are used.
    (directory / "memory.stat").write_text(
        f"cache 0\nrss 0\nshmem 0\ntotal_cache {usage // 4}\ntotal_rss {usage // 2}\n"
        f"total_shmem {usage // 8}\n"
    )
    oom_kill = "" if kills is None else f"oom_kill {kills}\n"
    (directory / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\n{oom_kill}")
    (directory / "cgroup.procs").write_text("")
    return directory


def test_v2_systemd_tree(tmp_path: Path) -> None:
    kubepods = tmp_path / "kubepods.slice"
    _v2(kubepods, 1000 * MiB)
    burstable = kubepods / "kubepods-burstable.slice"
    _v2(burstable, 600 * MiB)
    pod_a = _v2(
        burstable / f"kubepods-burstable-pod{UID_A.replace('-', '_')}.slice", 64 * MiB, kills=2
    )
    # A container below the pod is not a pod, and is not walked into.
    _v2(pod_a / f"cri-containerd-{CID}.scope", 60 * MiB, kills=2)
    _v2(kubepods / f"kubepods-pod{UID_B.replace('-', '_')}.slice", 128 * MiB, str(256 * MiB))
    _v2(tmp_path / "system.slice" / "containerd.service", 10 * MiB)

    pods = read_pod_memory(_no_host(), tmp_path)

    assert pods == [
        PodMemory(
            uid=UID_B,
            qos_class="Guaranteed",
            directory=kubepods / f"kubepods-pod{UID_B.replace('-', '_')}.slice",
            memory_bytes=128 * MiB,
            limit_bytes=256 * MiB,
            anon_bytes=64 * MiB,
            file_bytes=32 * MiB,
            shmem_bytes=16 * MiB,
            oom_kills=0,
            pressure_some_10s=1.25,
        ),
        PodMemory(
            uid=UID_A,
            qos_class="Burstable",
            directory=pod_a,
            memory_bytes=64 * MiB,
            limit_bytes=None,
            anon_bytes=32 * MiB,
            file_bytes=16 * MiB,
            shmem_bytes=8 * MiB,
            oom_kills=2,
            pressure_some_10s=1.25,
        ),
    ]


def test_v2_without_psi_has_no_pressure(tmp_path: Path) -> None:
    pod = _v2(tmp_path / "kubepods" / "besteffort" / f"pod{UID_A}", MiB)
    (pod / "memory.pressure").unlink()  # psi=0: the file is not there
    [memory] = read_pod_memory(_no_host(), tmp_path)
    assert (memory.qos_class, memory.pressure_some_10s) == ("BestEffort", None)


def test_v1_cgroupfs_tree_sums_local_oom_kills(tmp_path: Path) -> None:
    kubepods = _v1(tmp_path / "kubepods", 900 * MiB)
    pod_a = _v1(kubepods / "burstable" / f"pod{UID_A}", 40 * MiB, str(100 * MiB), kills=0)
    _v1(pod_a / CID, 30 * MiB, kills=2)  # v1 counts kills in the victim's memcg only
    _v1(pod_a / ("cd" * 32), 10 * MiB, kills=1)
    _v1(kubepods / f"pod{UID_B}", 80 * MiB, kills=None)  # before 4.13: no oom_kill line

    a, b = sorted(read_pod_memory(_no_host(), tmp_path), key=lambda m: m.uid != UID_A)

    assert (a.uid, a.qos_class, a.memory_bytes, a.limit_bytes) == (
        UID_A,
        "Burstable",
        40 * MiB,
        100 * MiB,
    )
    assert (a.anon_bytes, a.file_bytes, a.shmem_bytes) == (20 * MiB, 10 * MiB, 5 * MiB)
    assert a.oom_kills == 3
    assert a.pressure_some_10s is None
    assert (b.uid, b.qos_class, b.limit_bytes, b.oom_kills) == (UID_B, "Guaranteed", None, None)


def test_walk_finds_nested_kubepods_and_skips_strays(tmp_path: Path) -> None:
    # kind / docker-in-docker: a kubelet root inside another container's cgroup
    nested = tmp_path / "docker" / ("ef" * 32) / "kubepods" / "besteffort" / f"pod{UID_A}"
    _v2(nested, MiB)
    _v2(tmp_path / "user.slice" / f"pod{UID_B}", MiB)  # not under kubepods: not a pod
    _v2(
        tmp_path
        / "kubelet.slice"
        / "kubelet-kubepods.slice"
        / f"kubelet-kubepods-pod{UID_C}.slice",
        MiB,
    )
    found = {pod.pod_uid: pod.qos_class for _path, pod in pod_cgroups(tmp_path)}
    assert found == {UID_A: "BestEffort", UID_C: "Guaranteed"}


def test_a_pod_removed_while_read_is_left_out(tmp_path: Path) -> None:
    pod = _v2(tmp_path / "kubepods" / f"pod{UID_A}", MiB)
    (pod / "memory.current").unlink()
    (pod / "memory.usage_in_bytes").write_text("")  # neither layout readable
    assert read_pod_memory(_no_host(), tmp_path) == []


def test_no_memory_hierarchy_means_no_pods(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text("")
    assert read_pod_memory(_no_host(tmp_path)) == []


def _no_host(proc: Path | None = None) -> HostPaths:
    return HostPaths(proc_root=proc or Path("/nonexistent"))


def _report(items: list[object]) -> HostReport:
    document = {
        "memory": {k: 0 for k, f in MemorySummary.model_fields.items() if f.is_required()},
        "shmem": {
            "totalBytes": 0,
            "attributedBytes": 0,
            "unaccountedBytes": 0,
            "byKind": {},
            "top": [],
        },
        "unreadableProcesses": 0,
        "pods": items,
    }
    return HostReport.model_validate(document)


def test_pod_items_are_named_from_the_directory_and_cut_to_top(tmp_path: Path) -> None:
    _v2(tmp_path / "kubepods" / f"pod{UID_A}", 64 * MiB, str(128 * MiB), kills=1)
    _v2(tmp_path / "kubepods" / "burstable" / f"pod{UID_B}", 32 * MiB)
    _v2(tmp_path / "kubepods" / "besteffort" / f"pod{UID_C}", 16 * MiB)
    directory = PodDirectory([PodInfo(uid=UID_A, namespace="shop", name="cart-0")])

    items = pod_memory_items(read_pod_memory(_no_host(), tmp_path), directory, limit=2)

    document = [item.model_dump(by_alias=True, mode="json") for item in items]
    assert document == [
        {
            "uid": UID_A,
            "namespace": "shop",
            "name": "cart-0",
            "qosClass": "Guaranteed",
            "memoryBytes": 64 * MiB,
            "limitBytes": 128 * MiB,
            "anonBytes": 32 * MiB,
            "fileBytes": 16 * MiB,
            "shmemBytes": 8 * MiB,
            "oomKills": 1,
            "pressureSome10s": 1.25,
        },
        {
            "uid": UID_B,
            "namespace": None,
            "name": None,
            "qosClass": "Burstable",
            "memoryBytes": 32 * MiB,
            "limitBytes": None,
            "anonBytes": 16 * MiB,
            "fileBytes": 8 * MiB,
            "shmemBytes": 4 * MiB,
            "oomKills": 0,
            "pressureSome10s": 1.25,
        },
    ]
    report = _report(document)  # the JSON reads back
    assert report.pods == items
    status = NodeMemoryReportStatus(pods=report.pods)
    assert status.model_dump(by_alias=True)["pods"] == document

    text = host_report_text(report)
    assert "Pods by memory" in text
    header = next(line for line in text.splitlines() if "QOS" in line)
    assert header.split() == [
        "POD", "QOS", "MEMORY", "LIMIT", "ANON", "FILE", "SHMEM", "OOM", "KILLS", "PRESSURE",
    ]  # fmt: skip
    cart = next(line for line in text.splitlines() if "shop/cart-0" in line)
    assert cart.split() == [
        "shop/cart-0", "Guaranteed", "64", "MiB", "128", "MiB", "32", "MiB", "16", "MiB",
        "8", "MiB", "1", "1.25%",
    ]  # fmt: skip
    other = next(line for line in text.splitlines() if UID_B in line)
    assert "none" in other.split()  # unlimited


def test_report_without_pods_has_an_empty_list_and_no_table() -> None:
    report = _report([])
    assert report.model_dump(by_alias=True)["pods"] == []
    assert "Pods by memory" not in host_report_text(report)

"""The cardinality bounds of the per-mount and per-object series: a node with more tmpfs
mounts and objects than any dashboard wants, names that collide or are huge, and series
that must disappear with their object. (The values on a real kernel: tests/host/
test_metrics_series.py.)"""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodemem.agent.metrics import MAX_LABEL_CHARS, MAX_TMPFS_MOUNTS, AgentMetrics, label
from nodemem.api.report import ApplyReport, OomStatus, TmpfsStatus
from nodemem.host.meminfo import MemoryBreakdown
from nodemem.host.shmem import NodeScan, ShmemAttribution, ShmemObject, TmpfsMount
from nodemem.host.vmstat import parse_oom_kills, parse_pressure
from nodemem.policy.pods import PodDirectory, PodInfo

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scan(objects: list[ShmemObject], mounts: list[TmpfsMount]) -> NodeScan:
    memory = MemoryBreakdown(*([0] * 11))
    return NodeScan(
        full=True,
        memory=memory,
        processes={},
        shmem=ShmemAttribution(total=0, objects=objects, deleted_open_files=[]),
        unreadable=[],
        vanished=0,
        open_tmpfs_files={},
        tmpfs_mounts=mounts,
    )


def samples(metrics: AgentMetrics, name: str) -> Samples:
    text = generate_latest(metrics.registry).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                assert key not in out, f"duplicate {key}"
                out[key] = sample.value
    return out


def test_tmpfs_mount_series_are_capped_to_the_most_used() -> None:
    mounts = [TmpfsMount(dev, f"/run/pod-{dev}", 1 << 20, dev, None) for dev in range(500)]
    metrics = AgentMetrics()
    metrics.observe_scan(scan([], mounts), PodDirectory())
    used = samples(metrics, "nodemem_tmpfs_mount_used_bytes")
    assert len(used) == MAX_TMPFS_MOUNTS == 200
    assert min(used.values()) == 500 - MAX_TMPFS_MOUNTS
    assert len(samples(metrics, "nodemem_tmpfs_mount_size_bytes")) == MAX_TMPFS_MOUNTS
    assert samples(metrics, "nodemem_tmpfs_mounts") == {("nodemem_tmpfs_mounts", ()): 500}


def test_superblocks_of_one_name_stay_apart_and_vanished_ones_go() -> None:
    shm = "/dev/shm (other mount namespace)"  # every container's own /dev/shm
    metrics = AgentMetrics()
    metrics.observe_scan(
        scan([], [TmpfsMount(d, shm, 64, d, None) for d in (7, 8)]), PodDirectory()
    )
    assert len(samples(metrics, "nodemem_tmpfs_mount_used_bytes")) == 2
    metrics.observe_scan(scan([], [TmpfsMount(8, shm, 64, 8, None)]), PodDirectory())
    assert samples(metrics, "nodemem_tmpfs_mount_used_bytes") == {
        ("nodemem_tmpfs_mount_used_bytes", (("dev", "0:8"), ("path", shm))): 8
    }


def test_top_objects_are_bounded_summed_by_name_and_named_by_pod() -> None:
    pods = PodDirectory([PodInfo("uid-1", "db", "postgres-0")])
    objects = [ShmemObject("sharedAnon", "/dev/zero", 100, pod="uid-1") for _ in range(3)]
    objects += [ShmemObject("memfd", f"memfd:m{i}", i) for i in range(100)]
    objects.append(ShmemObject("sysv", "shmid 1", 500, pod="uid-unknown", orphan=True))
    metrics = AgentMetrics(top_objects=3)
    metrics.observe_scan(scan(objects, []), pods)
    top = samples(metrics, "nodemem_shmem_object_bytes")
    name = "nodemem_shmem_object_bytes"
    assert top == {
        (name, (("kind", "sysv"), ("name", "shmid 1"), ("pod", "uid-unknown"))): 500,
        (name, (("kind", "sharedAnon"), ("name", "/dev/zero"), ("pod", "db/postgres-0"))): 300,
        (name, (("kind", "memfd"), ("name", "memfd:m99"), ("pod", ""))): 99,
    }
    metrics = AgentMetrics(top_objects=20)
    metrics.observe_scan(scan(objects, []), pods)
    top = samples(metrics, name)
    assert len(top) == 20
    assert (
        top[(name, (("kind", "sharedAnon"), ("name", "/dev/zero"), ("pod", "db/postgres-0")))]
        == 300
    )
    assert samples(metrics, "nodemem_orphan_sysv_segments") == {
        ("nodemem_orphan_sysv_segments", ()): 1
    }
    # The next cycle without them: no object series left.
    metrics.observe_scan(scan([], []), pods)
    assert samples(metrics, name) == {}


def test_long_and_undecodable_names_become_bounded_valid_labels() -> None:
    long = "/x" * 5000
    assert len(label(long)) == MAX_LABEL_CHARS and label(long).endswith("\u2026")
    assert label("/bad\udcff") == "/bad\ufffd"  # a byte that is not UTF-8
    metrics = AgentMetrics()
    metrics.observe_scan(scan([ShmemObject("memfd", "memfd:\udcff" + long, 5)], []), PodDirectory())
    ((_, labels),) = samples(metrics, "nodemem_shmem_object_bytes")
    assert dict(labels)["name"] == label("memfd:\udcff" + long)


def test_limit_state_shows_the_winning_item_per_mount_and_policy() -> None:
    def item(path: str, state: str) -> TmpfsStatus:
        return TmpfsStatus(path=path, pattern="/m/*", policy="p", state=state)  # type: ignore[arg-type]

    report = ApplyReport(
        policies=[],
        dry_run=False,
        tmpfs=[item("/m/a", "Overridden"), item("/m/a", "Refused"), item("/m/b", "Applied")],
        cleanup=[],
        oom=OomStatus(),
    )
    metrics = AgentMetrics()
    metrics.observe_apply(report)
    name = "nodemem_tmpfs_limit_state"
    assert samples(metrics, name) == {
        (name, (("path", "/m/a"), ("policy", "p"), ("state", "Refused"))): 1,
        (name, (("path", "/m/b"), ("policy", "p"), ("state", "Applied"))): 1,
    }
    metrics.observe_apply(report.model_copy(update={"tmpfs": []}))
    assert samples(metrics, name) == {}


def test_vmstat_and_pressure_parsers_take_what_the_kernel_prints() -> None:
    assert parse_oom_kills("pgfault 10\noom_kill 12\nfoo 1\n") == 12
    assert parse_oom_kills("pgfault 10\n") is None  # before Linux 4.13
    text = (
        "some avg10=0.00 avg60=0.12 avg300=0.00 total=17446\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=5830\n"
    )
    assert parse_pressure(text) == {"some": 0.017446, "full": 0.00583}
    assert parse_pressure("some avg10=x total=\n") == {}

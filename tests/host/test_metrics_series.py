"""The standalone agent's /metrics (issue 12): every tmpfs, the top objects, deleted-open
files, orphaned SysV segments, limit states and the node's own counters, with the real
values of objects made on this kernel; series of objects that are gone are removed, and
names chosen by anyone stay valid label values."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from metrics_helpers import Series, listening_address, policy, standalone_agent, value, wait_for

from nodemem.agent.metrics import label
from nodemem.host.vmstat import parse_oom_kills

pytestmark = pytest.mark.privileged

MiB = 1 << 20
SIZE = 4 * MiB


def dev_of(path: Path) -> str:
    dev = path.stat().st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def fill(path: Path, size: int) -> None:
    with path.open("wb") as out:
        out.write(b"\xa5" * size)


def names(series: Series, metric: str, key: str) -> set[str]:
    return {dict(labels)[key] for name, labels in series if name == metric}


def test_standalone_metrics_serve_real_values_and_drop_what_is_gone(
    mount_tmpfs, holder, tmp_path
) -> None:
    full = mount_tmpfs("full", options="size=4m")
    fill(full / "data", SIZE - 256 * 1024)
    shrink = mount_tmpfs("shrink", options="size=64m")
    fill(shrink / "data", 2 * MiB)
    deleted = holder("deleted-open", SIZE, str(shrink / "gone.log"))
    orphan = holder("sysv-orphan", SIZE)
    memfd = holder("memfd", 8 * MiB, "nodemem-metrics-top")
    document = policy("metrics", {"tmpfs": [{"path": str(shrink), "size": "1Mi"}]})
    with standalone_agent(tmp_path, document) as agent:
        # Outside a cluster the port is this host's alone.
        assert listening_address(agent.port) == "127.0.0.1"
        series = agent.series()
        dev = dev_of(full)
        assert value(series, "nodemem_tmpfs_mount_size_bytes", path=str(full), dev=dev) == SIZE
        used = value(series, "nodemem_tmpfs_mount_used_bytes", path=str(full), dev=dev)
        assert used == SIZE - 256 * 1024
        # The limit below use is refused by the kernel: the state says so, the size stays.
        refused = value(
            series, "nodemem_tmpfs_limit_state", path=str(shrink), policy="metrics", state="Refused"
        )
        assert refused == 1
        labels = {"path": str(shrink), "dev": dev_of(shrink)}
        assert value(series, "nodemem_tmpfs_mount_size_bytes", **labels) == 64 * MiB
        assert value(series, "nodemem_tmpfs_mount_used_bytes", **labels) == 6 * MiB
        mounts = value(series, "nodemem_tmpfs_mounts")
        assert mounts is not None and mounts >= 2
        # Top objects: the memfd, the two tmpfs mounts.
        top = value(
            series,
            "nodemem_shmem_object_bytes",
            kind="memfd",
            name="memfd:nodemem-metrics-top",
            pod="",
        )
        assert top == 8 * MiB
        assert (
            value(series, "nodemem_shmem_object_bytes", kind="tmpfs", name=str(shrink), pod="")
            == 6 * MiB
        )
        assert len(names(series, "nodemem_shmem_object_bytes", "name")) <= 20
        deleted_open = value(series, "nodemem_deleted_open_bytes")
        assert deleted_open is not None and deleted_open >= SIZE
        assert (value(series, "nodemem_orphan_sysv_segments") or 0) >= 1
        assert (value(series, "nodemem_orphan_sysv_bytes") or 0) >= SIZE
        shmid = f"shmid {orphan['shmid']}"
        assert value(series, "nodemem_shmem_object_bytes", kind="sysv", name=shmid, pod="") == SIZE
        # The node's own figures, as the kernel gives them.
        meminfo = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
        )
        total = int(meminfo["MemTotal"].split()[0]) * 1024
        assert value(series, "nodemem_memory_bytes", part="total") == total
        for part in ("processRss", "slabUnreclaimable", "kernelStack", "pageTables"):
            assert (value(series, "nodemem_memory_bytes", part=part) or 0) > 0, part
        kills = parse_oom_kills(Path("/proc/vmstat").read_text())
        assert kills is not None  # Linux >= 4.13
        assert 0 <= kills - (value(series, "nodemem_oom_kills_total") or -1) <= 100
        if Path("/proc/pressure/memory").exists():
            assert value(series, "nodemem_memory_pressure_seconds_total", kind="some") is not None

        # Gone: the memfd, the orphan, the deleted file, a mount. Their series go too.
        for info in (memfd, deleted, orphan):
            info["process"].stdin.close()
            info["process"].wait(timeout=10)
        subprocess.run(["ipcrm", "-m", str(orphan["shmid"])], check=True)
        subprocess.run(["umount", str(full)], check=True)

        def gone() -> bool:
            now = agent.series()
            return (
                str(full) not in names(now, "nodemem_tmpfs_mount_size_bytes", "path")
                and "memfd:nodemem-metrics-top"
                not in names(now, "nodemem_shmem_object_bytes", "name")
                and shmid not in names(now, "nodemem_shmem_object_bytes", "name")
            )

        wait_for(gone, 15, "series of vanished objects removed")


def test_top_objects_flag_bounds_the_object_series(holder, tmp_path) -> None:
    for index in range(3):
        holder("memfd", MiB * (index + 1), f"nodemem-top-{index}")
    with standalone_agent(tmp_path, policy("top", {}), "--metrics-top-objects", "2") as agent:
        series = agent.series()
        objects = {
            dict(labels)["name"]: sample
            for (name, labels), sample in series.items()
            if name == "nodemem_shmem_object_bytes"
        }
        assert len(objects) == 2
        # With objects of 3 and 2 MiB on the node, the two largest are at least 2 MiB.
        assert min(objects.values()) >= 2 * MiB


def test_hostile_names_are_valid_label_values(mount_tmpfs, holder, tmp_path) -> None:
    hostile = 'x"} 1\nnodemem_fake 1\\\x1b[31m\u202e'
    point = mount_tmpfs(at=Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff" + hostile.encode())))
    fill(point / "data", MiB)
    holder("memfd", 2 * MiB, hostile)
    with standalone_agent(tmp_path, policy("hostile", {})) as agent:
        text = agent.text()
        series = agent.series()  # parses, no duplicate series
        assert not any(name == "nodemem_fake" for name, _ in series)
        paths = names(series, "nodemem_tmpfs_mount_used_bytes", "path")
        assert label(str(point)) in paths
        assert "\ufffd" in label(str(point))  # the undecodable byte
        assert f"memfd:{hostile}" in names(series, "nodemem_shmem_object_bytes", "name")
        assert "\nnodemem_fake" not in text  # the newline is escaped in the exposition

"""Pod identity from cgroup paths (both drivers, v1 and v2) and from a fake /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodemem.host.identity import (
    CgroupLine,
    PodCgroup,
    matching_cgroup,
    parse_cgroup_file,
    parse_cgroup_path,
    read_identity,
)
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone

UID = "7d6f3c2e-1b4a-4c8d-9e0f-a1b2c3d4e5f6"
UID_ = UID.replace("-", "_")
STATIC_UID = "4b8f3e2a9c1d7e6f5a4b3c2d1e0f9a8b"  # static pods: a hash, no dashes
CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00998877665544332211"
SANDBOX = "a" * 64

CASES: list[tuple[str, PodCgroup]] = [
    # cgroupfs driver (v1 and v2 look alike)
    (f"/kubepods/burstable/pod{UID}/{CID}", PodCgroup(UID, CID, "Burstable")),
    (f"/kubepods/besteffort/pod{UID}/{CID}", PodCgroup(UID, CID, "BestEffort")),
    (f"/kubepods/pod{UID}/{CID}", PodCgroup(UID, CID, "Guaranteed")),
    (f"/kubepods/pod{UID}/{SANDBOX}", PodCgroup(UID, SANDBOX, "Guaranteed")),
    (f"/kubepods/burstable/pod{UID}", PodCgroup(UID, None, "Burstable")),
    (f"/kubepods/burstable/pod{STATIC_UID}/{CID}", PodCgroup(STATIC_UID, CID, "Burstable")),
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", PodCgroup(UID, CID, "Burstable")),
    # a container's own sub-cgroup still belongs to the container
    (f"/kubepods/burstable/pod{UID}/{CID}/worker", PodCgroup(UID, CID, "Burstable")),
    # kubelet --cgroup-root, and kind/docker-in-docker nesting
    (f"/kubelet/kubepods/burstable/pod{UID}/{CID}", PodCgroup(UID, CID, "Burstable")),
    (f"/docker/{SANDBOX}/kubepods/besteffort/pod{UID}/{CID}", PodCgroup(UID, CID, "BestEffort")),
    # systemd driver: containerd, docker, cri-o
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope",
        PodCgroup(UID, CID, "Burstable"),
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"docker-{CID}.scope",
        PodCgroup(UID, CID, "BestEffort"),
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope",
        PodCgroup(UID, CID, "Guaranteed"),
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{SANDBOX}.scope",
        PodCgroup(UID, SANDBOX, "Guaranteed"),
    ),
    # CRI-O's monitor: in the pod, in no container
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"crio-conmon-{CID}.scope",
        PodCgroup(UID, None, "Burstable"),
    ),
    (
        f"/kubepods.slice/kubepods-pod{STATIC_UID}.slice/crio-{CID}.scope",
        PodCgroup(STATIC_UID, CID, "Guaranteed"),
    ),
    # kubelet's cgroup root as a slice
    (
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
        f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        PodCgroup(UID, CID, "Burstable"),
    ),
    (
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope",
        PodCgroup(UID, CID, "Guaranteed"),
    ),
    # containerd's "slice:prefix:id" name under the runtime's own unit
    (
        f"/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}",
        PodCgroup(UID, CID, "Burstable"),
    ),
    # read from inside a cgroup namespace (v2 containers): the levels above show as ".."
    (f"/../../burstable/pod{UID}/{CID}", PodCgroup(UID, CID, "Burstable")),
    (f"/../../../besteffort/pod{UID}/{CID}", PodCgroup(UID, CID, "BestEffort")),
    (f"/../pod{UID}/{CID}", PodCgroup(UID, CID, None)),  # same QoS level as the reader's
    (
        f"/../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        PodCgroup(UID, CID, "Burstable"),
    ),
    (f"/../{CID}", PodCgroup(None, None, None)),  # a sibling container of the same pod
    # not pods
    ("/", PodCgroup(None, None, None)),
    ("/kubepods.slice/kubepods-burstable.slice", PodCgroup(None, None, None)),
    ("/kubepods/burstable", PodCgroup(None, None, None)),
    ("/system.slice/containerd.service", PodCgroup(None, None, None)),
    (f"/user.slice/pod{UID}/{CID}", PodCgroup(None, None, None)),
    (f"/somewhere/burstable/pod{UID}/{CID}", PodCgroup(None, None, None)),
]


@pytest.mark.parametrize(("path", "expected"), CASES, ids=[case[0][-60:] for case in CASES])
def test_parse_cgroup_path(path: str, expected: PodCgroup) -> None:
    assert parse_cgroup_path(path) == expected


def test_parse_cgroup_path_returns_a_tuple() -> None:
    pod_uid, container_id, qos = parse_cgroup_path(f"/kubepods/pod{UID}/{CID}")
    assert (pod_uid, container_id, qos) == (UID, CID, "Guaranteed")


HYBRID = (
    f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n"
    "11:name=systemd:/system.slice/containerd.service\n"
    "0::/system.slice/containerd.service\n"
)
PURE_V2 = f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"


def test_matching_cgroup_prefers_the_memory_controller_line_on_v1_and_hybrid() -> None:
    lines = parse_cgroup_file(HYBRID)
    assert lines[0] == CgroupLine(12, "memory", f"/kubepods/burstable/pod{UID}/{CID}")
    assert matching_cgroup(lines) == f"/kubepods/burstable/pod{UID}/{CID}"


def test_matching_cgroup_uses_the_unified_line_on_pure_v2() -> None:
    assert matching_cgroup(parse_cgroup_file(PURE_V2)) == PURE_V2.strip()[3:]


def test_matching_cgroup_reads_controller_lists() -> None:
    lines = parse_cgroup_file("4:cpu,memory:/a\n0::/b\n")
    assert matching_cgroup(lines) == "/a"
    assert matching_cgroup(()) == ""


def _fake_process(
    root: Path, pid: int, *, cgroup: str, cmdline: bytes, exe: str | None, kthread: bool = False
) -> None:
    directory = root / str(pid)
    directory.mkdir(parents=True)
    vm = "" if kthread else "VmSize:\t  1000 kB\nVmRSS:\t   400 kB\n"
    (directory / "status").write_text(
        f"Name:\tworker\nUmask:\t0022\nPPid:\t1\nUid:\t1000\t1000\t1000\t1000\n{vm}"
        f"Kthread:\t{int(kthread)}\n"
    )
    (directory / "cmdline").write_bytes(cmdline)
    (directory / "cgroup").write_text(cgroup)
    if exe is not None:
        (directory / "exe").symlink_to(exe)


def test_read_identity_from_a_fake_proc(tmp_path: Path) -> None:
    _fake_process(
        tmp_path, 4242, cgroup=HYBRID, cmdline=b"python3\0-m\0worker\0", exe="/usr/bin/python3"
    )
    identity = read_identity(HostPaths(proc_root=tmp_path), 4242)
    assert identity.pid == 4242
    assert identity.comm == "worker"
    assert identity.cmdline == "python3 -m worker"
    assert identity.exe == "/usr/bin/python3"
    assert identity.uid == 1000
    assert identity.cgroup == f"/kubepods/burstable/pod{UID}/{CID}"
    assert len(identity.cgroup_lines) == 3
    assert (identity.pod_uid, identity.container_id, identity.qos_class) == (
        UID,
        CID,
        "Burstable",
    )
    assert identity.kthread is False


def test_read_identity_of_a_kernel_thread(tmp_path: Path) -> None:
    _fake_process(tmp_path, 2, cgroup="0::/\n", cmdline=b"", exe=None, kthread=True)
    identity = read_identity(HostPaths(proc_root=tmp_path), 2)
    assert identity.kthread is True
    assert identity.exe is None
    assert identity.cmdline == ""
    assert identity.pod_uid is None


def test_read_identity_of_a_missing_process(tmp_path: Path) -> None:
    with pytest.raises(ProcessGone):
        read_identity(HostPaths(proc_root=tmp_path), 999_999)


def test_read_identity_of_this_process() -> None:
    identity = read_identity(HostPaths(), os.getpid())
    assert identity.pid == os.getpid()
    assert identity.kthread is False
    assert identity.exe is not None and "python" in identity.exe
    assert "pytest" in identity.cmdline or "python" in identity.cmdline

"""podShm tmpfs items: which pods' /dev/shm an item names (host.pod_shm finds them)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from nodemem.api.policy import PodVolumeSelector
from nodemem.host.paths import HostPaths
from nodemem.host.pod_shm import PodShm, find_pod_shm, pod_processes
from nodemem.host.tmpfs_limits import LimitResult, LimitState, Target
from nodemem.policy.pods import PodDirectory, PodInfo


def selects_pod(selector: PodVolumeSelector, pod: PodInfo) -> bool:
    """Whether the selector's namespace and labels name `pod` (its volume is not asked)."""
    if selector.namespace is not None and pod.namespace != selector.namespace:
        return False
    return selector.label_selector is None or selector.label_selector.matches(pod.labels)


class PodShmTargets:
    """The /dev/shm of the pods on this node, found once (at the first item that asks)
    and shared by every podShm item of one apply.

    `pids` limits the search to those processes (the agent's exec path); `done` holds
    (pod UID, superblock dev) pairs already sized or passed over: not resolved again.
    """

    def __init__(
        self,
        paths: HostPaths,
        pods: PodDirectory,
        *,
        pids: Sequence[int] | None = None,
        done: Collection[tuple[str, int]] = (),
    ) -> None:
        self.paths = paths
        self.pods = pods
        self.pids = pids
        self.done = done
        self.looked_at: list[PodShm] = []  # every superblock found, `done` ones too
        self.selected_any: list[PodShm] = []  # those an item selected
        self._found: list[PodShm] | None = None
        self._pod_of: dict[tuple[int | None, str], str] = {}

    @property
    def found(self) -> list[PodShm]:
        """Every superblock found for a pod known to the directory (not only selected),
        but those in `done`."""
        if self._found is None:
            processes = {
                uid: pids
                for uid, pids in pod_processes(self.paths, self.pids).items()
                if self.pods.get(uid) is not None
            }
            self.looked_at = find_pod_shm(self.paths, processes)
            self._found = [
                shm
                for shm in self.looked_at
                if shm.dev is None or (shm.pod_uid, shm.dev) not in self.done
            ]
            for shm in self._found:
                self._pod_of[_key(shm.target)] = self.label(shm.pod_uid)
        return self._found

    def label(self, uid: str) -> str:
        pod = self.pods.get(uid)
        return uid if pod is None else f"{pod.namespace}/{pod.name}"

    def selected(self, selector: PodVolumeSelector | None) -> list[PodShm]:
        if selector is None:  # the models require pods with podShm
            return []
        selected = [
            shm
            for shm in self.found
            if (pod := self.pods.get(shm.pod_uid)) is not None and selects_pod(selector, pod)
        ]
        self.selected_any += [shm for shm in selected if shm not in self.selected_any]
        return selected

    def targets(self, selector: PodVolumeSelector | None) -> list[Target]:
        """The selected pods' own /dev/shm tmpfs: what the item limits."""
        return [shm.target for shm in self.selected(selector) if shm.not_pod_shm is None]

    def passed_over(self, selector: PodVolumeSelector | None) -> list[tuple[str, LimitResult]]:
        """(pod, NotFound result) for each selected pod whose /dev/shm is not its own tmpfs
        (the node's, or a memory emptyDir): reported, never limited."""
        return [
            (
                self.label(shm.pod_uid),
                LimitResult(shm.target.mount_point, LimitState.NOT_FOUND, why),
            )
            for shm in self.selected(selector)
            if (why := shm.not_pod_shm) is not None
        ]

    def pod_of(self, target: Target) -> str | None:
        """namespace/name of the pod a target of `targets` belongs to; None for others."""
        return self._pod_of.get(_key(target))


def _key(target: Target) -> tuple[int | None, str]:
    return target.namespace_pid, target.mount_point

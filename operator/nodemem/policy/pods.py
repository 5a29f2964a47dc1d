"""Who the pods on this node are: the pluggable source behind OOM rules' pod criteria.

The cgroup path tells a process's pod UID and container ID; namespace, name, labels
and container names come from here. In a cluster the agent fills it from the API
(pods with `spec.nodeName` = this node); standalone it is empty or read from a file
(`kubectl get pods -o json` output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)  # container ID -> name


class PodDirectory:
    """Pods by UID. Replaced wholesale when the source refreshes."""

    def __init__(self, pods: list[PodInfo] | None = None) -> None:
        self._by_uid = {pod.uid: pod for pod in pods or ()}

    def get(self, uid: str | None) -> PodInfo | None:
        return self._by_uid.get(uid) if uid else None

    def __len__(self) -> int:
        return len(self._by_uid)


class PodsFileError(ValueError):
    pass


def pod_from_object(obj: Mapping[str, Any]) -> PodInfo:
    """A PodInfo from a Pod object as the API returns it (dict form)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    containers: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for container in status.get(key) or ():
            runtime_id = container.get("containerID") or ""
            # "containerd://<64 hex>": the cgroup path carries the bare ID.
            bare = runtime_id.partition("://")[2] or runtime_id
            if bare and container.get("name"):
                containers[bare] = container["name"]
    try:
        return PodInfo(
            uid=meta["uid"],
            namespace=meta.get("namespace", "default"),
            name=meta["name"],
            labels=dict(meta.get("labels") or {}),
            containers=containers,
        )
    except (KeyError, TypeError) as exc:
        raise PodsFileError(f"pod without metadata.{exc}") from None


def load_pods_file(text: str) -> PodDirectory:
    """Pods from a YAML/JSON document: a List (`kubectl get pods -o json`) or Pods."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise PodsFileError(f"not YAML or JSON: {exc}") from None
    pods: list[PodInfo] = []
    for doc in documents:
        if not isinstance(doc, dict):
            raise PodsFileError(f"expected a Pod or a List of Pods, found {type(doc).__name__}")
        items = doc.get("items") if doc.get("kind", "List").endswith("List") else [doc]
        for item in items or ():
            if not isinstance(item, dict) or item.get("kind", "Pod") != "Pod":
                raise PodsFileError(f"expected Pods, found {item!r:.60}")
            pods.append(pod_from_object(item))
    return PodDirectory(pods)

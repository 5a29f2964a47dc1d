"""Which pod a host path belongs to, from kubelet's volume layout."""

from __future__ import annotations

import re
from dataclasses import dataclass

# <kubelet root>/pods/<pod uid>/volumes/<plugin, "/" escaped as "~">/<volume name>
_VOLUME_PATH = re.compile(
    r"/pods/(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"/volumes/(?P<plugin>[^/]+)/(?P<volume>[^/]+)"
)


@dataclass(frozen=True)
class PodVolume:
    pod_uid: str
    plugin: str  # e.g. "kubernetes.io~empty-dir"
    volume: str


def pod_volume_from_path(path: str) -> PodVolume | None:
    match = _VOLUME_PATH.search(path)
    if match is None:
        return None
    return PodVolume(match["uid"], match["plugin"], match["volume"])

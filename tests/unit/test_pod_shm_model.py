"""podShm tmpfs items in the models: exactly one of path and podShm, pods required, no
pods.volume; the example validates; reports name the item podShm. (The API server's side of
the same rules: tests/kube/test_crd_server.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemem.api.manifest import PolicyError, validate_policy
from nodemem.api.policy import POD_SHM
from nodemem.policy.effective import effective_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pod-dev-shm.yaml"
GiB = 1 << 30


def _policy(*items: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "p"},
        "spec": {"tmpfs": list(items)},
    }


def test_the_example_validates_with_the_models() -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    policy = validate_policy(document)
    [item] = policy.spec.tmpfs
    assert item.pod_shm and item.path is None
    assert item.pods is not None and item.pods.namespace == "ml"
    [effective] = effective_policy([policy], {}, 16 * GiB).tmpfs
    assert (effective.path, effective.size_bytes) == (POD_SHM, 2 * GiB)


def test_pod_shm_items_and_path_items_mix_with_unique_paths() -> None:
    document = _policy(
        {"path": "/dev/shm", "size": "1Gi"},
        {"podShm": True, "pods": {}, "size": "256Mi"},
        {"podShm": True, "pods": {"namespace": "ml"}, "size": "1Gi"},
    )
    assert [i.name for i in validate_policy(document).spec.tmpfs] == [
        "/dev/shm",
        POD_SHM,
        POD_SHM,
    ]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"path": "/dev/shm", "podShm": True, "pods": {}, "size": "1Gi"}, "exactly one"),
        ({"size": "1Gi"}, "exactly one"),
        ({"podShm": True, "size": "1Gi"}, "podShm needs pods"),
        ({"podShm": True, "pods": {"volume": "dshm"}, "size": "1Gi"}, "pods.volume"),
    ],
    ids=["both", "neither", "no-pods", "volume"],
)
def test_invalid_pod_shm_items_are_refused(item: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        validate_policy(_policy(item))

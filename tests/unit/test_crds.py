"""The generated CRDs, the side that needs no API server: in step with the models and the
committed files, valid objects for Kubernetes 1.30-1.37, with the list types, int-or-string
quantities and bounds the server relies on. tests/kube/test_crd_server.py has the real
kube-apiserver judge them (accepted, rules, cost, status, `kubectl get` columns).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nodemem.api.crd import (
    POLICY_CRD_FILE,
    REPORT_CRD_FILE,
    policy_crd,
    render_crds,
    report_crd,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]


# --- the files -------------------------------------------------------------------------


def test_committed_crds_are_what_the_models_generate() -> None:
    rendered = render_crds()
    assert sorted(path.name for path in CRDS.glob("*")) == sorted(rendered)
    for name, text in rendered.items():
        assert (CRDS / name).read_bytes() == text.encode(), (
            f"crds/{name} drifted from the models: regenerate with `nodemem crds --output-dir crds`"
        )


def test_committed_files_parse_back_to_the_generated_crds() -> None:
    assert yaml.safe_load((CRDS / POLICY_CRD_FILE).read_text()) == policy_crd()
    assert yaml.safe_load((CRDS / REPORT_CRD_FILE).read_text()) == report_crd()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("crd", [policy_crd(), report_crd()], ids=["policy", "report"])
def test_crd_is_a_valid_object_for_kubernetes(crd: dict[str, Any], version: str) -> None:
    # kubernetes-validate falls back to an older schema for a version it lacks: insist on it.
    assert kubernetes_validate.validate(crd, version, strict=True) == version


@pytest.mark.parametrize(
    ("crd", "kind", "short_name"),
    [(policy_crd(), "NodeMemoryPolicy", "nmp"), (report_crd(), "NodeMemoryReport", "nmr")],
    ids=["policy", "report"],
)
def test_crd_identity(crd: dict[str, Any], kind: str, short_name: str) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.nodemem.dev"
    assert spec["group"] == "nodemem.dev"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["shortNames"] == [short_name]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_list_items_merge_by_their_keys() -> None:
    spec = _schema(policy_crd())["properties"]["spec"]["properties"]
    keys = {
        name: (spec[name]["x-kubernetes-list-type"], spec[name].get("x-kubernetes-list-map-keys"))
        for name in ("tmpfs", "cleanup", "oom")
    }
    assert keys == {
        # podShm items have no path, and a map key must be required: unique paths are a
        # CEL rule on the spec instead.
        "tmpfs": ("atomic", None),
        "cleanup": ("map", ["name"]),
        "oom": ("map", ["name"]),
    }
    assert spec["cleanup"]["items"]["properties"]["age"]["x-kubernetes-list-type"] == "set"
    for crd in (policy_crd(), report_crd()):
        conditions = _schema(crd)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_quantities_are_int_or_string_with_a_pattern() -> None:
    size = _schema(policy_crd())["properties"]["spec"]["properties"]["tmpfs"]["items"]
    size = size["properties"]["size"]
    assert size["x-kubernetes-int-or-string"] is True
    assert size["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert "type" not in size
    assert re.search(size["pattern"], "512Mi") and re.search(size["pattern"], "10%")


def test_simple_defaults_are_kept_in_the_spec_and_none_in_the_status() -> None:
    spec = _schema(policy_crd())["properties"]["spec"]["properties"]
    assert spec["priority"]["default"] == 0
    assert spec["dryRun"]["default"] is False
    assert spec["oom"]["items"]["properties"]["allowUnkillable"]["default"] is False
    for crd in (policy_crd(), report_crd()):
        assert "default" not in yaml.safe_dump(_schema(crd)["properties"]["status"])


def _integer_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node.get("type") == "integer":
        yield node
    for child in node.get("properties", {}).values():
        yield from _integer_nodes(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _integer_nodes(node[key])


@pytest.mark.parametrize("crd", [policy_crd(), report_crd()], ids=["policy", "report"])
def test_integer_bounds_survive_the_servers_float64(crd: dict[str, Any]) -> None:
    # The server holds minimum/maximum as float64 and refuses every value of an int64
    # field whose bound does not convert back (nrInodes' 2**63 - 1 did).
    nodes = list(_integer_nodes(_schema(crd)))
    assert nodes
    for node in nodes:
        assert node["format"] in ("int32", "int64")
        for bound in ("minimum", "maximum"):
            if bound in node:
                assert -(2**63) <= float(node[bound]) <= 2**63 - 1, node


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema

"""The CRDs' CEL rules, the side that needs no API server: the models refuse every broken
manifest in tests/data/broken (one per rule or constraint; tests/kube/test_crd_server.py
has the real kube-apiserver refuse each, naming its field), and they compare percents as
the CEL rule does, as doubles.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemem.api.manifest import PolicyError, validate_policy

BROKEN = sorted((Path(__file__).resolve().parents[1] / "data" / "broken").glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (\S+)$", re.MULTILINE)


@pytest.mark.parametrize("path", BROKEN, ids=[path.stem for path in BROKEN])
def test_broken_manifest_is_refused_by_the_models_too(path: Path) -> None:
    # The CRD must never be stricter than the models on what it refuses.
    text = path.read_text()
    [expected] = _EXPECT.findall(text)
    with pytest.raises(PolicyError) as caught:
        validate_policy(yaml.safe_load(text))
    # The models name the field, or the list or item it is in (duplicates, pods.volume).
    assert any(f"{path}: " in str(caught.value) for path in _with_parents(expected)), caught.value


def _with_parents(path: str) -> list[str]:
    """`a.b[1].c` -> `a.b[1].c`, `a.b[1]`, `a.b`, `a`."""
    paths = [path]
    while (cut := max(path.rfind("."), path.rfind("["))) > 0:
        path = path[:cut]
        paths.append(path)
    return paths


percents = st.builds(
    "{}{}%".format,
    st.from_regex(r"(0{0,2}[1-9][0-9]?|100)", fullmatch=True),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,20}", fullmatch=True)),
).filter(lambda p: 0 < Decimal(p[:-1]) <= 100)


@settings(max_examples=300, deadline=None)
@given(percents, percents)
def test_models_compare_percents_as_doubles(trigger: str, target: str) -> None:
    rule = {"name": "c", "paths": ["/x/y"], "schedule": "* * * * *"}
    manifest = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "p"},
        "spec": {"cleanup": [rule | {"whenUsageAbove": trigger, "targetUsage": target}]},
    }
    not_below = float(target[:-1]) >= float(trigger[:-1])
    try:
        validate_policy(manifest)
    except PolicyError as error:
        assert not_below, str(error)
        assert "targetUsage: must be lower than whenUsageAbove" in str(error)
    else:
        assert not not_below

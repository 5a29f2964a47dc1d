"""Property tests: malformed policies fail with field paths, valid ones round-trip.

Malformed specs are valid generated specs with one mutation that must make them
invalid; every message must then name a path that exists in the document (or, for a
field the user must add, whose parent exists), and nothing but PolicyError may escape.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Callable
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemem.agent.state_dir import NODE_LABELS_FILE, POLICIES_FILE, StateDir
from nodemem.api.manifest import (
    PolicyError,
    load_policies,
    load_policy_bytes,
    policy_to_manifest,
    validate_policy,
)

Manifest = dict[str, Any]
Draw = Callable[..., Any]

# --- valid manifests -------------------------------------------------------------------

dns_labels = st.from_regex(r"[a-z]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
dns_subdomains = st.lists(dns_labels, min_size=1, max_size=3).map(".".join)
path_segments = st.from_regex(r"[a-z0-9_*-][a-z0-9_.*-]{0,7}", fullmatch=True)
absolute_paths = st.lists(path_segments, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))
# A cleanup path's first directory is literal and something follows it (its base is never /).
cleanup_paths = st.tuples(
    st.from_regex(r"[a-z0-9_-][a-z0-9_.-]{0,7}", fullmatch=True),
    st.lists(path_segments, min_size=1, max_size=3),
).map(lambda t: "/" + "/".join([t[0], *t[1]]))
quantities = st.one_of(
    st.integers(min_value=1, max_value=2**40),
    st.builds(
        "{}{}".format,
        st.integers(min_value=1, max_value=4096),
        st.sampled_from(["", "k", "M", "G", "Ki", "Mi", "Gi", "Ti"]),
    ),
    st.sampled_from(["1.5Gi", "0.5Mi", "1e6", "2.5G"]),
)
percents = st.one_of(
    st.integers(min_value=1, max_value=100).map("{}%".format),
    st.sampled_from(["12.5%", "0.5%", "99.9%"]),
)
sizes = st.one_of(quantities, percents)
durations = st.one_of(
    st.builds(
        "{}{}".format,
        st.integers(min_value=1, max_value=10_000),
        st.sampled_from(["ms", "s", "m", "h"]),
    ),
    st.sampled_from(["1h30m", "2h45m30.5s", "1.5h", "24h"]),
)
cron_schedules = st.builds(
    "{} {} {} {} {}".format,
    st.sampled_from(["*", "*/5", "0", "15", "0-30/10", "5,35"]),
    st.sampled_from(["*", "3", "0-23/2", "*/6"]),
    st.sampled_from(["*", "1", "15", "L", "1-7"]),
    st.sampled_from(["*", "1-6", "JAN", "*/3"]),
    st.sampled_from(["*", "MON-FRI", "0", "SUN", "5#2"]),
)
regexes = st.sampled_from(["^java$", "postgres", "a+b*", r"\d+", "(foo|bar)", "kubepods/.*"])
label_keys = st.sampled_from(
    ["app", "role", "kubernetes.io/hostname", "topology.kubernetes.io/zone"]
)
label_values = st.from_regex(r"([a-z0-9]([-a-z0-9]{0,6}[a-z0-9])?)?", fullmatch=True)


@st.composite
def selector_requirements(draw: Draw) -> dict[str, Any]:
    operator = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    requirement: dict[str, Any] = {"key": draw(label_keys), "operator": operator}
    if operator in ("In", "NotIn"):
        requirement["values"] = draw(st.lists(label_values, min_size=1, max_size=3))
    return requirement


label_selectors = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": st.dictionaries(label_keys, label_values, max_size=3),
        "matchExpressions": st.lists(selector_requirements(), max_size=2),
    },
)
tmpfs_items = st.fixed_dictionaries(
    {"path": absolute_paths, "size": sizes},
    optional={
        "nrInodes": st.integers(min_value=1, max_value=10**9),
        "headroom": st.one_of(quantities, st.just(0)),
    },
)


@st.composite
def cleanup_rules(draw: Draw) -> dict[str, Any]:
    rule: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {
                "name": dns_labels,
                "paths": st.lists(cleanup_paths, min_size=1, max_size=3),
                "schedule": cron_schedules,
            },
            optional={
                "age": st.lists(
                    st.sampled_from(["atime", "mtime", "ctime"]), min_size=1, unique=True
                ),
                "exclude": st.lists(st.one_of(absolute_paths, path_segments), max_size=2),
                "removeEmptyDirs": st.booleans(),
            },
        )
    )
    condition = draw(st.sampled_from(["age", "usage", "both"]))
    if condition in ("age", "both"):
        rule["olderThan"] = draw(durations)
    if condition in ("usage", "both"):
        trigger = draw(st.integers(min_value=2, max_value=100))
        rule["whenUsageAbove"] = f"{trigger}%"
        if draw(st.booleans()):
            rule["targetUsage"] = f"{draw(st.integers(min_value=1, max_value=trigger - 1))}%"
    return rule


MATCH_CRITERIA: dict[str, st.SearchStrategy[Any]] = {
    "comm": regexes,
    "cmdline": regexes,
    "cgroup": regexes,
    "namespace": dns_labels,
    "labelSelector": label_selectors,
    "container": dns_labels,
    "qosClass": st.sampled_from(["Guaranteed", "Burstable", "BestEffort"]),
}


@st.composite
def oom_rules(draw: Draw) -> dict[str, Any]:
    criteria = draw(st.sets(st.sampled_from(sorted(MATCH_CRITERIA)), min_size=1, max_size=3))
    rule: dict[str, Any] = {
        "name": draw(dns_labels),
        "match": {key: draw(MATCH_CRITERIA[key]) for key in sorted(criteria)},
    }
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        rule |= {"oomScoreAdj": -1000, "allowUnkillable": True}
    else:
        rule["oomScoreAdj"] = draw(st.integers(min_value=-999, max_value=1000))
        if draw(st.booleans()):
            rule["allowUnkillable"] = draw(st.booleans())
    return rule


specs = st.fixed_dictionaries(
    {},
    optional={
        "nodeSelector": label_selectors,
        "priority": st.integers(min_value=-100, max_value=100),
        "dryRun": st.booleans(),
        "tmpfs": st.lists(tmpfs_items, max_size=3, unique_by=lambda item: item["path"]),
        "cleanup": st.lists(cleanup_rules(), max_size=3, unique_by=lambda rule: rule["name"]),
        "oom": st.lists(oom_rules(), max_size=3, unique_by=lambda rule: rule["name"]),
        "shmem": st.fixed_dictionaries({}, optional={"unaccountedThreshold": sizes}),
    },
)
manifests = st.builds(
    lambda name, generation, spec: {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name, **generation},
        "spec": spec,
    },
    dns_subdomains,
    st.fixed_dictionaries({}, optional={"generation": st.integers(min_value=1, max_value=10**6)}),
    specs,
)

# --- mutations that must make a manifest invalid ---------------------------------------

DEFAULT_ITEMS: dict[str, dict[str, Any]] = {
    "tmpfs": {"path": "/fuzz/default", "size": "1Gi"},
    "cleanup": {
        "name": "fuzz-default",
        "paths": ["/x/*"],
        "schedule": "* * * * *",
        "olderThan": "1h",
    },
    "oom": {"name": "fuzz-default", "match": {"comm": "x"}, "oomScoreAdj": 0},
}


def some_item(manifest: Manifest, draw: Draw, kind: str) -> dict[str, Any]:
    """An item of spec[kind] to break, added first when the list is empty."""
    items = manifest["spec"].setdefault(kind, [])
    if not items:
        items.append(copy.deepcopy(DEFAULT_ITEMS[kind]))
    item: dict[str, Any] = items[draw(st.integers(min_value=0, max_value=len(items) - 1))]
    return item


def wrong_type(manifest: Manifest, draw: Draw) -> None:
    field, bad_values = draw(
        st.sampled_from(
            [
                ("priority", ["5", 1.5, True, None, [1], {}]),
                ("dryRun", ["yes", 1, None, [], "true"]),
                ("tmpfs", [{}, "x", 5, None]),
                ("cleanup", [{"name": "x"}, "x", True]),
                ("oom", ["x", 1.5, None]),
                ("shmem", [[], "x", None, 5]),
                ("nodeSelector", [[], "app=x", None]),
            ]
        )
    )
    manifest["spec"][field] = draw(st.sampled_from(bad_values))


def wrong_item_type(manifest: Manifest, draw: Draw) -> None:
    kind, field, bad_values = draw(
        st.sampled_from(
            [
                ("tmpfs", "path", [5, None, [], True]),
                ("tmpfs", "size", [None, True, 1.5, [], {}]),
                ("tmpfs", "nrInodes", ["5", 1.5, True, -1, 0]),
                ("cleanup", "paths", ["/x/*", None, [5], {}]),
                ("cleanup", "removeEmptyDirs", ["no", 0, None]),
                ("cleanup", "exclude", ["*.lock", [None], [""]]),
                ("oom", "match", ["comm", [], None]),
                ("oom", "allowUnkillable", ["true", 1, None]),
            ]
        )
    )
    some_item(manifest, draw, kind)[field] = draw(st.sampled_from(bad_values))


def bad_quantity(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from(["0", 0, "0Gi", "-1Gi", "1.5", "12XB", "1 Gi", "200%", "0%", "1m"]))
    where = draw(st.sampled_from(["size", "headroom", "threshold"]))
    if where == "threshold":
        manifest["spec"]["shmem"] = {"unaccountedThreshold": bad}
    elif where == "size":
        some_item(manifest, draw, "tmpfs")["size"] = bad
    elif bad not in (0, "0", "0Gi"):  # a headroom of 0 is valid
        some_item(manifest, draw, "tmpfs")["headroom"] = bad
    else:
        some_item(manifest, draw, "tmpfs")["headroom"] = "-5Mi"


def bad_cron(manifest: Manifest, draw: Draw) -> None:
    some_item(manifest, draw, "cleanup")["schedule"] = draw(
        st.sampled_from(
            ["* * * *", "0 0 * * * *", "@daily", "61 * * * *", "* * 32 * *", "a b c d e", "", 5]
        )
    )


def bad_regex(manifest: Manifest, draw: Draw) -> None:
    field = draw(st.sampled_from(["comm", "cmdline", "cgroup"]))
    bad = draw(st.sampled_from(["(", "[a", "*x", "a{2,1}", "(?P<x>", "\\", 5]))
    some_item(manifest, draw, "oom")["match"][field] = bad


def bad_adj(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from([1001, -1001, 2**40, "-5", 1.0, None]))
    some_item(manifest, draw, "oom")["oomScoreAdj"] = bad


def unkillable_without_consent(manifest: Manifest, draw: Draw) -> None:
    rule = some_item(manifest, draw, "oom")
    rule["oomScoreAdj"] = -1000
    if draw(st.booleans()):
        rule.pop("allowUnkillable", None)
    else:
        rule["allowUnkillable"] = False


def target_not_below_trigger(manifest: Manifest, draw: Draw) -> None:
    rule = some_item(manifest, draw, "cleanup")
    rule["whenUsageAbove"] = "50%"
    rule["targetUsage"] = draw(st.sampled_from(["50%", "50.0%", "70%", "100%"]))


def target_without_trigger(manifest: Manifest, draw: Draw) -> None:
    rule = some_item(manifest, draw, "cleanup")
    rule.pop("whenUsageAbove", None)
    rule["olderThan"] = "1h"
    rule["targetUsage"] = "10%"


def parent_components(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from(["/run/../etc", "/..", "/a/b/..", "/../*"]))
    where = draw(st.sampled_from(["tmpfs", "paths", "exclude"]))
    if where == "tmpfs":
        some_item(manifest, draw, "tmpfs")["path"] = bad
    else:
        some_item(manifest, draw, "cleanup")[where] = [bad]


def relative_path(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from(["dev/shm", "*.log", "", "./x", "/a//b", "/a/./b"]))
    if draw(st.booleans()):
        some_item(manifest, draw, "tmpfs")["path"] = bad
    else:
        some_item(manifest, draw, "cleanup")["paths"] = [bad]


def unknown_field(manifest: Manifest, draw: Draw) -> None:
    spec = manifest["spec"]
    target = draw(
        st.sampled_from(["spec", "tmpfs", "cleanup", "oom", "match", "selector", "shmem"])
    )
    if target == "spec":
        container = spec
    elif target == "match":
        container = some_item(manifest, draw, "oom")["match"]
    elif target == "selector":
        container = spec.setdefault("nodeSelector", {})
    elif target == "shmem":
        container = spec.setdefault("shmem", {})
    else:
        container = some_item(manifest, draw, target)
    container[draw(st.sampled_from(["typo", "sizee", "olderthan", "Paths", "x-extra"]))] = 1


def missing_required(manifest: Manifest, draw: Draw) -> None:
    where = draw(
        st.sampled_from(
            [
                ("metadata",),
                ("spec",),
                ("metadata", "name"),
                ("tmpfs", "path"),
                ("tmpfs", "size"),
                ("cleanup", "name"),
                ("cleanup", "paths"),
                ("cleanup", "schedule"),
                ("oom", "name"),
                ("oom", "match"),
                ("oom", "oomScoreAdj"),
            ]
        )
    )
    if len(where) == 1:
        del manifest[where[0]]
    elif where[0] == "metadata":
        del manifest["metadata"]["name"]
    else:
        del some_item(manifest, draw, where[0])[where[1]]


def duplicate_item(manifest: Manifest, draw: Draw) -> None:
    kind = draw(st.sampled_from(["tmpfs", "cleanup", "oom"]))
    item = some_item(manifest, draw, kind)
    manifest["spec"][kind].append(copy.deepcopy(item))


def bad_name(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from(["", "UPPER", "-x", "a_b", "x" * 254, 5, None, "a..b"]))
    where = draw(st.sampled_from(["metadata", "cleanup", "oom", "namespace", "container"]))
    if where == "metadata":
        manifest["metadata"]["name"] = bad
    elif where in ("cleanup", "oom"):
        some_item(manifest, draw, where)["name"] = bad if bad != "x" * 254 else "x" * 64
    else:  # namespace and container are optional: null is no error there
        some_item(manifest, draw, "oom")["match"][where] = (
            bad if bad not in ("x" * 254, None) else "x" * 64
        )


def bad_duration(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from(["5d", "0s", "0", "-1h", 90, "1h ", "h1", "500ns", "1w", ""]))
    some_item(manifest, draw, "cleanup")["olderThan"] = bad


def bad_percent(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from(["0%", "101%", "80", "-5%", 80, "80 %", "1Gi"]))
    rule = some_item(manifest, draw, "cleanup")
    rule.pop("targetUsage", None)
    rule["whenUsageAbove"] = bad


def bad_age(manifest: Manifest, draw: Draw) -> None:
    bad = draw(st.sampled_from([[], ["birth"], ["mtime", "mtime"], "mtime", [None]]))
    some_item(manifest, draw, "cleanup")["age"] = bad


def no_condition(manifest: Manifest, draw: Draw) -> None:
    rule = some_item(manifest, draw, "cleanup")
    for field in ("olderThan", "whenUsageAbove", "targetUsage"):
        rule.pop(field, None)


def empty_match(manifest: Manifest, draw: Draw) -> None:
    some_item(manifest, draw, "oom")["match"] = {}


def bad_selector(manifest: Manifest, draw: Draw) -> None:
    bad = draw(
        st.sampled_from(
            [
                {"matchExpressions": [{"key": "a", "operator": "In"}]},
                {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
                {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
                {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]},
                {"matchExpressions": [{"operator": "Exists"}]},
                {"matchLabels": {"bad key": "x"}},
                {"matchLabels": {"app": "bad value"}},
                {"matchLabels": {"app": 5}},
                {"matchLabels": ["app"]},
            ]
        )
    )
    if draw(st.booleans()):
        manifest["spec"]["nodeSelector"] = bad
    else:
        some_item(manifest, draw, "oom")["match"]["labelSelector"] = bad


def bad_header(manifest: Manifest, draw: Draw) -> None:
    field, bad = draw(
        st.sampled_from(
            [("kind", "ConfigMap"), ("kind", None), ("apiVersion", "v1"), ("apiVersion", 1)]
        )
    )
    if bad is None:
        del manifest[field]
    else:
        manifest[field] = bad


MUTATIONS = [
    wrong_type,
    wrong_item_type,
    bad_quantity,
    bad_cron,
    bad_regex,
    bad_adj,
    unkillable_without_consent,
    target_not_below_trigger,
    target_without_trigger,
    parent_components,
    relative_path,
    unknown_field,
    missing_required,
    duplicate_item,
    bad_name,
    bad_duration,
    bad_percent,
    bad_age,
    no_condition,
    empty_match,
    bad_selector,
    bad_header,
]

# --- checking messages -----------------------------------------------------------------

_DOCUMENT_PREFIX = re.compile(r'document (\d+)(?: \(policy "(?:[^"\\]|\\.)*"\))?: ')
_HEADER_MESSAGES = ("kind is ", "apiVersion is ", "expected a NodeMemoryPolicy manifest", "YAML")
_PATH_TOKEN = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def path_tokens(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    position = 0
    while position < len(path):
        token = _PATH_TOKEN.match(path, position)
        assert token is not None, path
        name, index, quoted = token.groups()
        if name is not None:  # "a.b": a dot before every name but the first
            assert token[0].startswith(".") == (position > 0), path
        tokens.append(name if name is not None else int(index) if index else json.loads(quoted))
        position = token.end()
    return tokens


def assert_names_existing_path(message: str, documents: list[Any]) -> None:
    document = documents[0]
    prefixed = _DOCUMENT_PREFIX.match(message)
    if prefixed is not None:
        document = documents[int(prefixed[1]) - 1]
        message = message[prefixed.end() :]
        if message.startswith(_HEADER_MESSAGES):
            return
    # The path ends at the first ": " outside a quoted key (a key may itself hold ": ").
    end = 0
    while (token := _PATH_TOKEN.match(message, end)) is not None and token.end() > end:
        end = token.end()
    path, separator, text = message[:end], message[end : end + 2], message[end + 2 :]
    assert separator == ": " and text, message
    node = document
    tokens = path_tokens(path)
    assert tokens[0] in ("spec", "metadata", "kind", "apiVersion"), message
    for position, token in enumerate(tokens):
        if isinstance(token, int):
            assert isinstance(node, list) and token < len(node), message
        else:
            assert isinstance(node, dict), message
            if token not in node:  # a field to add: required, or needed by another field
                assert position == len(tokens) - 1, message
                return
        node = node[token]


def assert_rejected(text: str, documents: list[Any]) -> list[str]:
    try:
        load_policies(text)
    except PolicyError as error:
        assert error.messages
        for message in error.messages:
            assert_names_existing_path(message, documents)
        return error.messages
    raise AssertionError("a malformed manifest was accepted")


# --- properties ------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(manifests, st.sampled_from(MUTATIONS), st.booleans(), st.data())
def test_malformed_manifests_raise_policy_error_with_field_paths(
    manifest: Manifest,
    mutate: Callable[[Manifest, Draw], None],
    with_a_valid_neighbour: bool,
    data: st.DataObject,
) -> None:
    mutate(manifest, data.draw)
    documents: list[Any] = [manifest]
    if with_a_valid_neighbour:
        neighbour = copy.deepcopy(DEFAULT_ITEMS["tmpfs"])
        documents.insert(
            0,
            {
                "apiVersion": "nodemem.dev/v1alpha1",
                "kind": "NodeMemoryPolicy",
                "metadata": {"name": "zz-neighbour"},
                "spec": {"tmpfs": [neighbour]},
            },
        )
    messages = assert_rejected(yaml.safe_dump_all(documents), documents)
    if with_a_valid_neighbour:
        assert all(message.startswith("document 2") for message in messages), messages


@settings(max_examples=200, deadline=None)
@given(manifests)
def test_valid_manifests_load_and_round_trip(manifest: Manifest) -> None:
    [policy] = load_policies(yaml.safe_dump(manifest))
    saved = policy_to_manifest(policy)
    assert load_policies(yaml.safe_dump(saved)) == [policy]
    assert validate_policy(saved) == policy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def node_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            paths += node_paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            paths += node_paths(child, (*prefix, index))
    return paths


@settings(max_examples=200, deadline=None)
@given(manifests, json_values, st.data())
def test_any_replaced_value_gives_a_policy_or_policy_error(
    manifest: Manifest, value: Any, data: st.DataObject
) -> None:
    path = data.draw(st.sampled_from(node_paths(manifest)[1:]))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    try:
        validate_policy(manifest)
    except PolicyError as error:
        for message in error.messages:
            assert_names_existing_path(message, [manifest])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_policies_or_policy_error(text: str) -> None:
    try:
        load_policies(text)
    except PolicyError as error:
        assert all(
            message.startswith(("document ", "spec", "metadata")) for message in error.messages
        )


# --- random bytes ----------------------------------------------------------------------

_VALID = yaml.safe_dump(
    {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "p"},
        "spec": {"tmpfs": [{"path": "/dev/shm", "size": "1Gi"}]},
    }
).encode()


def _spliced(data: bytes, at: int, junk: bytes) -> bytes:
    at = at % (len(data) + 1)
    return data[:at] + junk + data[at:]


random_files = st.one_of(
    st.binary(max_size=512),
    st.builds(
        _spliced, st.just(_VALID), st.integers(min_value=0), st.binary(min_size=1, max_size=8)
    ),
)


@settings(max_examples=300, deadline=None)
@given(random_files)
def test_random_bytes_give_the_policy_loader_a_clear_error_or_policies(data: bytes) -> None:
    try:
        policies = load_policy_bytes(data)
    except PolicyError as exc:
        assert str(exc).strip()
    else:
        assert all(p.name for p in policies)


@settings(max_examples=150, deadline=None)
@given(random_files, random_files)
def test_random_bytes_in_the_state_dir_never_stop_the_agent(policies: bytes, labels: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir(tmp)
        (state.path / POLICIES_FILE).write_bytes(policies)
        (state.path / NODE_LABELS_FILE).write_bytes(labels)
        loaded = state.load_policies()
        assert loaded is None or all(p.name for p in loaded)
        found = state.load_node_labels()
        assert found is None or all(isinstance(v, str) for v in found.values())
        # whatever was unusable is set aside, so the next start is clean
        left = {p.name for p in state.path.iterdir()}
        assert (POLICIES_FILE in left) == (loaded is not None)
        assert (NODE_LABELS_FILE in left) == (found is not None)

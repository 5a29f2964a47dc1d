"""The NodeMemoryPolicy model: field types, constraints and error paths."""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from typing import Any

import pytest

from nodemem.api.duration import Duration, parse_duration, parse_duration_ns
from nodemem.api.manifest import PolicyError, validate_policy
from nodemem.api.policy import NodeMemoryPolicy, Regex
from nodemem.api.selector import LabelSelector

BASE: dict[str, Any] = {
    "apiVersion": "nodemem.dev/v1alpha1",
    "kind": "NodeMemoryPolicy",
    "metadata": {"name": "base"},
    "spec": {
        "tmpfs": [{"path": "/dev/shm", "size": "1Gi"}],
        "cleanup": [
            {
                "name": "logs",
                "paths": ["/dev/shm/*.log"],
                "schedule": "0 3 * * *",
                "olderThan": "24h",
            }
        ],
        "oom": [{"name": "db", "match": {"comm": "^postgres$"}, "oomScoreAdj": -500}],
    },
}


def policy_with(**spec_changes: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(BASE)
    manifest["spec"].update(spec_changes)
    return manifest


def errors_of(manifest: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        validate_policy(manifest)
    return caught.value.messages


def cleanup(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "paths": ["/dev/shm/*"], "schedule": "* * * * *", **fields}


def oom(**fields: Any) -> dict[str, Any]:
    return {"name": "o", "match": {"comm": "x"}, "oomScoreAdj": 0, **fields}


def test_base_policy_loads_with_defaults() -> None:
    policy = validate_policy(BASE)
    assert policy.name == "base"
    assert policy.generation == 1
    assert policy.spec.priority == 0
    assert policy.spec.dry_run is False
    assert policy.spec.node_selector == LabelSelector()
    assert policy.spec.cleanup[0].age == ["mtime"]
    assert policy.spec.cleanup[0].older_than == Duration(timedelta(hours=24), "24h")
    assert policy.spec.shmem.unaccounted_threshold is None
    assert policy.spec.oom[0].allow_unkillable is False


def test_python_names_work_too() -> None:
    policy = NodeMemoryPolicy.model_validate(
        {"metadata": {"name": "p"}, "spec": {"dry_run": True, "node_selector": {}}}
    )
    assert policy.spec.dry_run is True


def test_metadata_extra_keys_are_ignored_and_name_is_checked() -> None:
    manifest = copy.deepcopy(BASE)
    manifest["metadata"] |= {"uid": "1234", "labels": {"a": "b"}, "generation": 7}
    assert validate_policy(manifest).generation == 7
    manifest["metadata"]["name"] = "Bad_Name"
    [message] = errors_of(manifest)
    assert message.startswith("metadata.name: String should match pattern")
    del manifest["metadata"]["name"]
    assert errors_of(manifest) == ["metadata.name: required field is missing"]


def test_status_from_the_api_server_is_ignored() -> None:
    manifest = copy.deepcopy(BASE) | {"status": {"observedGeneration": 3}}
    assert validate_policy(manifest).name == "base"


def test_unknown_spec_field_is_an_error() -> None:
    assert errors_of(policy_with(dryrun=True)) == ["spec.dryrun: unknown field"]


def test_types_are_strict() -> None:
    assert errors_of(policy_with(priority="5")) == [
        'spec.priority: Input should be a valid integer, found "5"'
    ]
    assert errors_of(policy_with(dryRun="yes")) == [
        'spec.dryRun: Input should be a valid boolean, found "yes"'
    ]
    assert errors_of(policy_with(tmpfs={"path": "/x"})) == [
        "spec.tmpfs: expected a list, found a mapping"
    ]


# --- tmpfs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"path": "/dev/shm", "size": 0}, "spec.tmpfs[0].size: must be greater than 0"),
        ({"path": "/dev/shm", "size": "0Mi"}, "spec.tmpfs[0].size: must be greater than 0"),
        ({"path": "/dev/shm", "size": "0%"}, "spec.tmpfs[0].size: invalid percent"),
        ({"path": "/dev/shm", "size": "1.5"}, "spec.tmpfs[0].size: invalid quantity"),
        ({"path": "/dev/shm", "size": "lots"}, "spec.tmpfs[0].size: invalid quantity"),
        ({"path": "/dev/shm"}, "spec.tmpfs[0].size: required field is missing"),
        ({"path": "dev/shm", "size": 1}, "spec.tmpfs[0].path: 'dev/shm' is not an absolute"),
        ({"path": "/run/../etc", "size": 1}, "spec.tmpfs[0].path: '/run/../etc' has a '..'"),
        ({"path": "/run//x", "size": 1}, "spec.tmpfs[0].path: '/run//x' is not normalised"),
        ({"path": "/run/x/", "size": 1}, "spec.tmpfs[0].path: '/run/x/' is not normalised"),
        ({"path": "/x", "size": 1, "nrInodes": 0}, "spec.tmpfs[0].nrInodes: Input should be"),
        ({"path": "/x", "size": 1, "headroom": "-1"}, "spec.tmpfs[0].headroom: invalid quantity"),
    ],
)
def test_tmpfs_errors(item: dict[str, Any], expected: str) -> None:
    [message] = errors_of(policy_with(tmpfs=[item]))
    assert message.startswith(expected), message


def test_tmpfs_fields() -> None:
    items = [
        {"path": "/run/user/*", "size": "10%", "nrInodes": 100000, "headroom": "64Mi"},
        {"path": "/dev/shm", "size": 1048576},
    ]
    glob, shm = validate_policy(policy_with(tmpfs=items)).spec.tmpfs
    assert glob.size.percent == 10
    assert glob.nr_inodes == 100000
    assert glob.headroom is not None and glob.headroom.bytes == 64 * 2**20
    assert shm.size.bytes == 2**20


def test_lists_are_capped_like_the_crd_caps_them() -> None:
    items = [{"path": f"/m/{i}", "size": 1} for i in range(65)]
    (message,) = errors_of(policy_with(tmpfs=items))
    assert message.startswith("spec.tmpfs: List should have at most 64 items")
    validate_policy(policy_with(tmpfs=items[:64]))
    globs = [f"/m/{i}/*" for i in range(65)]
    assert errors_of(policy_with(cleanup=[cleanup(paths=globs)]))[0].startswith(
        "spec.cleanup[0].paths: List should have at most 64 items"
    )
    assert errors_of(policy_with(cleanup=[cleanup(exclude=globs)]))[0].startswith(
        "spec.cleanup[0].exclude: List should have at most 64 items"
    )


def test_tmpfs_paths_are_unique() -> None:
    items = [
        {"path": "/dev/shm", "size": 1},
        {"path": "/x", "size": 1},
        {"path": "/dev/shm", "size": 2},
    ]
    assert errors_of(policy_with(tmpfs=items)) == [
        "spec.tmpfs: duplicate path: '/dev/shm' appears in items [0] and [2]"
    ]


# --- cleanup ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("0 0 * * * *", "expected 5 fields (minute hour day-of-month month day-of-week), found 6"),
        ("* * * *", "found 4"),
        ("@daily", "nicknames such as @daily are not supported"),
        ("@reboot", "nicknames"),
        ("61 * * * *", "bad minute"),
        ("* 24 * * *", "bad hour"),
        ("* * 32 * *", "bad day-of-month"),
        ("* * 30 2 *", "bad day-of-month"),  # February never has a 30th
        ("* * * 13 *", "bad month"),
        ("* * * * 8", "bad day-of-week"),
        ("*/0 * * * *", "bad minute"),
        ("5-1 * * * *", "bad minute"),
        ("* * * * 5L/2", "invalid schedule"),
        ("", "found 0"),
    ],
)
def test_bad_schedules(schedule: str, expected: str) -> None:
    [message] = errors_of(policy_with(cleanup=[cleanup(schedule=schedule, olderThan="1h")]))
    assert message.startswith("spec.cleanup[0].schedule: invalid schedule"), message
    assert expected in message


@pytest.mark.parametrize(
    "schedule",
    ["*/5 * * * *", "0 3 * * MON-FRI", "0 0 1 JAN *", "0 0 L * *", "0 0 * * 5#2", " 0 3 * * * "],
)
def test_good_schedules(schedule: str) -> None:
    validate_policy(policy_with(cleanup=[cleanup(schedule=schedule, olderThan="1h")]))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "spec.cleanup[0]: needs olderThan or whenUsageAbove"),
        ({"olderThan": "1h", "paths": []}, "spec.cleanup[0].paths: List should have at least 1"),
        ({"olderThan": "1h", "paths": ["*.log"]}, "spec.cleanup[0].paths[0]: '*.log' is not an"),
        ({"olderThan": "1h", "paths": ["/a/../b"]}, "spec.cleanup[0].paths[0]: '/a/../b' has a"),
        ({"olderThan": "1h", "exclude": ["../x"]}, "spec.cleanup[0].exclude[0]: '../x' has a '..'"),
        ({"olderThan": "1h", "exclude": [""]}, "spec.cleanup[0].exclude[0]: must not be empty"),
        ({"olderThan": "5d"}, "spec.cleanup[0].olderThan: invalid duration '5d'"),
        ({"olderThan": 90}, "spec.cleanup[0].olderThan: expected a duration such as 90s"),
        ({"olderThan": "0s"}, "spec.cleanup[0].olderThan: duration '0s' must be at least 1us"),
        ({"olderThan": "-1h"}, "spec.cleanup[0].olderThan: invalid duration"),
        ({"olderThan": "1h", "age": []}, "spec.cleanup[0].age: List should have at least 1"),
        ({"olderThan": "1h", "age": ["mtime", "mtime"]}, "spec.cleanup[0].age: lists a timestamp"),
        ({"olderThan": "1h", "age": ["birth"]}, "spec.cleanup[0].age[0]: Input should be 'atime'"),
        ({"olderThan": "1h", "targetUsage": "50%"}, "spec.cleanup[0].targetUsage: needs whenUsage"),
        ({"whenUsageAbove": "80"}, "spec.cleanup[0].whenUsageAbove: invalid percent '80'"),
        ({"whenUsageAbove": 80}, "spec.cleanup[0].whenUsageAbove: expected a percent"),
        (
            {"whenUsageAbove": "80%", "targetUsage": "80%"},
            "spec.cleanup[0].targetUsage: must be lower than whenUsageAbove (80%)",
        ),
        ({"olderThan": "1h", "name": "Logs"}, "spec.cleanup[0].name: String should match"),
    ],
)
def test_cleanup_errors(fields: dict[str, Any], expected: str) -> None:
    [message] = errors_of(policy_with(cleanup=[cleanup(**fields)]))
    assert message.startswith(expected), message


def test_cleanup_fields() -> None:
    rule = cleanup(
        olderThan="1h30m",
        age=["atime", "mtime"],
        whenUsageAbove="80%",
        targetUsage="60.5%",
        exclude=["*.lock", "/dev/shm/keep/*"],
        removeEmptyDirs=True,
    )
    [parsed] = validate_policy(policy_with(cleanup=[rule])).spec.cleanup
    assert parsed.older_than is not None and parsed.older_than.delta == timedelta(minutes=90)
    assert parsed.age == ["atime", "mtime"]
    assert parsed.when_usage_above is not None and parsed.when_usage_above.value == 80
    assert parsed.target_usage is not None and str(parsed.target_usage) == "60.5%"
    assert parsed.exclude == ["*.lock", "/dev/shm/keep/*"]
    assert parsed.remove_empty_dirs is True


def test_usage_watermark_alone_is_a_condition() -> None:
    validate_policy(policy_with(cleanup=[cleanup(whenUsageAbove="90%")]))


def test_cleanup_names_are_unique() -> None:
    rules = [cleanup(olderThan="1h"), cleanup(olderThan="2h")]
    assert errors_of(policy_with(cleanup=rules)) == [
        "spec.cleanup: duplicate name: 'c' appears in items [0] and [1]"
    ]


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("0", 0),
        ("90s", 90 * 10**9),
        ("1h30m", 5400 * 10**9),
        ("500ms", 500 * 10**6),
        ("24h", 86400 * 10**9),
        ("2h45m30.5s", (9930 * 10**9) + 5 * 10**8),
        ("1.5h", 5400 * 10**9),
        (".5s", 5 * 10**8),
        ("1.s", 10**9),
        ("10us", 10_000),
        ("10µs", 10_000),
        ("10μs", 10_000),
        ("7ns", 7),
        ("1m1m", 120 * 10**9),
        ("2562047h", 2562047 * 3600 * 10**9),
    ],
)
def test_go_durations(text: str, nanoseconds: int) -> None:
    assert parse_duration_ns(text) == nanoseconds
    assert parse_duration(text) == timedelta(microseconds=nanoseconds // 1000)


@pytest.mark.parametrize(
    "text", ["", "1", "1d", "1 h", "h", "1h 30m", "-1h", "+1h", "1.5.5s", "1H", "9999999h", "1e3s"]
)
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ns(text)


def test_duration_type_keeps_its_text_and_must_be_positive() -> None:
    assert Duration.parse("1h30m") == Duration(timedelta(minutes=90), "1h30m")
    assert str(Duration.parse("90s")) == "90s"
    for zero in ("0", "0s", "500ns"):
        with pytest.raises(ValueError, match="at least 1us"):
            Duration.parse(zero)


# --- oom -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"match": {"comm": "("}},
            "spec.oom[0].match.comm: invalid regex (RE2 syntax): missing ): (",
        ),
        (
            {"match": {"cmdline": "[a"}},
            "spec.oom[0].match.cmdline: invalid regex (RE2 syntax): missing ]: [a",
        ),
        (
            {"match": {"cgroup": "*x"}},
            "spec.oom[0].match.cgroup: invalid regex (RE2 syntax): no argument for repetition",
        ),
        ({"match": {"comm": 5}}, "spec.oom[0].match.comm: expected a regular expression string"),
        ({"match": {}}, "spec.oom[0].match: needs at least one of comm, cmdline"),
        ({"match": {"qosClass": "Best"}}, "spec.oom[0].match.qosClass: Input should be"),
        ({"match": {"namespace": "Kube_System"}}, "spec.oom[0].match.namespace: String should"),
        ({"match": {"pod": "x"}}, "spec.oom[0].match.pod: unknown field"),
        ({"oomScoreAdj": 1001}, "spec.oom[0].oomScoreAdj: Input should be less than or equal"),
        ({"oomScoreAdj": -1001}, "spec.oom[0].oomScoreAdj: Input should be greater than or"),
        ({"oomScoreAdj": "5"}, "spec.oom[0].oomScoreAdj: Input should be a valid integer"),
        ({"oomScoreAdj": -1000}, "spec.oom[0].oomScoreAdj: -1000 makes processes unkillable"),
        (
            {"oomScoreAdj": -1000, "allowUnkillable": False},
            "spec.oom[0].oomScoreAdj: -1000 makes processes unkillable",
        ),
    ],
)
def test_oom_errors(fields: dict[str, Any], expected: str) -> None:
    [message] = errors_of(policy_with(oom=[oom(**fields)]))
    assert message.startswith(expected), message


def test_oom_fields_and_compiled_regexes() -> None:
    rule = oom(
        match={
            "comm": "^java$",
            "cmdline": "spark",
            "cgroup": "kubepods",
            "namespace": "batch",
            "labelSelector": {"matchLabels": {"app": "etl"}},
            "container": "worker",
            "qosClass": "BestEffort",
        },
        oomScoreAdj=-1000,
        allowUnkillable=True,
    )
    [parsed] = validate_policy(policy_with(oom=[rule])).spec.oom
    assert parsed.oom_score_adj == -1000
    assert parsed.match.comm is not None
    assert parsed.match.comm.search("java")
    assert not parsed.match.comm.search("javac")
    assert parsed.match.comm.text == "^java$"
    assert parsed.match.label_selector is not None
    assert parsed.match.label_selector.matches({"app": "etl"})
    assert parsed.match.qos_class == "BestEffort"


def test_regex_type() -> None:
    assert Regex.parse("a+") == Regex.parse("a+")
    assert Regex.parse("a+") != Regex.parse("a*")
    assert str(Regex.parse("a+")) == "a+"
    with pytest.raises(ValueError, match="invalid regex"):
        Regex.parse("a{2,1}")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape sequence: \\1"),  # backreference
        ("(?=x)", "invalid perl operator: (?="),  # lookahead
        ("a++", "bad repetition operator: ++"),  # possessive
        ("a{1001}", "invalid repetition size: {1001}"),
    ],
)
def test_patterns_re2_cannot_compile_are_refused_with_the_field_named(
    pattern: str, reason: str
) -> None:
    [message] = errors_of(policy_with(oom=[oom(match={"cmdline": pattern})]))
    assert message == f"spec.oom[0].match.cmdline: invalid regex (RE2 syntax): {reason}"


def test_a_regex_longer_than_the_crd_allows_is_refused() -> None:
    [message] = errors_of(policy_with(oom=[oom(match={"comm": "a" * 1025})]))
    assert message == "spec.oom[0].match.comm: longer than 1024 characters"


def test_catastrophic_backtracking_pattern_matches_in_linear_time() -> None:
    """The pattern of the audit: with Python's re, 40 a's and a '!' take minutes."""
    [rule] = validate_policy(policy_with(oom=[oom(match={"cmdline": "^m-x(a+)+$"})])).spec.oom
    assert rule.match.cmdline is not None
    hostile = "m-x" + "a" * 100_000 + "!"
    started = time.process_time()
    assert not rule.match.cmdline.search(hostile)
    assert rule.match.cmdline.search("m-x" + "a" * 100_000)
    # re needs 2**40 steps for 40 a's; RE2 is linear: 100,000 a's in milliseconds. The
    # bound is 1,000 times what it takes, so that a loaded machine never fails it.
    assert time.process_time() - started < 5.0


def test_oom_names_are_unique() -> None:
    assert errors_of(policy_with(oom=[oom(), oom(oomScoreAdj=5)])) == [
        "spec.oom: duplicate name: 'o' appears in items [0] and [1]"
    ]


def test_all_errors_are_reported_together() -> None:
    manifest = policy_with(
        priority="high",
        tmpfs=[{"path": "rel", "size": 0}],
        oom=[oom(match={"comm": "("}, oomScoreAdj=2000)],
    )
    assert [message.split(":")[0] for message in errors_of(manifest)] == [
        "spec.priority",
        "spec.tmpfs[0].path",
        "spec.tmpfs[0].size",
        "spec.oom[0].match.comm",
        "spec.oom[0].oomScoreAdj",
    ]


def test_shmem_threshold() -> None:
    policy = validate_policy(policy_with(shmem={"unaccountedThreshold": "5%"}))
    assert policy.spec.shmem.unaccounted_threshold is not None
    assert policy.spec.shmem.unaccounted_threshold.resolve(1000) == 50
    [message] = errors_of(policy_with(shmem={"unaccountedThreshold": "5GB"}))
    assert message.startswith("spec.shmem.unaccountedThreshold: invalid quantity '5GB'")


# --- label selectors -------------------------------------------------------------------


def selector(**fields: Any) -> LabelSelector:
    return LabelSelector.model_validate(fields)


@pytest.mark.parametrize(
    ("fields", "labels", "expected"),
    [
        ({}, {}, True),
        ({}, {"any": "thing"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchLabels": {"a": "1"}}, {}, False),
        ({"matchLabels": {"a": ""}}, {}, False),
        ({"matchLabels": {"a": ""}}, {"a": ""}, True),
        ({"matchLabels": {"a": "1", "b": "2"}}, {"a": "1"}, False),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
            {"a": "2"},
            True,
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]},
            {"a": "3"},
            False,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
            {"a": "2"},
            True,
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
            {"a": "1"},
            False,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
        (
            {
                "matchLabels": {"zone": "a"},
                "matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}],
            },
            {"zone": "a", "gpu": "yes"},
            False,
        ),
    ],
)
def test_label_selector_semantics(
    fields: dict[str, Any], labels: dict[str, str], expected: bool
) -> None:
    assert selector(**fields).matches(labels) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ({"key": "a", "operator": "In"}, "matchExpressions[0].values: operator In needs at least"),
        ({"key": "a", "operator": "NotIn", "values": []}, "values: operator NotIn needs at least"),
        ({"key": "a", "operator": "Exists", "values": ["x"]}, "values: operator Exists takes no"),
        ({"key": "a", "operator": "DoesNotExist", "values": ["x"]}, "values: operator DoesNot"),
        ({"key": "a", "operator": "Equals", "values": ["x"]}, "operator: Input should be 'In'"),
        ({"key": "-a", "operator": "Exists"}, "key: invalid label key '-a'"),
        ({"key": "a", "operator": "In", "values": ["b c"]}, "values[0]: invalid label value"),
    ],
)
def test_label_selector_validation(expression: dict[str, Any], expected: str) -> None:
    manifest = policy_with(nodeSelector={"matchExpressions": [expression]})
    [message] = errors_of(manifest)
    assert message.startswith("spec.nodeSelector.matchExpressions[0]."), message
    assert expected in message


@pytest.mark.parametrize(
    "key", ["app", "app.kubernetes.io/name", "node-role.kubernetes.io/worker", "a_b.c-d", "x" * 63]
)
def test_valid_label_keys(key: str) -> None:
    assert selector(matchLabels={key: "v"}).matches({key: "v"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Bad.Prefix/app", "v"),
        ("/app", "v"),
        ("app/", "v"),
        ("x" * 64, "v"),
        ("app", "-v"),
        ("a", "x" * 64),
    ],
)
def test_invalid_labels_name_the_key(key: str, value: str) -> None:
    [message] = errors_of(policy_with(nodeSelector={"matchLabels": {key: value}}))
    prefix = "spec.nodeSelector.matchLabels"
    assert message.startswith(prefix), message
    assert "invalid label" in message

"""Loading NodeMemoryPolicy manifests from YAML text, and writing them back."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from nodemem.api.manifest import (
    MAX_MANIFEST_BYTES,
    PolicyError,
    load_policies,
    load_policy_bytes,
    policy_to_manifest,
    validate_policy,
)

HEADER = "apiVersion: nodemem.dev/v1alpha1\nkind: NodeMemoryPolicy\n"


def manifest(name: str, spec: str = "{}") -> str:
    return f"{HEADER}metadata: {{name: {name}}}\nspec: {spec}\n"


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policies(text)
    assert str(caught.value) == "\n".join(caught.value.messages)
    return caught.value.messages


def test_one_document() -> None:
    [policy] = load_policies(manifest("one", "{priority: 3}"))
    assert (policy.name, policy.spec.priority) == ("one", 3)


def test_several_documents_and_empty_ones_skipped() -> None:
    text = "---\n" + manifest("a") + "---\n---\n# only a comment\n---\n" + manifest("b") + "---\n"
    assert [policy.name for policy in load_policies(text)] == ["a", "b"]


def test_empty_text_has_no_policies() -> None:
    assert load_policies("") == []
    assert load_policies("---\n# nothing\n") == []


def test_wrong_kind_and_version_are_named() -> None:
    text = "\n---\n".join(
        [
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}",
            "apiVersion: nodemem.dev/v1beta9\nkind: NodeMemoryPolicy\nmetadata: {name: y}",
            "metadata: {name: z}",
            "kind: NodeMemoryPolicy\nmetadata: {name: z}",
            "- a list",
            "just a string",
            manifest("ok"),
        ]
    )
    assert errors_of(text) == [
        'document 1: kind is "ConfigMap", expected NodeMemoryPolicy',
        'document 2: apiVersion is "nodemem.dev/v1beta9", expected nodemem.dev/v1alpha1',
        "document 3: kind is missing, expected NodeMemoryPolicy",
        "document 4: apiVersion is missing, expected nodemem.dev/v1alpha1",
        "document 5: expected a NodeMemoryPolicy manifest (a mapping), found a list",
        'document 6: expected a NodeMemoryPolicy manifest (a mapping), found "just a string"',
    ]


def test_single_document_errors_are_bare_field_paths() -> None:
    text = manifest("p", "{cleanup: [{name: c, paths: [/x/y], schedule: '* * *', olderThan: 1h}]}")
    assert errors_of(text) == [
        "spec.cleanup[0].schedule: invalid schedule '* * *': expected 5 fields "
        "(minute hour day-of-month month day-of-week), found 3"
    ]


def test_multi_document_errors_name_the_document_and_policy() -> None:
    text = "---\n".join(
        [
            manifest("good"),
            manifest("bad", "{tmpfs: [{path: /dev/shm, size: 0}], priority: x}"),
            manifest("worse", "{oom: [{name: o, match: {comm: '('}, oomScoreAdj: 0}]}"),
        ]
    )
    assert errors_of(text) == [
        'document 2 (policy "bad"): spec.priority: Input should be a valid integer, found "x"',
        'document 2 (policy "bad"): spec.tmpfs[0].size: must be greater than 0 '
        "(size 0 would mean unlimited)",
        'document 3 (policy "worse"): spec.oom[0].match.comm: invalid regex (RE2 syntax): '
        "missing ): (",
    ]


def test_duplicate_names_across_documents() -> None:
    text = "---\n".join([manifest("a"), manifest("b"), manifest("a", "{priority: 9}")])
    assert errors_of(text) == ['document 3 (policy "a"): metadata.name: duplicate of document 1']


def test_yaml_syntax_error_has_its_line() -> None:
    text = manifest("a") + "---\n" + HEADER + "metadata:\n  name: b\n spec: [\n"
    [message] = errors_of(text)
    assert message.startswith("document 2: YAML syntax error at line 10, column 2: "), message


def test_yaml_errors_come_after_earlier_documents_errors() -> None:
    text = manifest("a", "{priority: x}") + "---\nkey: [unclosed\n"
    messages = errors_of(text)
    assert messages[0].startswith("spec.priority: ")
    assert messages[1].startswith("document 2: YAML syntax error at line 7")


def test_yaml_reader_error() -> None:
    [message] = errors_of("kind: \x07")
    assert message.startswith("document 1: YAML error: unacceptable character")
    assert "\n" not in message


def test_validate_policy_from_an_api_object() -> None:
    body = yaml.safe_load(manifest("api", "{dryRun: true}"))
    body["metadata"] |= {"resourceVersion": "42", "generation": 4, "managedFields": []}
    body["status"] = {"observedGeneration": 3, "conditions": []}
    policy = validate_policy(body)
    assert (policy.name, policy.generation, policy.spec.dry_run) == ("api", 4, True)
    with pytest.raises(PolicyError, match=r'^kind: expected NodeMemoryPolicy, found "Pod"$'):
        validate_policy({"apiVersion": "v1", "kind": "Pod"})


FULL = HEADER + textwrap.dedent(
    """\
    metadata:
      name: full
      generation: 5
      labels: {team: infra}
    spec:
      nodeSelector:
        matchLabels: {node-role.kubernetes.io/worker: ""}
        matchExpressions:
          - {key: gpu, operator: DoesNotExist}
      priority: 10
      dryRun: true
      tmpfs:
        - {path: /dev/shm, size: 10%, headroom: 64Mi}
        - {path: /run/user/*, size: 1073741824, nrInodes: 50000}
      cleanup:
        - name: stale-logs
          paths: [/dev/shm/*.log]
          schedule: "*/15 * * * *"
          olderThan: 2h45m30.5s
          age: [atime, mtime]
          whenUsageAbove: 80%
          targetUsage: 60%
          exclude: ["*.lock"]
          removeEmptyDirs: true
      oom:
        - name: keep-db
          match:
            comm: ^postgres$
            labelSelector: {matchLabels: {app: db}}
            qosClass: Guaranteed
          oomScoreAdj: -1000
          allowUnkillable: true
        - name: batch-first
          match: {namespace: batch}
          oomScoreAdj: 1000
      shmem: {unaccountedThreshold: 1.5Gi}
    """
)


def test_policy_to_manifest_round_trips_as_written() -> None:
    [policy] = load_policies(FULL)
    saved = policy_to_manifest(policy)
    assert saved["apiVersion"] == "nodemem.dev/v1alpha1"
    assert saved["kind"] == "NodeMemoryPolicy"
    assert saved["metadata"] == {"name": "full", "generation": 5}
    spec = saved["spec"]
    assert spec["tmpfs"][0] == {"path": "/dev/shm", "size": "10%", "headroom": "64Mi"}
    assert spec["tmpfs"][1]["size"] == 1073741824
    assert spec["cleanup"][0]["olderThan"] == "2h45m30.5s"
    assert spec["oom"][0]["match"]["comm"] == "^postgres$"
    assert spec["oom"][1] == {
        "name": "batch-first",
        "match": {"namespace": "batch"},
        "oomScoreAdj": 1000,
    }
    assert spec["shmem"] == {"unaccountedThreshold": "1.5Gi"}
    assert load_policies(yaml.safe_dump(saved)) == [policy]


def test_defaults_are_left_out() -> None:
    [policy] = load_policies(manifest("min", "{tmpfs: [{path: /dev/shm, size: 1Gi}]}"))
    assert policy_to_manifest(policy)["spec"] == {"tmpfs": [{"path": "/dev/shm", "size": "1Gi"}]}


@pytest.mark.parametrize("text", ["[" * 5000, "{a: " * 5000, "- " * 5000])
def test_deeply_nested_yaml_is_a_policy_error(text: str) -> None:
    [message] = errors_of(text)
    # libyaml stops at depth 1000; the pure-Python parser recurses until Python stops it.
    assert message.startswith("document 1: YAML"), message
    assert "nest" in message, message


def test_a_key_given_twice_is_refused_with_its_line() -> None:
    text = manifest("dup", "\n  priority: 1\n  tmpfs: []\n  priority: 100\n")
    assert errors_of(text) == [
        "document 1: YAML syntax error at line 7, column 3: while constructing a mapping; "
        'found duplicate key "priority"'
    ]


def test_a_key_given_twice_deep_inside_an_item_is_refused() -> None:
    spec = "{tmpfs: [{path: /dev/shm, size: 1Gi, size: 10Gi}]}"
    [message] = errors_of(manifest("dup", spec))
    assert message.endswith('found duplicate key "size"'), message


def test_merge_keys_may_still_be_overridden() -> None:
    text = manifest("merge", "{tmpfs: [{<<: {path: /dev/shm, size: 1Gi}, size: 2Gi}]}")
    [policy] = load_policies(text)
    assert policy.spec.tmpfs[0].size.text == "2Gi"


def test_bytes_that_are_not_utf8_are_a_policy_error_naming_where() -> None:
    data = manifest("latin", "{priority: 3}").encode() + b"# caf\xe9\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_bytes(data)
    assert caught.value.messages == [
        "not valid UTF-8: byte 0xe9 at line 5, column 6 (invalid continuation byte)"
    ]
    assert [p.name for p in load_policy_bytes(manifest("ok").encode())] == ["ok"]


def test_a_manifest_larger_than_etcd_takes_is_refused_before_parsing() -> None:
    comment = "# " + "x" * 1000 + "\n"
    text = manifest("big") + comment * (MAX_MANIFEST_BYTES // len(comment) + 1)
    assert errors_of(text) == [f"larger than {MAX_MANIFEST_BYTES} bytes (etcd's object limit)"]
    with pytest.raises(PolicyError, match="larger than"):
        load_policy_bytes(text.encode())

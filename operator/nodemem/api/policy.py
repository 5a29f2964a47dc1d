"""The NodeMemoryPolicy custom resource (`nodemem.dev/v1alpha1`), as pydantic models.

These models are the contract: the controller validates with them, the agent enforces
what they hold, and the CRD schema is generated from them, so every field carries a
description and prefers declarative constraints. YAML names are camelCase; Python
attributes are snake_case.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import re2
from cronsim import CronSim
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from nodemem.api.written import WrittenValue

from .duration import Duration
from .quantity import Percent, Quantity, SizeOrPercent
from .selector import LabelSelector

__all__ = [
    "API_VERSION",
    "KIND",
    "POD_SHM",
    "CleanupRule",
    "NodeMemoryPolicy",
    "NodeMemoryPolicySpec",
    "OomMatch",
    "OomRule",
    "PolicyMetadata",
    "Regex",
    "ShmemSettings",
    "TmpfsLimit",
]

API_VERSION = "nodemem.dev/v1alpha1"
KIND = "NodeMemoryPolicy"

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_MAX_PATH = 4096  # PATH_MAX
MAX_RULES = 64

_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    extra="forbid",  # a typo in a field name is an error, never a silently ignored setting
    strict=True,  # as the API server would: "5" is not an integer, 1 is not a boolean
    frozen=True,
)

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]


def _check_absolute_glob(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    _check_glob_components(path)
    if path != "/" and any(part in ("", ".") for part in path[1:].split("/")):
        raise ValueError(f"{path!r} is not normalised: no '//', '/./' or trailing '/'")
    return path


def _check_glob_components(path: str) -> str:
    if not path:
        raise ValueError("must not be empty")
    if len(path) > _MAX_PATH:
        raise ValueError(f"longer than {_MAX_PATH} characters")
    if "\x00" in path:
        raise ValueError("must not contain a NUL character")
    if ".." in path.split("/"):
        raise ValueError(f"{path!r} has a '..' component, which could escape the mount")
    return path


AbsoluteGlob = Annotated[
    str,
    AfterValidator(_check_absolute_glob),
    Field(max_length=_MAX_PATH, json_schema_extra={"pattern": "^/"}),
]
RelativeOrAbsoluteGlob = Annotated[
    str, AfterValidator(_check_glob_components), Field(min_length=1, max_length=_MAX_PATH)
]


_GLOB_CHARS = frozenset("*?[")  # as host.cleanup reads a pattern


def _check_cleanup_base(path: str) -> str:
    # As host.cleanup splits a pattern: its base is the leading glob-free directories.
    parts = path[1:].split("/")
    if path == "/" or len(parts) < 2 or not _GLOB_CHARS.isdisjoint(parts[0]):
        raise ValueError(
            f"{path!r}: its literal (glob-free) directory is /, the host root; name a "
            "directory on the tmpfs, such as /dev/shm/*"
        )
    return path


def _check_exclude(pattern: str) -> str:
    if "/" in pattern and any(part in ("", ".") for part in pattern.lstrip("/").split("/")):
        raise ValueError(f"{pattern!r} is not normalised: no '//', '/./', './' or trailing '/'")
    return pattern


# The same check for the API server: a literal first directory, then more.
_CLEANUP_PATH_PATTERN = r"^/[^/*?\[]+/"
CleanupPath = Annotated[
    str,
    AfterValidator(_check_absolute_glob),
    AfterValidator(_check_cleanup_base),
    Field(max_length=_MAX_PATH, json_schema_extra={"pattern": _CLEANUP_PATH_PATTERN}),
]
ExcludeGlob = Annotated[RelativeOrAbsoluteGlob, AfterValidator(_check_exclude)]


def _check_schedule(expression: str) -> str:
    fields = expression.split()
    if expression.lstrip().startswith("@"):
        raise ValueError(
            f"invalid schedule {expression!r}: nicknames such as @daily are not supported, "
            "write 5 fields such as '0 3 * * *'"
        )
    if len(fields) != 5:
        raise ValueError(
            f"invalid schedule {expression!r}: expected 5 fields (minute hour day-of-month "
            f"month day-of-week), found {len(fields)}"
        )
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except Exception as error:  # cronsim may fail in several ways on bad input; all mean invalid
        reason = str(error) or type(error).__name__
        reason = reason[0].lower() + reason[1:]  # cronsim says "Bad minute"
        raise ValueError(f"invalid schedule {expression!r}: {reason}") from None
    return expression


CronSchedule = Annotated[
    str,
    AfterValidator(_check_schedule),
    Field(max_length=256, json_schema_extra={"pattern": r"^\s*\S+(\s+\S+){4}\s*$"}),
]


MAX_REGEX_LENGTH = 1024


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    options.never_capture = True  # only whether it matches is used: no capture groups
    return options


_RE2_OPTIONS = _re2_options()


@dataclass(frozen=True, eq=False)
class Regex(WrittenValue):
    """A regular expression in RE2 syntax, compiled when the policy is validated.

    RE2, not Python's `re`: the patterns are the admin's, but the text they run on (a
    command line, a process name) is anyone's on the node, and RE2 matches in time
    linear in the text, so no pattern can be made to backtrack forever (`^(a+)+$`
    against `aaaa…!` stays microseconds). It is also the dialect of CRD `pattern`s.
    RE2 has no backreferences, lookaround or possessive quantifiers; such a pattern is
    refused at validation with RE2's reason.
    """

    text: str
    compiled: Any  # re2._Regexp: the module has no type information

    @classmethod
    def parse(cls, value: object) -> Regex:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected a regular expression string, found {type(value).__name__}")
        if not value:
            raise ValueError("must not be empty")
        if len(value) > MAX_REGEX_LENGTH:
            raise ValueError(f"longer than {MAX_REGEX_LENGTH} characters")
        try:
            return cls(value, re2.compile(value, _RE2_OPTIONS))
        except re2.error as error:
            raise ValueError(f"invalid regex (RE2 syntax): {_re2_reason(error)}") from None

    def search(self, text: str) -> bool:
        """Whether the pattern occurs anywhere in `text` (anchor with ^ and $)."""
        return self.compiled.search(text) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Regex) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "minLength": 1, "maxLength": MAX_REGEX_LENGTH}


def _re2_reason(error: Exception) -> str:
    """RE2's own words: its errors carry bytes (`b'invalid escape sequence: \\1'`)."""
    reason = error.args[0] if error.args else error
    if isinstance(reason, bytes):
        return reason.decode("utf-8", "replace")
    return str(reason)


class PodVolumeSelector(BaseModel):
    """Which pods' memory-backed volumes a tmpfs item applies to: kubelet's volume path
    (`<root>/pods/<uid>/volumes/<plugin>/<volume>`) tells the pod and the volume."""

    model_config = _CONFIG

    namespace: DnsLabel | None = Field(default=None, description="Namespace of the pods.")
    label_selector: LabelSelector | None = Field(
        default=None, description="Selector on the labels of the pods."
    )
    volume: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Name of the volume (a glob such as cache-*).",
    )


POD_SHM = "podShm"  # how reports name a podShm item (it has no path)


class TmpfsLimit(BaseModel):
    """A size limit for tmpfs mounts at a path on the host, or for the /dev/shm of pods."""

    model_config = _CONFIG

    path: AbsoluteGlob | None = Field(
        default=None,
        description="Mount point on the host, or a glob such as /run/user/* matching several. "
        "Exactly one of path and podShm.",
    )
    pod_shm: bool = Field(
        default=False,
        description="Instead of a path: the /dev/shm tmpfs the container runtime gives each "
        "pod sandbox (64 MiB by default, shared by the pod's containers), for the pods that "
        "pods selects; found from the pods' processes, also for pods started later. A pod "
        "whose /dev/shm is a memory emptyDir is sized through its volume, not here.",
    )
    size: SizeOrPercent = Field(
        description="Size limit: a quantity (512Mi) or a percent of node memory (10%). "
        "Never 0, which would make the tmpfs unlimited."
    )
    nr_inodes: int | None = Field(
        default=None, ge=1, le=2**63 - 1, description="Maximum number of inodes (nr_inodes)."
    )
    headroom: Quantity | None = Field(
        default=None,
        description="When current use already exceeds size, apply used + headroom instead "
        "of reporting a conflict. Unset: never grow beyond size.",
    )
    pods: PodVolumeSelector | None = Field(
        default=None,
        description="Only the volumes of these pods among the mounts path matches, e.g. path "
        "/var/lib/kubelet/pods/*/volumes/kubernetes.io~empty-dir/* for memory emptyDirs. "
        "With podShm: the pods whose /dev/shm is sized (required; {} selects every pod; "
        "no volume).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> TmpfsLimit:
        if (self.path is None) == (not self.pod_shm):
            raise ValueError("needs exactly one of path and podShm: true")
        if self.pod_shm and self.pods is None:
            raise ValueError("podShm needs pods: the pods whose /dev/shm is sized ({}: every pod)")
        if self.pod_shm and self.pods is not None and self.pods.volume is not None:
            raise ValueError("pods.volume does not apply to podShm: /dev/shm is not a volume")
        return self

    @property
    def name(self) -> str:
        """The item as reports name it: its path, or podShm."""
        return self.path if self.path is not None else POD_SHM


AgeTimestamp = Literal["atime", "mtime", "ctime", "btime"]


def _default_age() -> list[AgeTimestamp]:
    return ["mtime"]


class CleanupRule(BaseModel):
    """A scheduled removal of old files inside tmpfs mounts."""

    model_config = _CONFIG

    name: DnsLabel = Field(description="Unique name of the rule within the policy.")
    # Capped like the rule lists: each entry is a walk, and the CRD's cost must stay bounded.
    paths: list[CleanupPath] = Field(
        min_length=1,
        max_length=MAX_RULES,
        description="Absolute globs of files inside tmpfs mounts. The literal (glob-free) "
        "directory part is the base the walk starts from: it must lie on the tmpfs and is "
        "never / itself (/x, /* and /** are refused).",
    )
    schedule: CronSchedule = Field(
        description="When to run: a 5-field cron expression (minute hour day-of-month "
        "month day-of-week), in the node's local time."
    )
    older_than: Duration | None = Field(
        default=None,
        description="Remove files older than this Go duration (90s, 24h); see age.",
    )
    age: list[AgeTimestamp] = Field(
        default_factory=_default_age,
        min_length=1,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Timestamps that must all be older than olderThan for a file to be old "
        "(they also order the removals of a watermark). btime is the birth time (statx): a "
        "file whose filesystem does not report it is never old, so such a rule removes "
        "nothing there and says so in its errors.",
    )
    when_usage_above: Percent | None = Field(
        default=None,
        description="Run only while the mount's use is above this percent of its size; "
        "then remove the oldest files first.",
    )
    target_usage: Percent | None = Field(
        default=None,
        description="Stop removing once use is at or below this percent of the mount's "
        "size; needs whenUsageAbove and must be lower.",
    )
    exclude: list[ExcludeGlob] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        description="Globs never removed; an excluded directory is not entered. Without '/': "
        "an entry's name, at any depth (*.keep). With '/': a full path, absolute, or "
        "relative to the literal (glob-free) directory of each of paths: sub/keep.log with "
        "/m/logs/** excludes /m/logs/sub/keep.log. Here * also crosses '/'. Symlinks in the "
        "literal directories are resolved on the host first, so a directory may be named "
        "through a symlink or by its real path.",
    )
    remove_empty_dirs: bool = Field(
        default=False, description="Also remove directories left empty by the cleanup."
    )

    @field_validator("age")
    @classmethod
    def _age_has_no_duplicates(cls, age: list[AgeTimestamp]) -> list[AgeTimestamp]:
        if len(set(age)) != len(age):
            raise ValueError("lists a timestamp more than once")
        return age

    @field_validator("target_usage")
    @classmethod
    def _target_below_trigger(cls, target: Percent | None, info: ValidationInfo) -> Percent | None:
        if target is None or "when_usage_above" not in info.data:  # that field has its own error
            return target
        trigger: Percent | None = info.data["when_usage_above"]
        if trigger is None:
            raise ValueError("needs whenUsageAbove")
        # As doubles, which is how the CRD's CEL rule compares them: exact decimals would
        # accept 49.99999999999999999% below 50%, which the API server refuses.
        if float(target.value) >= float(trigger.value):
            raise ValueError(f"must be lower than whenUsageAbove ({trigger.text})")
        return target

    @model_validator(mode="after")
    def _has_a_condition(self) -> CleanupRule:
        if self.older_than is None and self.when_usage_above is None:
            raise ValueError(
                "needs olderThan or whenUsageAbove: without either the rule would remove "
                "every matching file"
            )
        return self


QosClass = Literal["Guaranteed", "Burstable", "BestEffort"]


class OomMatch(BaseModel):
    """Which processes an OOM rule applies to; every criterion given must match."""

    model_config = _CONFIG

    comm: Regex | None = Field(
        default=None, description="RE2 regex searched in the process name (comm)."
    )
    cmdline: Regex | None = Field(
        default=None,
        description="RE2 regex searched in the command line, arguments joined by spaces.",
    )
    cgroup: Regex | None = Field(default=None, description="RE2 regex searched in the cgroup path.")
    namespace: DnsLabel | None = Field(default=None, description="Namespace of the pod.")
    label_selector: LabelSelector | None = Field(
        default=None, description="Selector on the labels of the pod."
    )
    container: DnsLabel | None = Field(default=None, description="Name of the container.")
    qos_class: QosClass | None = Field(default=None, description="QoS class of the pod.")

    @model_validator(mode="after")
    def _has_a_criterion(self) -> OomMatch:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "needs at least one of comm, cmdline, cgroup, namespace, labelSelector, "
                "container, qosClass"
            )
        return self


class OomRule(BaseModel):
    """An oom_score_adj for the processes that match."""

    model_config = _CONFIG

    name: DnsLabel = Field(description="Unique name of the rule within the policy.")
    match: OomMatch = Field(description="Which processes the rule applies to.")
    # allowUnkillable comes first so that oomScoreAdj's check can see it (field order).
    allow_unkillable: bool = Field(
        default=False,
        description="Must be true for oomScoreAdj -1000: an unkillable process can take "
        "the whole node down with it.",
    )
    oom_score_adj: int = Field(
        ge=-1000, le=1000, description="oom_score_adj to set, -1000 (never killed) to 1000."
    )

    @field_validator("oom_score_adj")
    @classmethod
    def _unkillable_is_explicit(cls, adj: int, info: ValidationInfo) -> int:
        if adj == -1000 and info.data.get("allow_unkillable") is False:
            raise ValueError("-1000 makes processes unkillable; it needs allowUnkillable: true")
        return adj


class ShmemSettings(BaseModel):
    """When the node's Shmem that no process accounts for counts as a leak."""

    model_config = _CONFIG

    unaccounted_threshold: SizeOrPercent | None = Field(
        default=None,
        description="Above this much unaccounted Shmem (quantity or percent of node memory) "
        "the node report gets condition ShmemLeakSuspected.",
    )


def _duplicates(keys: list[str | None]) -> str | None:
    """The first repeated key and where it repeats, for an error message (None: no key)."""
    first_index: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key is None:
            continue
        if key in first_index:
            return f"{key!r} appears in items [{first_index[key]}] and [{index}]"
        first_index[key] = index
    return None


class NodeMemoryPolicySpec(BaseModel):
    """What a NodeMemoryPolicy asks of the nodes it selects."""

    model_config = _CONFIG

    node_selector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="Nodes the policy applies to; empty selects every node.",
    )
    priority: int = Field(
        default=0,
        ge=-(2**31),
        le=2**31 - 1,
        description="When several policies select a node they merge item by item (tmpfs "
        "items per mount their paths resolve to); for each item the highest priority wins, "
        "ties to the alphabetically first policy, then to the earlier item in one policy.",
    )
    dry_run: bool = Field(default=False, description="Plan and report, change nothing.")
    # Bounded so that the CRD's CEL rules over these lists fit the API server's cost limit.
    tmpfs: list[TmpfsLimit] = Field(
        default_factory=list, max_length=MAX_RULES, description="tmpfs size limits, unique by path."
    )
    cleanup: list[CleanupRule] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        description="Scheduled cleanups of tmpfs files, unique by name.",
    )
    oom: list[OomRule] = Field(
        default_factory=list,
        max_length=MAX_RULES,
        description="oom_score_adj rules, unique by name; the first matching rule wins.",
    )
    shmem: ShmemSettings = Field(default_factory=ShmemSettings, description="Shmem leak detection.")

    @field_validator("tmpfs")
    @classmethod
    def _tmpfs_paths_unique(cls, items: list[TmpfsLimit]) -> list[TmpfsLimit]:
        if (duplicate := _duplicates([item.path for item in items])) is not None:
            raise ValueError(f"duplicate path: {duplicate}")
        return items

    @field_validator("cleanup", "oom")
    @classmethod
    def _names_unique(cls, items: list[Any]) -> list[Any]:
        if (duplicate := _duplicates([item.name for item in items])) is not None:
            raise ValueError(f"duplicate name: {duplicate}")
        return items


class PolicyMetadata(BaseModel):
    """The part of Kubernetes object metadata a policy uses; other keys are ignored."""

    model_config = _CONFIG | ConfigDict(extra="ignore")  # uid, labels, managedFields...

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of the policy.",
    )
    generation: int = Field(
        default=1, ge=1, description="Generation of the spec, set by the API server."
    )


class NodeMemoryPolicy(BaseModel):
    """A NodeMemoryPolicy: tmpfs limits, tmpfs cleanup and OOM priorities for nodes."""

    # The API server adds status and may add other top-level keys: they are not ours to check.
    model_config = _CONFIG | ConfigDict(extra="ignore")

    api_version: Literal["nodemem.dev/v1alpha1"] = Field(
        default="nodemem.dev/v1alpha1", description="nodemem.dev/v1alpha1"
    )
    kind: Literal["NodeMemoryPolicy"] = Field(
        default="NodeMemoryPolicy", description="NodeMemoryPolicy"
    )
    metadata: PolicyMetadata = Field(description="Object metadata; name is required.")
    spec: NodeMemoryPolicySpec = Field(description="What the policy asks of its nodes.")

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def generation(self) -> int:
        return self.metadata.generation

"""A stricter Kubernetes API emulator for nodemem's tests: a subclass of kmock 0.8's.

Test infrastructure, not a toy API server in the product. It subclasses
``kmock.KubernetesEmulator`` (pinned ``kmock==0.8``: it uses kmock internals)
and keeps from kmock the request model, the DSL for injected reactions
(``emulator['patch', kmock.resource(...)] << 500`` still works and wins over the
emulation), discovery, and error rendering. It replaces the object store and the
request pipeline with what a real API server does and nodemem depends on (see
``docs/testing.md#the-api-emulator``):

- a global monotonic ``resourceVersion``; ``uid``, ``creationTimestamp``,
  ``generation`` (1 on create, +1 when anything but metadata/status changes, and
  when deletion starts, never on status writes);
- create: 201, ``generateName``, 409 ``AlreadyExists``, 404 when the namespace
  does not exist, 422 for invalid names; ``.status`` dropped for kinds with a
  status subresource, except built-in kinds declared with
  ``seed_status_on_create`` (Pods, Nodes, Namespaces by default) so that tests
  can seed a Pod's phase or a Node's capacity in one request;
- PUT with 409 on a stale ``metadata.resourceVersion``; merge patch, strategic
  merge (lite, see ``k8s_patches.py``; 415 for custom resources, as the real server),
  JSON patch with ``test`` (422 when it fails); a ``metadata.resourceVersion`` in
  a merge patch is a precondition (409); status-subresource semantics (the main
  endpoint ignores ``.status``, ``/status`` changes only ``.status``); no-op
  writes do not bump the resourceVersion and emit no watch event;
- DELETE with finalizers sets ``deletionTimestamp`` and keeps the object until the
  last finalizer goes; no new finalizers on an object being deleted (422);
  ``preconditions`` (409); deletecollection;
- LIST with ``labelSelector``, ``fieldSelector`` (the field labels the real server
  supports for the built-in kinds, ``metadata.name``/``metadata.namespace`` and
  ``selectableFields`` for custom resources; 400 for others), ``limit``/``continue``;
- WATCH: resume from ``resourceVersion`` (from a bounded per-resource history;
  410 ``Expired`` as an ERROR event when too old), synthetic ADDED events when no
  ``resourceVersion`` (or ``"0"``) is given, as the real server does,
  ``sendInitialEvents`` with the ``k8s.io/initial-events-end`` bookmark,
  ``allowWatchBookmarks`` (a BOOKMARK every ``bookmark_interval`` seconds),
  ``timeoutSeconds``, selectors applied to events (leaving → DELETED with the last
  content it matched, entering → ADDED). kopf lists first and watches from the
  list's resourceVersion, so it gets no replay; it reconnects from the last version
  it saw (bookmarks keep that current), and re-lists on 410: each event reaches an
  ``on.event`` handler once;
- custom resources: CRDs registered with :meth:`KubeEmulator.register_crd` or by
  creating a CustomResourceDefinition object through the API; discovery lists
  them; objects are pruned and defaulted by the CRD's structural schema (unknown
  fields dropped silently, as for clients that send no ``fieldValidation``, like
  kopf and the official client; ``?fieldValidation=Strict`` answers 400 instead; no
  ``Warning`` headers) and validated by a pluggable validator (``validator=`` or
  ``validator_factory=``), answering 422 ``Invalid`` with ``details.causes[].field``
  like the real server;
- O(1) lookups, bounded logs, request records for counting requests in tests.

Not emulated (by choice): server-side apply (415), admission webhooks, RBAC,
version conversion (all served versions of a CRD share one store, ``apiVersion``
is rewritten), graceful pod termination (pods go at once), namespace deletion
cascading to its objects, garbage collection unless ``garbage_collection=True``,
``managedFields``. Core ``v1`` and ``events.k8s.io/v1`` Events are separate stores.

Usage: ``make_emulator()`` (built-ins, namespaces, nodemem's CRDs and validator),
served by ``EmulatorThread`` (own thread and loop) or ``serve()`` (the caller's loop);
``tests/kube/conftest.py`` wraps both in fixtures.

Concurrency: all state changes run synchronously under one ``threading.RLock``,
so the in-process helpers (``create_object``, ``register_crd``, ...) may be called
from any thread. The HTTP side runs in one event loop (``serve()``), usually in
its own thread (:class:`EmulatorThread`); never run ``kopf.operator()`` or a
blocking client in that loop: use :class:`KopfThread` and the official client
from the test's thread (or ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import copy
import datetime
import json
import math
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import Any, NamedTuple, Protocol, Self, TypeAlias, TypeVar

import aiohttp.web
import attrs
import kmock
import yaml
from k8s_patches import (
    PatchError,
    PatchFormatError,
    apply_json_patch,
    apply_merge_patch,
    apply_strategic_merge_patch,
    json_equal,
)
from k8s_selectors import FieldSelector, LabelSelector, SelectorError
from k8s_structural import prune_and_default, unknown_fields, version_schema
from kmock._internal import enums, parsing, rendering

__all__ = [
    "ANY",
    "BUILTINS",
    "CRD_DIR",
    "DEFAULT_BUILTINS",
    "DEFAULT_NAMESPACES",
    "ApiError",
    "EmulatorThread",
    "Kind",
    "KopfThread",
    "KubeEmulator",
    "RequestRecord",
    "Validator",
    "ValidatorFactory",
    "api_client_for",
    "crd_validator_factory",
    "load_crds",
    "make_emulator",
    "parse_api_path",
    "serve",
    "wait_until",
    "write_kubeconfig",
]

T = TypeVar("T")
ANY: EllipsisType = ...
"""A filter value meaning "any", where ``None`` means "none" (cluster-wide, no subresource)."""

KindKey = tuple[str, str, str]  # (group, version, plural)
StoreKey = tuple[str, str]  # (group, plural): all versions of a resource share one store
ObjKey = tuple[str | None, str]  # (namespace, name)

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
CRD_KIND_KEY: KindKey = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACE_STORE: StoreKey = ("", "namespaces")
_SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
)
_IMMUTABLE_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_TRUE = frozenset({"true", "1", "t"})


# --------------------------------------------------------------------------------------------
# Errors as the API server reports them
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An API error with the real server's ``Status`` body; raised by the in-process helpers."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        body["details"] = self.details
        return body

    @property
    def causes(self) -> list[dict[str, str]]:
        return list(self.details.get("causes", []))


def _not_found_endpoint() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# --------------------------------------------------------------------------------------------
# Kinds (resources) and their declarations
# --------------------------------------------------------------------------------------------


class Validator(Protocol):
    """Validates a whole object; returns ``"<field path>: <message>"`` strings, none if valid.

    ``crd_schema.CrdValidator(crd).validate`` has this shape.
    """

    def __call__(
        self,
        obj: dict[str, Any],
        old: dict[str, Any] | None = None,
        *,
        subresource: str | None = None,
    ) -> list[str]: ...


ValidatorFactory = Callable[[dict[str, Any]], Validator | None]
"""Builds a validator for a CRD (called whenever a CRD is registered or changed)."""


@dataclass
class Kind:
    """One served resource (group/version/plural) with the semantics the emulator applies."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    shortnames: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: frozenset[str] = frozenset()
    field_labels: frozenset[str] | None = None  # None: any dotted path is accepted
    seed_status_on_create: bool = False
    schema: dict[str, Any] | None = None  # a CRD version's openAPIV3Schema: prune + default
    validator: Validator | None = None
    crd_name: str | None = None

    @property
    def key(self) -> KindKey:
        return (self.group, self.version, self.plural)

    @property
    def store_key(self) -> StoreKey:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def status_subresource(self) -> bool:
        return "status" in self.subresources

    @property
    def qualified(self) -> str:
        """How the real server names the resource in messages: ``pods``, ``x.nodemem.dev``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    def details(self, name: str) -> dict[str, Any]:
        details: dict[str, Any] = {"name": name, "kind": self.plural}
        if self.group:
            details["group"] = self.group
        return details


ResourceRef: TypeAlias = str | kmock.resource | Kind | tuple[str, str, str]
"""A resource: ``"v1/pods"``, ``"pods"`` (when unique), a kmock.resource, a Kind, a key."""

_POD_FIELDS = (
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.podIPs",
    "status.nominatedNodeName",
)
_EVENT_FIELDS = (
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)
_NAMESPACED_META = ("metadata.name", "metadata.namespace")


def _builtin(
    resource: str,
    kind: str,
    *,
    namespaced: bool,
    subresources: Iterable[str] = (),
    shortnames: Iterable[str] = (),
    categories: Iterable[str] = (),
    fields: Iterable[str] | None = ("metadata.name",),
    seed_status: bool = False,
) -> Kind:
    group, version, plural = _split_resource(resource)
    return Kind(
        group=group,
        version=version,
        plural=plural,
        kind=kind,
        namespaced=namespaced,
        singular=kind.lower(),
        shortnames=tuple(shortnames),
        categories=tuple(categories),
        subresources=frozenset(subresources),
        field_labels=frozenset(fields) if fields is not None else None,
        seed_status_on_create=seed_status,
    )


def _split_resource(resource: str) -> KindKey:
    parts = resource.split("/")
    if len(parts) == 2:
        return ("", parts[0], parts[1])
    if len(parts) == 3:
        return (parts[0], parts[1], parts[2])
    raise ValueError(f"expected 'group/version/plural' or 'v1/plural', got {resource!r}")


BUILTINS: dict[str, Kind] = {
    k.api_version + "/" + k.plural: k
    for k in (
        _builtin(
            "v1/namespaces",
            "Namespace",
            namespaced=False,
            subresources=("status", "finalize"),
            shortnames=("ns",),
            fields=("metadata.name", "status.phase"),
            seed_status=True,
        ),
        _builtin(
            "v1/nodes",
            "Node",
            namespaced=False,
            subresources=("status", "proxy"),
            shortnames=("no",),
            fields=("metadata.name", "spec.unschedulable"),
            seed_status=True,
        ),
        _builtin(
            "v1/pods",
            "Pod",
            namespaced=True,
            subresources=("status", "log", "eviction", "binding", "exec", "ephemeralcontainers"),
            shortnames=("po",),
            categories=("all",),
            fields=_POD_FIELDS,
            seed_status=True,
        ),
        _builtin("v1/events", "Event", namespaced=True, shortnames=("ev",), fields=_EVENT_FIELDS),
        _builtin("v1/configmaps", "ConfigMap", namespaced=True, shortnames=("cm",)),
        _builtin(
            "events.k8s.io/v1/events", "Event", namespaced=True, shortnames=("ev",), fields=None
        ),
        _builtin(
            "coordination.k8s.io/v1/leases", "Lease", namespaced=True, fields=_NAMESPACED_META
        ),
        _builtin(
            "apiextensions.k8s.io/v1/customresourcedefinitions",
            "CustomResourceDefinition",
            namespaced=False,
            subresources=("status",),
            shortnames=("crd", "crds"),
            categories=("api-extensions",),
        ),
        _builtin("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", namespaced=False),
        _builtin("kopf.dev/v1/kopfpeerings", "KopfPeering", namespaced=True, fields=None),
    )
}
"""Built-in kinds the emulator knows how to declare (``declare_builtins``)."""

DEFAULT_BUILTINS: tuple[str, ...] = (
    "v1/namespaces",
    "v1/nodes",
    "v1/pods",
    "v1/events",
    "events.k8s.io/v1/events",
    "coordination.k8s.io/v1/leases",
    "apiextensions.k8s.io/v1/customresourcedefinitions",
)
"""What nodemem uses: the fixtures declare these."""


# --------------------------------------------------------------------------------------------
# Paths, verbs and records of requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiPath:
    """A parsed API path; ``group is None`` for non-API paths (``/version``, ``/apis``)."""

    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath:
    """Parse ``/api/v1/...`` and ``/apis/g/v/...`` (kmock 0.8's parser breaks on namespaces)."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    elif len(parts) == 2 and parts[0] == "apis":
        return ApiPath(group=parts[1])
    else:
        return ApiPath()
    namespace: str | None = None
    is_namespace_object = len(rest) <= 2 or (len(rest) == 3 and rest[2] in {"status", "finalize"})
    if rest and rest[0] == "namespaces" and not is_namespace_object:
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return ApiPath(group, version, plural, namespace, name, subresource)


def api_verb(method: str, path: ApiPath, query: Mapping[str, str]) -> str | None:
    """The Kubernetes verb of a request (as RBAC names it), or None for non-resource paths."""
    if path.group is None or path.plural is None:
        return None
    method = method.upper()
    if method == "GET":
        if query.get("watch", "").lower() in _TRUE:
            return "watch"
        return "get" if path.name else "list"
    if path.name is None:
        return {"POST": "create", "DELETE": "deletecollection"}.get(method)
    return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)


@dataclass(slots=True)
class RequestRecord:
    """One request as seen by the emulator (for counting; no bodies kept)."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    verb: str | None
    group: str | None
    version: str | None
    plural: str | None
    namespace: str | None
    name: str | None
    subresource: str | None
    content_type: str | None
    status: int | None = None  # None while a watch is still streaming

    def matches(
        self,
        *,
        verb: str | Collection[str] | None = None,
        method: str | None = None,
        resource: str | kmock.resource | None = None,
        namespace: str | EllipsisType | None = ANY,
        name: str | EllipsisType | None = ANY,
        subresource: str | EllipsisType | None = ANY,
        status: int | EllipsisType | None = ANY,
    ) -> bool:
        if verb is not None:
            verbs = {verb} if isinstance(verb, str) else set(verb)
            if self.verb not in verbs:
                return False
        if method is not None and self.method != method.upper():
            return False
        if resource is not None:
            wanted = resource if isinstance(resource, kmock.resource) else kmock.resource(resource)
            if self.plural is None or not (
                (wanted.group is None or wanted.group == self.group)
                and (wanted.version is None or wanted.version == self.version)
                and (wanted.plural is None or wanted.plural == self.plural)
            ):
                return False
        if namespace is not ANY and self.namespace != namespace:
            return False
        if name is not ANY and self.name != name:
            return False
        if subresource is not ANY and self.subresource != subresource:
            return False
        return status is ANY or self.status == status


class WatchEvent(NamedTuple):
    rv: int
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass
class _History:
    events: list[WatchEvent] = field(default_factory=list)
    trimmed_rv: int = 0  # events with rv <= trimmed_rv may be gone: older resumes get 410


@dataclass(eq=False)
class _Watch:
    event: asyncio.Event
    store_key: StoreKey


@dataclass(frozen=True)
class _Filter:
    namespace: str | None
    name: str | None
    labels: LabelSelector
    fields: FieldSelector

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_response(body: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _bool_param(query: Mapping[str, str], key: str) -> bool:
    return query.get(key, "").lower() in _TRUE


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the semantics of a real API server (see the module doc).

    Options: ``history_limit`` (watch events kept per resource for resuming),
    ``request_log_limit`` (request records kept for counting), ``bookmark_interval``
    (seconds between BOOKMARK events when a watch allows them), ``require_namespaces``
    (404 on create in a namespace that does not exist, when namespaces are declared),
    ``garbage_collection`` (delete dependents when all their owners are gone),
    ``validator_factory`` (builds a validator for each registered CRD).
    """

    history_limit: int = 10_000
    request_log_limit: int = 100_000
    dsl_log_limit: int = 1_000
    bookmark_interval: float = 2.0
    require_namespaces: bool = True
    garbage_collection: bool = False
    validator_factory: ValidatorFactory | None = None

    _mutex: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _kinds: dict[KindKey, Kind] = attrs.field(factory=dict, init=False)
    _store: dict[StoreKey, dict[ObjKey, dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _history: dict[StoreKey, _History] = attrs.field(factory=dict, init=False)
    _watches: dict[StoreKey, set[_Watch]] = attrs.field(factory=dict, init=False)
    _records: deque[RequestRecord] = attrs.field(factory=deque, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _builtin_payloads: frozenset[int] = attrs.field(factory=frozenset, init=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    _loop_thread: int | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _crd_validators: dict[str, Validator] = attrs.field(factory=dict, init=False)
    _by_uid: dict[str, tuple[StoreKey, ObjKey]] = attrs.field(factory=dict, init=False)
    _dependents: dict[str, set[tuple[StoreKey, ObjKey]]] = attrs.field(factory=dict, init=False)
    server_errors: list[BaseException] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        # Discovery and the 404 fallback from the scaffold; NOT kmock's object handlers.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self._builtin_payloads = frozenset(id(payload) for payload in self._payloads)
        self._requests = deque(maxlen=self.dsl_log_limit)  # type: ignore[assignment]
        self._records = deque(maxlen=self.request_log_limit)

    # ---------------------------------------------------------------- declarations

    def declare(self, kind: Kind) -> Kind:
        """Serve a resource (and list it in discovery)."""
        with self._mutex:
            self._kinds[kind.key] = kind
            self._store.setdefault(kind.store_key, {})
            self._history.setdefault(kind.store_key, _History(trimmed_rv=0))
            resources = kmock.ResourcesArray(dict(self._resources.items()))
            resources[kind.resource] = kmock.ResourceInfo(
                namespaced=kind.namespaced,
                kind=kind.kind,
                singular=kind.singular or kind.kind.lower(),
                verbs=set(kind.verbs),
                shortnames=set(kind.shortnames),
                categories=set(kind.categories),
                subresources=set(kind.subresources),
            )
            self._resources = resources  # copy-on-write: discovery may iterate concurrently
        return kind

    def declare_builtins(self, *names: str) -> None:
        """Declare built-in kinds by ``group/version/plural`` (default: DEFAULT_BUILTINS)."""
        for name in names or DEFAULT_BUILTINS:
            self.declare(copy.copy(BUILTINS[name]))

    def undeclare(self, resource: ResourceRef) -> None:
        with self._mutex:
            kind = self._kind(resource)
            del self._kinds[kind.key]
            resources = kmock.ResourcesArray(dict(self._resources.items()))
            del resources[kind.resource]
            self._resources = resources
            if not any(k.store_key == kind.store_key for k in self._kinds.values()):
                self._store.pop(kind.store_key, None)
            self._wake(kind.store_key)

    def kinds(self) -> list[Kind]:
        with self._mutex:
            return list(self._kinds.values())

    def _kind(self, resource: ResourceRef) -> Kind:
        if isinstance(resource, Kind):
            return resource
        if isinstance(resource, tuple):
            key = resource
        else:
            res = kmock.resource(resource)
            if res.group is not None and res.version is not None and res.plural is not None:
                key = (res.group, res.version, res.plural)
            else:
                candidates = [k for k in self._kinds.values() if res.check(k.resource)]
                if len(candidates) != 1:
                    raise KeyError(f"{resource!r} matches {len(candidates)} declared resources")
                return candidates[0]
        if key not in self._kinds:
            raise KeyError(f"resource {resource!r} is not declared")
        return self._kinds[key]

    # ---------------------------------------------------------------- custom resources

    def register_crd(
        self, crd: Mapping[str, Any], validator: Validator | None = None
    ) -> list[Kind]:
        """Register a CustomResourceDefinition: serve its versions, list them in discovery.

        When ``apiextensions.k8s.io/v1/customresourcedefinitions`` is declared, the
        CRD is also stored (created or replaced) as an object, with watch events, as
        ``kubectl apply`` would do. ``validator`` overrides ``validator_factory``.
        """
        body = copy.deepcopy(dict(crd))
        name = body.get("metadata", {}).get("name", "")
        with self._mutex:
            if validator is not None:
                self._crd_validators[name] = validator
            if CRD_KIND_KEY in self._kinds:
                crd_kind = self._kinds[CRD_KIND_KEY]
                current = self._store[crd_kind.store_key].get((None, name))
                if current is None:
                    self._create(crd_kind, body, None, dry_run=False)
                else:
                    body.setdefault("metadata", {})["resourceVersion"] = current["metadata"][
                        "resourceVersion"
                    ]
                    self._update(crd_kind, (None, name), current, body, None, dry_run=False)
                self._install_crd(self._store[crd_kind.store_key][(None, name)])
            else:
                self._check_crd(body)
                self._install_crd(body)
            return [k for k in self._kinds.values() if k.crd_name == name]

    def _check_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        causes: list[tuple[str, str]] = []
        if not spec.get("group"):
            causes.append(("spec.group", "Required value"))
        if not names.get("plural"):
            causes.append(("spec.names.plural", "Required value"))
        if not names.get("kind"):
            causes.append(("spec.names.kind", "Required value"))
        if spec.get("scope") not in {"Namespaced", "Cluster"}:
            causes.append(("spec.scope", 'Unsupported value: must be "Namespaced" or "Cluster"'))
        if not spec.get("versions"):
            causes.append(("spec.versions", "Required value"))
        expected = f"{names.get('plural')}.{spec.get('group')}"
        if crd.get("metadata", {}).get("name") != expected:
            causes.append(
                (
                    "metadata.name",
                    f'Invalid value: must be spec.names.plural+"."+spec.group ({expected})',
                )
            )
        if causes:
            crd_kind = BUILTINS["apiextensions.k8s.io/v1/customresourcedefinitions"]
            raise _invalid(crd_kind, str(crd.get("metadata", {}).get("name", "")), causes)

    def _install_crd(self, crd: Mapping[str, Any]) -> None:
        name = crd["metadata"]["name"]
        spec = crd["spec"]
        names = spec["names"]
        validator = self._crd_validators.get(name)
        if validator is None and self.validator_factory is not None:
            validator = self.validator_factory(copy.deepcopy(dict(crd)))
        for old in [k for k in self._kinds.values() if k.crd_name == name]:
            self._drop_kind(old)
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            selectable = [
                item["jsonPath"].lstrip(".") for item in version.get("selectableFields") or []
            ]
            self.declare(
                Kind(
                    group=spec["group"],
                    version=version["name"],
                    plural=names["plural"],
                    kind=names["kind"],
                    namespaced=spec["scope"] == "Namespaced",
                    singular=names.get("singular") or names["kind"].lower(),
                    shortnames=tuple(names.get("shortNames") or ()),
                    categories=tuple(names.get("categories") or ()),
                    subresources=frozenset((version.get("subresources") or {}).keys()),
                    field_labels=frozenset([*_NAMESPACED_META, *selectable]),
                    schema=version_schema(crd, version["name"]),
                    validator=validator,
                    crd_name=name,
                )
            )

    def _drop_kind(self, kind: Kind) -> None:
        self._kinds.pop(kind.key, None)
        resources = kmock.ResourcesArray(dict(self._resources.items()))
        if kind.resource in resources:
            del resources[kind.resource]
        self._resources = resources
        self._wake(kind.store_key)

    def _uninstall_crd(self, crd: Mapping[str, Any]) -> None:
        name = crd["metadata"]["name"]
        kinds = [k for k in self._kinds.values() if k.crd_name == name]
        if kinds:  # the real server deletes all custom resources first, with DELETED events
            kind = kinds[0]
            for key, obj in list(self._store.get(kind.store_key, {}).items()):
                self._commit(kind, key, _with_meta(obj), obj, "DELETED")
        for kind in kinds:
            self._drop_kind(kind)
        self._store.pop((crd["spec"]["group"], crd["spec"]["names"]["plural"]), None)
        self._crd_validators.pop(name, None)

    # ---------------------------------------------------------------- in-process API

    def get_object(
        self, resource: ResourceRef, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """A deep copy of the stored object, or None."""
        with self._mutex:
            kind = self._kind(resource)
            obj = self._store[kind.store_key].get((namespace if kind.namespaced else None, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list_objects(
        self,
        resource: ResourceRef,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[dict[str, Any]]:
        """Deep copies of the matching objects, sorted by namespace and name."""
        with self._mutex:
            kind = self._kind(resource)
            body = self._list(kind, namespace, label_selector, field_selector)
            return copy.deepcopy(body["items"])

    def create_object(
        self,
        resource: ResourceRef,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        dry_run: bool = False,
        field_validation: str = "",
    ) -> dict[str, Any]:
        """Create as ``POST`` would (events, validation, errors as :class:`ApiError`).

        For namespaced kinds, ``namespace`` defaults to the body's ``metadata.namespace``.
        """
        if namespace is None:
            namespace = (body.get("metadata") or {}).get("namespace") or None
        with self._mutex:
            kind = self._kind(resource)
            obj = self._create(
                kind, dict(body), namespace, dry_run=dry_run, field_validation=field_validation
            )
            return copy.deepcopy(obj)

    def replace_object(
        self,
        resource: ResourceRef,
        name: str,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str = "",
    ) -> dict[str, Any]:
        """Replace as ``PUT`` would."""
        with self._mutex:
            kind = self._kind(resource)
            key, old = self._existing(kind, namespace, name, subresource)
            obj = self._replace(
                kind,
                key,
                old,
                dict(body),
                subresource,
                dry_run=dry_run,
                field_validation=field_validation,
            )
            return copy.deepcopy(obj)

    def patch_object(
        self,
        resource: ResourceRef,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str = "",
    ) -> dict[str, Any]:
        """Patch as ``PATCH`` would; ``patch_type`` is ``merge``, ``strategic`` or ``json``."""
        with self._mutex:
            kind = self._kind(resource)
            key, old = self._existing(kind, namespace, name, subresource)
            obj = self._patch(
                kind,
                key,
                old,
                patch,
                patch_type=patch_type,
                subresource=subresource,
                dry_run=dry_run,
                field_validation=field_validation,
            )
            return copy.deepcopy(obj)

    def delete_object(
        self,
        resource: ResourceRef,
        name: str,
        namespace: str | None = None,
        *,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Delete as ``DELETE`` would (finalizers keep the object, marked for deletion)."""
        with self._mutex:
            kind = self._kind(resource)
            key, old = self._existing(kind, namespace, name, None)
            obj = self._delete(kind, key, old, dict(preconditions or {}), dry_run=dry_run)
            return copy.deepcopy(obj)

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        return self._rv

    def compact(self, resource: ResourceRef | None = None) -> None:
        """Forget the watch history (of one resource or all): older resumes get 410 Gone."""
        with self._mutex:
            keys = [self._kind(resource).store_key] if resource is not None else list(self._history)
            for key in keys:
                history = self._history[key]
                history.events.clear()
                history.trimmed_rv = self._rv
                self._wake(key)

    def event_history(self, resource: ResourceRef) -> list[tuple[int, str, str]]:
        """The retained watch events of a resource as (rv, type, name): for assertions."""
        with self._mutex:
            kind = self._kind(resource)
            return [
                (e.rv, e.type, e.obj["metadata"]["name"])
                for e in self._history[kind.store_key].events
            ]

    @property
    def objects(self) -> Any:
        raise AttributeError(
            "KubeEmulator keeps its own store: use get_object()/list_objects(), not .objects"
        )

    # ---------------------------------------------------------------- request records

    def mark(self) -> int:
        """A position in the request log, for ``count(since=...)``/``requests(since=...)``."""
        with self._mutex:
            return self._seq

    def requests(
        self,
        *,
        since: int = 0,
        verb: str | Collection[str] | None = None,
        method: str | None = None,
        resource: str | None = None,
        namespace: str | EllipsisType | None = ANY,
        name: str | EllipsisType | None = ANY,
        subresource: str | EllipsisType | None = ANY,
        status: int | EllipsisType | None = ANY,
    ) -> list[RequestRecord]:
        """Recorded requests since a mark, filtered; ``ANY`` (the default) matches anything.

        ``resource`` is a plural (``"pods"``) or any kmock notation
        (``"v1/pods"``, ``"nodemem.dev/v1alpha1/nodememoryreports"``).
        """
        with self._mutex:
            records = list(self._records)
        if since and records and records[0].seq > since + 1:
            raise RuntimeError(
                f"the request log (limit {self.request_log_limit}) lost records since mark {since}"
            )
        wanted = kmock.resource(resource) if resource is not None else None
        return [
            record
            for record in records
            if record.seq > since
            and record.matches(
                verb=verb,
                method=method,
                resource=wanted,
                namespace=namespace,
                name=name,
                subresource=subresource,
                status=status,
            )
        ]

    def count(
        self,
        *,
        since: int = 0,
        verb: str | Collection[str] | None = None,
        method: str | None = None,
        resource: str | None = None,
        namespace: str | EllipsisType | None = ANY,
        name: str | EllipsisType | None = ANY,
        subresource: str | EllipsisType | None = ANY,
        status: int | EllipsisType | None = ANY,
    ) -> int:
        """How many recorded requests match (see :meth:`requests`)."""
        return len(
            self.requests(
                since=since,
                verb=verb,
                method=method,
                resource=resource,
                namespace=namespace,
                name=name,
                subresource=subresource,
                status=status,
            )
        )

    def writes(self, *, since: int = 0, resource: str | None = None) -> list[RequestRecord]:
        """Create/update/patch/delete requests since a mark (to prove that nothing was written)."""
        return self.requests(since=since, verb=WRITE_VERBS, resource=resource)

    def watch_count(self, resource: ResourceRef | None = None) -> int:
        """How many watch streams are open (on one resource or on all)."""
        with self._mutex:
            if resource is None:
                return sum(len(w) for w in self._watches.values())
            return len(self._watches.get(self._kind(resource).store_key, ()))

    def wait_for_watches(
        self, resource: ResourceRef, count: int = 1, timeout: float = 10.0
    ) -> None:
        """Block (in a thread other than the emulator's loop) until ``count`` watches are open."""
        wait_until(
            lambda: self.watch_count(resource) >= count,
            timeout=timeout,
            message=f"{count} watch(es) on {resource!r}",
        )

    # ---------------------------------------------------------------- the write pipeline

    def _existing(
        self, kind: Kind, namespace: str | None, name: str, subresource: str | None
    ) -> tuple[ObjKey, dict[str, Any]]:
        if subresource is not None and subresource not in kind.subresources:
            raise _not_found_endpoint()
        key = (namespace if kind.namespaced else None, name)
        old = self._store[kind.store_key].get(key)
        if old is None:
            raise ApiError(
                404, "NotFound", f'{kind.qualified} "{name}" not found', kind.details(name)
            )
        return key, old

    def _check_type_meta(self, kind: Kind, obj: dict[str, Any]) -> None:
        api_version, obj_kind = obj.get("apiVersion"), obj.get("kind")
        if obj_kind not in (None, "", kind.kind):
            raise _bad_request(f"the kind of the object ({obj_kind}) does not match {kind.kind}")
        if api_version not in (None, "") and api_version != kind.api_version:
            same_group = str(api_version).rsplit("/", 1)[0] == (kind.group or api_version)
            if not (kind.crd_name and same_group):
                raise _bad_request(
                    f"the API version of the object ({api_version}) does not match "
                    f"{kind.api_version}"
                )
        obj["apiVersion"] = kind.api_version
        obj["kind"] = kind.kind

    def _create(
        self,
        kind: Kind,
        body: Any,
        namespace: str | None,
        *,
        dry_run: bool,
        field_validation: str = "",
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        self._check_type_meta(kind, obj)
        if kind.namespaced:
            body_namespace = meta.get("namespace")
            if namespace is None:  # POST /api/v1/pods: no such endpoint on a real server
                raise _not_found_endpoint()
            if body_namespace not in (None, "", namespace):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            self._check_namespace_exists(namespace)
            meta["namespace"] = namespace
        else:
            if namespace is not None:
                raise _not_found_endpoint()
            meta.pop("namespace", None)
        if kind.status_subresource and not kind.seed_status_on_create:
            obj.pop("status", None)
        for field_name in _SERVER_METADATA:
            meta.pop(field_name, None)
        store = self._store[kind.store_key]
        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise _invalid(
                    kind,
                    "",
                    [("metadata.name", "Required value: name or generateName is required")],
                )
            for _ in range(100):
                suffix = "".join(random.choices(_NAME_SUFFIX_CHARS, k=5))
                name = f"{str(prefix)[:58]}{suffix}"
                if (namespace if kind.namespaced else None, name) not in store:
                    break
            meta["name"] = name
        self._check_name(kind, str(name))
        key = (namespace if kind.namespaced else None, str(name))
        if key in store:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{kind.qualified} "{name}" already exists',
                kind.details(str(name)),
            )
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        self._prepare_special(kind, obj)
        self._structural(kind, obj, field_validation)
        self._validate(kind, obj, None, None)
        if kind.key == CRD_KIND_KEY:
            self._check_crd(obj)
        if dry_run:
            return obj
        self._commit(kind, key, obj, None, "ADDED")
        return obj

    def _check_namespace_exists(self, namespace: str) -> None:
        if not self.require_namespaces or NAMESPACE_STORE not in self._store:
            return
        ns = self._store[NAMESPACE_STORE].get((None, namespace))
        if ns is None:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                {"name": namespace, "kind": "namespaces"},
            )
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated",
                {"name": namespace, "kind": "namespaces"},
            )

    def _check_name(self, kind: Kind, name: str) -> None:
        pattern, limit = (
            (_DNS_LABEL, 63) if kind.store_key == NAMESPACE_STORE else (_DNS_SUBDOMAIN, 253)
        )
        if len(name) > limit or not pattern.match(name):
            message = (
                f'Invalid value: "{name}": a lowercase RFC 1123 '
                f"{'label' if limit == 63 else 'subdomain'} must consist of lower case "
                "alphanumeric characters, '-' or '.', and must start and end with an "
                f"alphanumeric character (at most {limit} characters)"
            )
            raise _invalid(kind, name, [("metadata.name", message)])

    def _prepare_special(self, kind: Kind, obj: dict[str, Any]) -> None:
        if kind.store_key == NAMESPACE_STORE:
            obj.setdefault("status", {}).setdefault("phase", "Active")
        if kind.key == CRD_KIND_KEY:
            spec = obj.get("spec") or {}
            storage = [v["name"] for v in spec.get("versions", []) if v.get("storage")]
            obj["status"] = {
                "acceptedNames": copy.deepcopy(spec.get("names") or {}),
                "storedVersions": storage,
                "conditions": [
                    {
                        "type": "NamesAccepted",
                        "status": "True",
                        "reason": "NoConflicts",
                        "message": "no conflicts found",
                        "lastTransitionTime": _now(),
                    },
                    {
                        "type": "Established",
                        "status": "True",
                        "reason": "InitialNamesAccepted",
                        "message": "the initial names have been accepted",
                        "lastTransitionTime": _now(),
                    },
                ],
            }

    def _replace(
        self,
        kind: Kind,
        key: ObjKey,
        old: dict[str, Any],
        body: Any,
        subresource: str | None,
        *,
        dry_run: bool,
        field_validation: str = "",
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, "", key[1]):
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the "
                f"URL ({key[1]})"
            )
        if kind.namespaced and meta.get("namespace") not in (None, "", key[0]):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        if kind.crd_name is not None and not meta.get("resourceVersion"):
            # Custom resources allow no unconditional updates (built-in kinds mostly do).
            message = "Invalid value: 0x0: must be specified for an update"
            raise _invalid(kind, key[1], [("metadata.resourceVersion", message)])
        return self._update(
            kind, key, old, body, subresource, dry_run=dry_run, field_validation=field_validation
        )

    def _patch(
        self,
        kind: Kind,
        key: ObjKey,
        old: dict[str, Any],
        patch: Any,
        *,
        patch_type: str,
        subresource: str | None,
        dry_run: bool,
        field_validation: str = "",
    ) -> dict[str, Any]:
        try:
            match patch_type:
                case "json":
                    candidate = apply_json_patch(old, patch)
                case "merge" | "strategic":
                    if not isinstance(patch, dict):
                        raise _bad_request("a merge patch must be a JSON object")
                    if patch_type == "strategic" and kind.crd_name is not None:
                        raise ApiError(
                            415,
                            "UnsupportedMediaType",
                            "the body of the request was in an unknown format - accepted media "
                            "types include: application/json-patch+json, "
                            "application/merge-patch+json, application/apply-patch+yaml",
                        )
                    apply = (
                        apply_merge_patch if patch_type == "merge" else apply_strategic_merge_patch
                    )
                    candidate = apply(old, patch)
                case _:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"the emulator does not support the patch type {patch_type!r} "
                        "(server-side apply is not emulated)",
                    )
        except PatchFormatError as exc:
            raise _bad_request(str(exc)) from exc
        except PatchError as exc:
            raise ApiError(422, "Invalid", str(exc), kind.details(key[1])) from exc
        if not isinstance(candidate, dict):
            raise ApiError(422, "Invalid", "the patch must result in an object")
        return self._update(
            kind,
            key,
            old,
            candidate,
            subresource,
            dry_run=dry_run,
            field_validation=field_validation,
        )

    def _update(
        self,
        kind: Kind,
        key: ObjKey,
        old: dict[str, Any],
        candidate: dict[str, Any],
        subresource: str | None,
        *,
        dry_run: bool,
        field_validation: str = "",
    ) -> dict[str, Any]:
        old_meta = old["metadata"]
        given_meta = (
            candidate.get("metadata") if isinstance(candidate.get("metadata"), dict) else {}
        )
        given_rv = given_meta.get("resourceVersion") if given_meta else None
        if given_rv not in (None, "") and str(given_rv) != old_meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.qualified} "{key[1]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                kind.details(key[1]),
            )
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = copy.deepcopy(candidate["status"])
            else:
                new.pop("status", None)
            self._structural(kind, new, field_validation)
        else:
            new = copy.deepcopy(candidate)
            self._check_type_meta(kind, new)
            if kind.status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            meta = new.get("metadata")
            if not isinstance(meta, dict):
                meta = new["metadata"] = {}
            meta.pop("managedFields", None)
            meta.pop("selfLink", None)
            for name in _IMMUTABLE_METADATA:
                if name in old_meta:
                    meta[name] = old_meta[name]
                else:
                    meta.pop(name, None)
            if old_meta.get("deletionTimestamp"):
                added = [
                    f
                    for f in meta.get("finalizers") or []
                    if f not in (old_meta.get("finalizers") or [])
                ]
                if added:
                    raise _invalid(
                        kind,
                        key[1],
                        [
                            (
                                "metadata.finalizers",
                                "Forbidden: no new finalizers can be added if "
                                f"the object is being deleted, found new finalizers {added!r}",
                            )
                        ],
                    )
            self._structural(kind, new, field_validation)
        if json_equal(new, old):
            return old  # a no-op: no new resourceVersion, no watch event
        self._validate(kind, new, old, subresource)
        if kind.key == CRD_KIND_KEY and subresource is None:
            self._check_crd(new)
        if _spec_changed(old, new):
            new["metadata"]["generation"] = int(old_meta.get("generation", 1)) + 1
        if dry_run:
            return new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._commit(kind, key, new, old, "DELETED")
        else:
            self._commit(kind, key, new, old, "MODIFIED")
        return new

    def _delete(
        self,
        kind: Kind,
        key: ObjKey,
        old: dict[str, Any],
        options: Mapping[str, Any],
        *,
        dry_run: bool,
    ) -> dict[str, Any]:
        preconditions = options.get("preconditions") or {}
        meta = old["metadata"]
        for field_name in ("uid", "resourceVersion"):
            expected = preconditions.get(field_name)
            if expected not in (None, "") and str(expected) != str(meta.get(field_name)):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field_name} in precondition: {expected}, "
                    f"{field_name} in object meta: {meta.get(field_name)}",
                    kind.details(key[1]),
                )
        if meta.get("deletionTimestamp"):
            return old  # already being deleted: nothing changes
        if meta.get("finalizers"):
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["generation"] = int(meta.get("generation", 1)) + 1
            if not dry_run:
                self._commit(kind, key, new, old, "MODIFIED")
            return new
        final = _with_meta(old)
        if not dry_run:
            self._commit(kind, key, final, old, "DELETED")
        return final

    def _structural(self, kind: Kind, obj: dict[str, Any], field_validation: str) -> None:
        """Prune unknown fields and apply defaults; ``fieldValidation=Strict`` refuses unknowns."""
        if kind.schema is None:
            return
        if field_validation == "Strict":
            unknown = unknown_fields(kind.schema, obj)
            if unknown:
                raise _bad_request(
                    f'{kind.kind} in version "{kind.version}" cannot be handled as a '
                    f"{kind.kind}: strict decoding error: "
                    + ", ".join(f'unknown field "{path}"' for path in unknown)
                )
        prune_and_default(kind.schema, obj)

    def _validate(
        self,
        kind: Kind,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        subresource: str | None,
    ) -> None:
        if kind.validator is None:
            return
        messages = kind.validator(copy.deepcopy(obj), copy.deepcopy(old), subresource=subresource)
        if messages:
            causes = []
            for message in messages:
                path, sep, text = message.partition(": ")
                causes.append((path, text) if sep else ("", message))
            raise _invalid(kind, obj.get("metadata", {}).get("name", ""), causes)

    def _commit(
        self,
        kind: Kind,
        key: ObjKey,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        event_type: str,
    ) -> None:
        """Store (or remove) the object with a new resourceVersion and publish the event."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        store = self._store[kind.store_key]
        if event_type == "DELETED":
            store.pop(key, None)
        else:
            store[key] = obj
        history = self._history[kind.store_key]
        history.events.append(WatchEvent(self._rv, event_type, obj, old))
        excess = len(history.events) - self.history_limit
        if excess > max(1, self.history_limit // 10):
            history.trimmed_rv = history.events[excess - 1].rv
            del history.events[:excess]
        self._wake(kind.store_key)
        if self.garbage_collection:
            self._track_owners(kind, key, obj, old, event_type)
        if kind.key == CRD_KIND_KEY:
            if event_type == "DELETED":
                self._uninstall_crd(obj)
            else:
                self._install_crd(obj)

    def _track_owners(
        self,
        kind: Kind,
        key: ObjKey,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        event_type: str,
    ) -> None:
        ref = (kind.store_key, key)
        for owner in (old or {}).get("metadata", {}).get("ownerReferences") or []:
            self._dependents.get(owner.get("uid", ""), set()).discard(ref)
        uid = obj["metadata"]["uid"]
        if event_type == "DELETED":
            self._by_uid.pop(uid, None)
            for dependent in sorted(self._dependents.pop(uid, set()), key=repr):
                self._collect(dependent)
            return
        self._by_uid[uid] = ref
        for owner in obj["metadata"].get("ownerReferences") or []:
            self._dependents.setdefault(owner.get("uid", ""), set()).add(ref)

    def _collect(self, ref: tuple[StoreKey, ObjKey]) -> None:
        store_key, key = ref
        obj = self._store.get(store_key, {}).get(key)
        if obj is None:
            return
        owners = obj["metadata"].get("ownerReferences") or []
        if any(owner.get("uid") in self._by_uid for owner in owners):
            return
        kind = next((k for k in self._kinds.values() if k.store_key == store_key), None)
        if kind is not None:
            self._delete(kind, key, obj, {}, dry_run=False)

    # ---------------------------------------------------------------- list and watch

    def _list(
        self,
        kind: Kind,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        flt = self._filter(kind, namespace, None, label_selector, field_selector)
        start: tuple[str, str] | None = None
        if continue_token:
            try:
                namespace_name = json.loads(base64.urlsafe_b64decode(continue_token))
                start = (str(namespace_name[0]), str(namespace_name[1]))
            except (ValueError, IndexError, TypeError) as exc:
                raise _bad_request(f"invalid continue token: {exc}") from exc
        store = self._store.get(kind.store_key, {})
        keys = sorted(store, key=lambda k: (k[0] or "", k[1]))
        items: list[dict[str, Any]] = []
        remaining = 0
        last: tuple[str, str] | None = None
        for obj_key in keys:
            sort_key = (obj_key[0] or "", obj_key[1])
            if start is not None and sort_key <= start:
                continue
            obj = store[obj_key]
            if not flt.matches(obj):
                continue
            if limit is not None and len(items) >= limit:
                remaining += 1
                continue
            items.append(_served(kind, obj))
            last = sort_key
        metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if remaining and last is not None:
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps(last).encode()).decode()
            metadata["remainingItemCount"] = remaining
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": metadata,
            "items": items,
        }

    def _filter(
        self,
        kind: Kind,
        namespace: str | None,
        name: str | None,
        label_selector: str | None,
        field_selector: str | None,
    ) -> _Filter:
        try:
            labels = LabelSelector.parse(label_selector)
            fields = FieldSelector.parse(field_selector)
        except SelectorError as exc:
            raise _bad_request(str(exc)) from exc
        if kind.field_labels is not None:
            for path in sorted(fields.paths - kind.field_labels):
                raise _bad_request(f"field label not supported: {path}")
        return _Filter(namespace if kind.namespaced else None, name, labels, fields)

    def _wake(self, store_key: StoreKey | None = None) -> None:
        """Wake the watch streams of a resource (or all), from any thread."""
        watches = [w for key, ws in self._watches.items() if store_key in (None, key) for w in ws]
        if not watches or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            for watch in watches:
                watch.event.set()
        elif not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(_set_all, [w.event for w in watches])

    def close_watches(self) -> None:
        """End all watch streams (the server calls this before it stops)."""
        with self._mutex:
            self._closing = True
            self._wake()

    def _attach_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = False

    def _detach_loop(self) -> None:
        self._loop = None
        self._loop_thread = None

    # ---------------------------------------------------------------- HTTP

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw_request.read()
        path = parse_api_path(raw_request.path)
        query = dict(raw_request.query)
        record = RequestRecord(
            seq=0,
            method=raw_request.method.upper(),
            path=raw_request.path,
            query=query,
            verb=api_verb(raw_request.method, path, query),
            group=path.group,
            version=path.version,
            plural=path.plural,
            namespace=path.namespace,
            name=path.name,
            subresource=path.subresource,
            content_type=raw_request.content_type if body else None,
        )
        with self._mutex:
            self._seq += 1
            record.seq = self._seq
            self._records.append(record)
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = self._make_request(raw_request, path, query, body)
            self._requests.append(request)
            try:
                response = await self._handle(request)
            except rendering.StreamingError as exc:
                raw_response = exc.args[0]
                raise (exc.__cause__ or exc) from None
        except asyncio.CancelledError:
            record.status = 499  # the client closed the connection (e.g. a watch ended by it)
            raise
        except Exception as exc:
            self.server_errors.append(exc)
            if self._errors:
                self._errors[-1].append(exc)
            if raw_response is None or not raw_response.prepared:
                response = await self._render_error(exc)
            else:
                await self._stream_error(exc, raw_response)
                await raw_response.write_eof()
                response = raw_response
        record.status = response.status
        return response

    def _make_request(
        self,
        raw_request: aiohttp.web.BaseRequest,
        path: ApiPath,
        query: dict[str, str],
        body: bytes,
    ) -> kmock.Request:
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        resource = (
            kmock.resource(group=path.group, version=path.version, plural=path.plural)
            if path.group is not None
            else None
        )
        kmock_path = parsing.ParsedPath(
            path.group, path.version, path.plural, path.namespace, path.name, path.subresource
        )
        method = enums.method(raw_request.method)
        return kmock.Request(
            id=self._seq,
            raw_request=raw_request,
            url=raw_request.url,
            method=method,
            params=query,
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            data=data,
            body=body,
            text=body.decode("utf-8", errors="replace"),
            action=parsing.guess_k8s(kmock_path, method, query),
            resource=resource,
            namespace=path.namespace,
            name=path.name,
            subresource=path.subresource,
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # 1. Reactions injected by the test (emulator[...] << ...) win over the emulation.
        if len(self._payloads) != len(self._builtin_payloads):
            user = [p for p in self._payloads if id(p) not in self._builtin_payloads]
            response = await self._react(request, user)
            if response is not None:
                return response
        # 2. Resource requests: the emulation.
        if request.resource is not None and request.resource.plural is not None:
            try:
                return await self._serve_resource(request)
            except ApiError as exc:
                return _json_response(exc.status(), exc.code)
        # 3. Discovery and the rest: kmock's scaffold.
        builtin = [p for p in self._payloads if id(p) in self._builtin_payloads]
        response = await self._react(request, builtin)
        if response is None:
            return _json_response(_not_found_endpoint().status(), 404)
        return response

    async def _react(
        self, request: kmock.Request, payloads: list[kmock.Reaction]
    ) -> aiohttp.web.StreamResponse | None:
        # As kmock's RawHandler._handle, but without re-checking every recorded request.
        priorities = [payload.priorities for payload in payloads]
        width = max((len(p) for p in priorities), default=0)
        keys = [tuple(-x for x in p) + (0,) * (width - len(p)) for p in priorities]
        order = sorted(range(len(payloads)), key=lambda i: keys[i])
        for index in order:
            payload = payloads[index]
            if payload._disabled.is_set() or not self._sees(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:
                payload._disabled.set()
            except NotImplementedError:
                pass
        return None

    def _sees(self, view: kmock.View, request: kmock.Request) -> bool:
        """Whether a DSL view sees the request, in O(depth) instead of O(all requests)."""
        match view:
            case kmock.Root():
                return view is self
            case kmock.Filter():
                return bool(view.criteria(request)) and self._sees(view._source, request)
            case kmock.Priority():
                return self._sees(view._source, request)
            case kmock.OrGroup():
                return any(self._sees(source, request) for source in view._sources)
            case kmock.AndGroup():
                return all(self._sees(source, request) for source in view._sources)
            case kmock.Exclusion():
                return self._sees(view._source, request) and not any(
                    self._sees(excluded, request) for excluded in view._exclusions
                )
            case _:  # slices, streams: kmock's own (materializing) check
                return request in view

    async def _serve_resource(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        raw = request._raw_request
        assert raw is not None
        path = parse_api_path(raw.path)
        verb = api_verb(request.method.value, path, request.params)
        query = request.params
        with self._mutex:
            kind = self._kinds.get((path.group or "", path.version or "", path.plural or ""))
        if kind is None:
            raise _not_found_endpoint()
        if path.namespace is not None and not kind.namespaced:
            raise _not_found_endpoint()
        if path.subresource is not None and path.subresource not in kind.subresources:
            raise _not_found_endpoint()
        if path.subresource not in (None, "status"):
            raise ApiError(
                404,
                "NotFound",
                f"the subresource {path.subresource!r} is not emulated; inject a reaction",
            )
        if verb is None or verb not in kind.verbs:
            raise ApiError(
                405, "MethodNotAllowed", f"the server does not allow this method on {kind.plural}"
            )
        if verb == "watch":
            return await self._stream_watch(request, kind, path)
        dry_run = query.get("dryRun") == "All"
        strictness = query.get("fieldValidation", "")
        data = request.data
        if request.body and data is None:
            raise _bad_request("the body of the request was in an unknown format (not JSON)")
        with self._mutex:
            match verb:
                case "list":
                    limit = (
                        int(query["limit"]) if query.get("limit", "0") not in ("", "0") else None
                    )
                    body = self._list(
                        kind,
                        path.namespace,
                        query.get("labelSelector"),
                        query.get("fieldSelector"),
                        limit=limit,
                        continue_token=query.get("continue"),
                    )
                    return _json_response(body)
                case "get":
                    assert path.name is not None
                    _, obj = self._existing(kind, path.namespace, path.name, path.subresource)
                    return _json_response(_served(kind, obj))
                case "create":
                    if path.subresource is not None:
                        raise _not_found_endpoint()
                    obj = self._create(
                        kind, data, path.namespace, dry_run=dry_run, field_validation=strictness
                    )
                    return _json_response(_served(kind, obj), 201)
                case "update":
                    assert path.name is not None
                    key, old = self._existing(kind, path.namespace, path.name, path.subresource)
                    obj = self._replace(
                        kind,
                        key,
                        old,
                        data,
                        path.subresource,
                        dry_run=dry_run,
                        field_validation=strictness,
                    )
                    return _json_response(_served(kind, obj))
                case "patch":
                    assert path.name is not None
                    key, old = self._existing(kind, path.namespace, path.name, path.subresource)
                    patch_type = _PATCH_TYPES.get(raw.content_type, "unsupported")
                    obj = self._patch(
                        kind,
                        key,
                        old,
                        data,
                        patch_type=patch_type,
                        subresource=path.subresource,
                        dry_run=dry_run,
                        field_validation=strictness,
                    )
                    return _json_response(_served(kind, obj))
                case "delete":
                    assert path.name is not None
                    key, old = self._existing(kind, path.namespace, path.name, None)
                    options = data if isinstance(data, dict) else {}
                    obj = self._delete(kind, key, old, options, dry_run=dry_run)
                    return _json_response(_served(kind, obj))
                case "deletecollection":
                    listed = self._list(
                        kind,
                        path.namespace,
                        query.get("labelSelector"),
                        query.get("fieldSelector"),
                    )
                    for item in listed["items"]:
                        meta = item["metadata"]
                        key = (meta.get("namespace"), meta["name"])
                        current = self._store[kind.store_key].get(key)
                        if current is not None:
                            self._delete(kind, key, current, {}, dry_run=dry_run)
                    return _json_response(
                        {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Success",
                        }
                    )
        raise _not_found_endpoint()  # pragma: no cover

    async def _stream_watch(
        self, request: kmock.Request, kind: Kind, path: ApiPath
    ) -> aiohttp.web.StreamResponse:
        query = request.params
        allow_bookmarks = _bool_param(query, "allowWatchBookmarks")
        send_initial = _bool_param(query, "sendInitialEvents")
        timeout: float | None = None
        if query.get("timeoutSeconds"):
            try:
                timeout = float(query["timeoutSeconds"])
            except ValueError as exc:
                raise _bad_request(f"invalid timeoutSeconds: {exc}") from exc
        since = query.get("resourceVersion", "")
        loop = asyncio.get_running_loop()
        watch = _Watch(asyncio.Event(), kind.store_key)
        gone: str | None = None
        with self._mutex:
            flt = self._filter(
                kind,
                path.namespace,
                path.name,
                query.get("labelSelector"),
                query.get("fieldSelector"),
            )
            initial: list[dict[str, Any]] = []
            unversioned = since in ("", "0")
            # Without a resourceVersion (or with "0") the real server starts the watch with
            # synthetic ADDED events for the current state ("Get State and Start at Most
            # Recent" / "Start at Any"); sendInitialEvents=true asks for them explicitly.
            explicitly_not = query.get("sendInitialEvents", "").lower() == "false"
            if send_initial or (unversioned and not explicitly_not):
                store = self._store[kind.store_key]
                keys = sorted(store, key=lambda k: (k[0] or "", k[1]))
                initial = [_served(kind, store[k]) for k in keys if flt.matches(store[k])]
            if send_initial or unversioned:
                cursor = self._rv
            else:
                try:
                    cursor = int(since)
                except ValueError as exc:
                    raise _bad_request(f"invalid resourceVersion {since!r}") from exc
                if cursor < self._history[kind.store_key].trimmed_rv:
                    gone = since
            self._watches.setdefault(kind.store_key, set()).add(watch)
        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request._raw_request)  # type: ignore[arg-type]
            if gone is not None:
                await _write_event(response, "ERROR", _expired(gone, self._history[kind.store_key]))
                await response.write_eof()
                return response
            for obj in initial:
                await _write_event(response, "ADDED", obj)
            if send_initial and allow_bookmarks:
                bookmark = _bookmark(kind, cursor, initial_end=True)
                await _write_event(response, "BOOKMARK", bookmark)
            deadline = loop.time() + timeout if timeout is not None else math.inf
            next_bookmark = loop.time() + self.bookmark_interval
            while not self._closing:
                watch.event.clear()
                with self._mutex:
                    if kind.key not in self._kinds:
                        break
                    history = self._history[kind.store_key]
                    if cursor < history.trimmed_rv:
                        expired = _expired(str(cursor), history)
                        pending: list[tuple[str, dict[str, Any]]] = [("ERROR", expired)]
                    else:
                        index = bisect.bisect_right(history.events, cursor, key=lambda e: e.rv)
                        events = history.events[index:]
                        pending = [t for e in events if (t := _transform(kind, e, flt))]
                        cursor = max(cursor, self._rv)
                for event_type, obj in pending:
                    await _write_event(response, event_type, obj)
                if pending and pending[-1][0] == "ERROR":
                    break
                now = loop.time()
                if now >= deadline:
                    break
                if allow_bookmarks and now >= next_bookmark:
                    await _write_event(response, "BOOKMARK", _bookmark(kind, cursor))
                    next_bookmark = now + self.bookmark_interval
                wait = min(deadline - now, 1.0)
                if allow_bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.event.wait(), timeout=wait)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            with self._mutex:
                self._watches.get(kind.store_key, set()).discard(watch)
        return response


_PATCH_TYPES = {
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/json-patch+json": "json",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+cbor": "apply",
}


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def _with_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy with its own metadata dict (the stored object is never mutated)."""
    return {**obj, "metadata": dict(obj["metadata"])}


def _served(kind: Kind, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as served under this version (no conversion: apiVersion only)."""
    if obj.get("apiVersion") == kind.api_version:
        return obj
    return {**obj, "apiVersion": kind.api_version}


def _spec_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = (set(old) | set(new)) - {"metadata", "status", "apiVersion", "kind"}
    return any(not json_equal(old.get(key), new.get(key)) for key in keys)


def _invalid(kind: Kind, name: str, causes: list[tuple[str, str]]) -> ApiError:
    texts = [f"{path}: {message}" if path else message for path, message in causes]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: dict[str, Any] = {"name": name, "kind": kind.kind}
    if kind.group:
        details["group"] = kind.group
    details["causes"] = [
        {"reason": "FieldValueInvalid", "message": message, "field": path}
        for path, message in causes
    ]
    return ApiError(
        422, "Invalid", f'{kind.qualified_kind} "{name}" is invalid: {summary}', details
    )


def _transform(kind: Kind, event: WatchEvent, flt: _Filter) -> tuple[str, dict[str, Any]] | None:
    """What a watcher with this filter sees of an event (the real cacher's rules)."""
    now_in = flt.matches(event.obj)
    if event.type != "MODIFIED":
        return (event.type, _served(kind, event.obj)) if now_in else None
    was_in = flt.matches(event.old)
    if now_in:
        return ("MODIFIED" if was_in else "ADDED", _served(kind, event.obj))
    if was_in and event.old is not None:
        # Leaving the selection: DELETED with the previous content at the event's version.
        gone = _with_meta(event.old)
        gone["metadata"]["resourceVersion"] = str(event.rv)
        return ("DELETED", _served(kind, gone))
    return None


def _bookmark(kind: Kind, rv: int, *, initial_end: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}


def _expired(since: str, history: _History) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {since} ({history.trimmed_rv + 1})",
        "reason": "Expired",
        "code": 410,
    }


async def _write_event(
    response: aiohttp.web.StreamResponse, event_type: str, obj: Mapping[str, Any]
) -> None:
    line = json.dumps({"type": event_type, "object": obj}, separators=(",", ":"))
    await response.write(line.encode() + b"\n")


# --------------------------------------------------------------------------------------------
# Running it: in a loop, in a thread; kopf in a thread; clients
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    emulator: KubeEmulator, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the emulator over HTTP in the running loop; yields its URL (port 0: a free one)."""
    async with emulator:
        emulator._attach_loop()
        server = aiohttp.web.Server(emulator, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = aiohttp.web.TCPSite(runner, host, port)
            await site.start()
            actual_port = runner.addresses[0][1]
            yield f"http://{host}:{actual_port}"
        finally:
            emulator.close_watches()
            await runner.cleanup()
            emulator._detach_loop()


class EmulatorThread:
    """The emulator served in its own thread and event loop, for synchronous tests."""

    def __init__(
        self,
        emulator: KubeEmulator | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "kube-emulator",
    ) -> None:
        self.emulator = emulator if emulator is not None else KubeEmulator()
        self.host = host
        self.port = port
        self._url: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulator is not running")
        return self._url

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the emulator is not running")
        return self._loop

    def start(self, timeout: float = 10.0) -> Self:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the emulator did not start")
        if self._error is not None:
            raise RuntimeError("the emulator failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the emulator did not stop")

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run a coroutine in the emulator's loop and wait for its result."""

        async def runner() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self.emulator, self.host, self.port) as url:
            self._url = url
            self._started.set()
            await self._stop.wait()


class KopfThread:
    """A kopf operator in its own thread and loop, logged in to the emulator.

    Use a fresh ``kopf.OperatorRegistry()`` per operator: a login handler pointing at
    ``server`` is added to it. Runs ``standalone`` (no peering). ``start()`` returns
    when kopf is ready; its watches open a little later, so wait for them with
    ``emulator.wait_for_watches(resource)`` before creating objects.
    """

    def __init__(
        self,
        registry: Any,
        server: str,
        *,
        settings: Any = None,
        clusterwide: bool = True,
        namespaces: Iterable[str] = (),
        memo: Any = None,
        name: str = "kopf",
    ) -> None:
        import kopf  # noqa: PLC0415  # only tests that run kopf pay for importing it

        self.registry = registry
        self.server = server
        self.settings = settings if settings is not None else kopf.OperatorSettings()
        self.clusterwide = clusterwide
        self.namespaces = list(namespaces)
        self.memo = memo
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._error: BaseException | None = None

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=server, insecure=True, default_namespace="default")

        kopf.on.login(registry=registry, id="kube-emulator-login")(login)

    def start(self, timeout: float = 15.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.01):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._stop.set()
                self._thread.join(timeout)
                raise RuntimeError("kopf did not get ready") from self._error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop kopf; re-raise (as RuntimeError) if it crashed while running."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("kopf did not stop")
        if self._error is not None:
            raise RuntimeError("kopf crashed while running") from self._error

    @property
    def error(self) -> BaseException | None:
        return self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        import kopf  # noqa: PLC0415

        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    standalone=True,
                    clusterwide=self.clusterwide,
                    namespaces=self.namespaces,
                    memo=self.memo,
                    ready_flag=self._ready,
                    stop_flag=self._stop,
                )
            )
        except BaseException as exc:  # reported by stop()
            self._error = exc


def write_kubeconfig(path: str | Path, server: str, *, namespace: str = "default") -> Path:
    """A kubeconfig pointing at the emulator (a dummy token; no TLS)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
    }
    target = Path(path)
    target.write_text(yaml.safe_dump(config))
    return target


def api_client_for(server: str) -> Any:
    """An official-client ``ApiClient`` for the emulator (close it, or use ``with``)."""
    import kubernetes  # noqa: PLC0415

    configuration = kubernetes.client.Configuration()
    configuration.host = server
    configuration.api_key = {"BearerToken": "emulator"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return kubernetes.client.ApiClient(configuration)


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "the condition",
) -> None:
    """Poll a condition until it holds, or fail with AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# nodemem's setup: built-ins, namespaces, our CRDs with their validator
# --------------------------------------------------------------------------------------------

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def load_crds(directory: str | Path = CRD_DIR) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions in a directory of YAML files (nodemem's ``crds/``)."""
    crds: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                crds.append(document)
    return crds


def crd_validator_factory() -> ValidatorFactory | None:
    """``crd_schema.CrdValidator`` (OpenAPI + CEL) as a validator factory, if it is there.

    Only a missing ``crd_schema.py`` means "no validation"; if the module exists but
    fails to import (say, a dependency is not installed), that error is raised.
    """
    if not (Path(__file__).with_name("crd_schema.py")).exists():
        return None
    from crd_schema import CrdValidator  # noqa: PLC0415  # written separately, optional

    def factory(crd: dict[str, Any]) -> Validator:
        return CrdValidator(crd).validate

    return factory


def make_emulator(
    *, crds: Iterable[Mapping[str, Any]] | None = None, **options: Any
) -> KubeEmulator:
    """An emulator as nodemem's tests use it: built-ins, the usual namespaces, our CRDs.

    ``crds`` defaults to the files in ``crds/``; ``options`` go to :class:`KubeEmulator`.
    """
    options.setdefault("validator_factory", crd_validator_factory())
    emulator = KubeEmulator(**options)
    emulator.declare_builtins()
    for namespace in DEFAULT_NAMESPACES:
        emulator.create_object("v1/namespaces", {"metadata": {"name": namespace}})
    for crd in load_crds() if crds is None else crds:
        emulator.register_crd(crd)
    return emulator

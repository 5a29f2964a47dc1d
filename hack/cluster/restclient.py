"""A small REST client and audit-log reader for the real control plane (controlplane.py),
shared by the tests (tests/kube) and the benches (bench/); standard library only.

- :class:`Kube`: plain synchronous REST calls, one keep-alive HTTPS connection per thread
  (so a thread pool can create thousands of objects), as the admin (a client certificate
  in system:masters) or with a bearer token. Resources are named like ``"v1/nodes"`` or
  ``"nodemem.dev/v1alpha1/nodememorypolicies"``; errors raise :class:`ApiError` with the
  server's status and message.
- :class:`AuditLog`: the API server's own audit log (level Metadata, one JSON line per
  request stage), which is how tests and benches count who sent which request:
  ``mark()`` a position, then ``requests(since=..., user=..., verb=..., resource=...)``.
- :func:`wait_until`: poll a condition with a deadline.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
READ_VERBS = frozenset({"get", "list", "watch"})


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "the condition",
) -> None:
    """Poll until ``predicate()`` is true, or fail with AssertionError after ``timeout`` s
    (``message`` may be a function: what it says then, e.g. the state reached)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s waiting for {said}")
        time.sleep(interval)


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        self.status = status
        self.body = body
        self.message = body.get("message", "") if isinstance(body, dict) else body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        super().__init__(f"HTTP {status}: {self.message}")


def resource_path(resource: str, name: str | None = None, *, namespace: str | None = None) -> str:
    """``"v1/pods"`` -> ``/api/v1/namespaces/NS/pods[/NAME]``; groups under /apis."""
    *group_version, plural = resource.split("/")
    path = ("/api/" if len(group_version) == 1 else "/apis/") + "/".join(group_version)
    if namespace is not None:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{urllib.parse.quote(name, safe='')}"
    return path


class Kube:
    """REST calls over one keep-alive HTTPS connection per thread."""

    def __init__(
        self,
        url: str,
        context: ssl.SSLContext,
        *,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.url = url
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.context = context
        self.token = token  # a bearer token (a ServiceAccount's) sent with every request
        self.timeout = timeout
        self.headers = {"Accept": "application/json"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPSConnection:
        connection: http.client.HTTPSConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=self.timeout
            )
            self._local.connection = connection
        return connection

    def close(self) -> None:
        """Close this thread's connection (the next request opens another)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> Any:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        # A kept-alive connection the server has closed fails at once: once more on a new
        # one. A server that is down fails twice.
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        if response.status >= 400:
            raw = payload.decode(errors="replace")
            try:
                raise ApiError(response.status, json.loads(raw))
            except ValueError:
                raise ApiError(response.status, raw) from None
        return json.loads(payload) if payload else None

    def create_object(
        self, resource: str, obj: dict[str, Any], *, namespace: str | None = None
    ) -> Any:
        return self.request("POST", resource_path(resource, namespace=namespace), obj)

    def get_object(self, resource: str, name: str, *, namespace: str | None = None) -> Any:
        try:
            return self.request("GET", resource_path(resource, name, namespace=namespace))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list_objects(
        self, resource: str, *, namespace: str | None = None, **query: str
    ) -> list[dict[str, Any]]:
        answer = self.request("GET", resource_path(resource, namespace=namespace), query=query)
        items: list[dict[str, Any]] = answer["items"]
        return items

    def patch_object(
        self,
        resource: str,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
        namespace: str | None = None,
    ) -> Any:
        path = resource_path(resource, name, namespace=namespace)
        if subresource:
            path += f"/{subresource}"
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete_object(
        self, resource: str, name: str, *, namespace: str | None = None, missing_ok: bool = False
    ) -> Any:
        try:
            return self.request("DELETE", resource_path(resource, name, namespace=namespace))
        except ApiError as error:
            if missing_ok and error.status == 404:
                return None
            raise

    def ensure_namespace(self, name: str) -> None:
        try:
            self.create_object("v1/namespaces", {"metadata": {"name": name}})
        except ApiError as error:
            if error.status != 409:
                raise

    def service_account_token(
        self,
        namespace: str,
        service_account: str,
        *,
        pod: dict[str, Any] | None = None,
        expiration: int = 3600,
    ) -> str:
        """A TokenRequest; bound to ``pod`` (its metadata name and uid) when given."""
        spec: dict[str, Any] = {"expirationSeconds": expiration}
        if pod is not None:
            spec["boundObjectRef"] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        path = resource_path("v1/serviceaccounts", service_account, namespace=namespace)
        answer = self.request("POST", path + "/token", {"spec": spec})
        token: str = answer["status"]["token"]
        return token


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class AuditEvent:
    verb: str
    user: str
    stage: str
    code: int | None
    resource: str  # "group/version/plural" as in Kube's resource names ("v1/nodes")
    name: str | None
    subresource: str | None
    namespace: str | None
    uri: str
    audit_id: str = ""
    received: float = 0.0  # requestReceivedTimestamp, seconds since the epoch
    completed: float = 0.0  # stageTimestamp: when this stage was reached

    @property
    def plural(self) -> str:
        return self.resource.rsplit("/", 1)[-1]


class AuditLog:
    """The API server's audit log file, read incrementally. Positions are byte offsets.

    kube-apiserver logs a request's ResponseComplete stage after it has sent the response,
    so a client can see a write's effect (a GET that 404s) before that write is logged.
    With a ``kube`` client, every query first sends a request of its own and waits until
    the log holds it: requests answered before the query are then logged too.
    """

    def __init__(self, path: Path, kube: Kube | None = None) -> None:
        self.path = path
        self.kube = kube
        self._barriers = itertools.count()

    def mark(self) -> int:
        """A position: events after it are those of requests sent from now on."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def events(self, since: int = 0, until: int | None = None) -> list[AuditEvent]:
        try:
            with open(self.path, "rb") as log:
                log.seek(since)
                data = log.read() if until is None else log.read(max(0, until - since))
        except FileNotFoundError:
            return []
        events = []
        for line in data.splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue  # the last line may still be being written
            ref = raw.get("objectRef") or {}
            group, version = ref.get("apiGroup"), ref.get("apiVersion", "")
            plural = ref.get("resource", "")
            events.append(
                AuditEvent(
                    verb=raw.get("verb", ""),
                    user=(raw.get("user") or {}).get("username", ""),
                    stage=raw.get("stage", ""),
                    code=(raw.get("responseStatus") or {}).get("code"),
                    resource=f"{group}/{version}/{plural}" if group else f"{version}/{plural}",
                    name=ref.get("name"),
                    subresource=ref.get("subresource"),
                    namespace=ref.get("namespace"),
                    uri=raw.get("requestURI", ""),
                    audit_id=raw.get("auditID", ""),
                    received=_epoch(raw.get("requestReceivedTimestamp")),
                    completed=_epoch(raw.get("stageTimestamp")),
                )
            )
        return events

    def barrier(self, timeout: float = 10.0) -> None:
        """Until a request sent now is in the log (after any answered before it)."""
        if self.kube is None:
            return
        name = f"nodemem-audit-barrier-{os.getpid()}-{next(self._barriers)}"
        since = self.mark()
        self.kube.get_object("v1/namespaces", name)  # 404: an audited request, no object
        wait_until(
            lambda: any(
                e.stage == "ResponseComplete" and e.name == name for e in self.events(since)
            ),
            timeout=timeout,
            message=f"the audit log to hold request {name}",
        )

    def requests(
        self,
        *,
        since: int = 0,
        until: int | None = None,
        user: str | None = None,
        verb: str | Iterable[str] | None = None,
        resource: str | None = None,
        subresource: str | None = None,
    ) -> list[AuditEvent]:
        """Completed requests (ResponseComplete: one event per request) matching every
        filter given. A watch completes when it ends; :meth:`wait_for_watch` and
        :meth:`sent` tell the ones that started."""
        if until is None:
            self.barrier()
        verbs = {verb} if isinstance(verb, str) else (set(verb) if verb is not None else None)
        return [
            event
            for event in self.events(since, until)
            if event.stage in ("ResponseComplete", "Panic")
            and (user is None or event.user == user)
            and (verbs is None or event.verb in verbs)
            and (resource is None or event.resource == resource)
            and (subresource is None or event.subresource == subresource)
        ]

    def writes(
        self, *, since: int = 0, user: str | None = None, resource: str | None = None
    ) -> list[AuditEvent]:
        return self.requests(since=since, user=user, verb=WRITE_VERBS, resource=resource)

    def sent(
        self, *, since: int = 0, until: int | None = None, user: str | None = None
    ) -> list[AuditEvent]:
        """Requests as they were sent, each once: a watch when its stream started
        (ResponseStarted; its ResponseComplete, when it ends, is not counted again), any
        other request (and a watch refused before it started) when it completed."""
        return [
            event
            for event in self.events(since, until)
            if (user is None or event.user == user)
            and (
                event.stage == "ResponseStarted"
                or (
                    event.stage in ("ResponseComplete", "Panic")
                    and not (event.verb == "watch" and event.code == 200)
                )
            )
        ]

    def per_user(self, *, since: int = 0, until: int | None = None) -> Counter[str]:
        return Counter(event.user for event in self.requests(since=since, until=until))

    def follow(self, since: int = 0) -> AuditTail:
        return AuditTail(self, since)

    def wait_for_watch(
        self, resource: str, *, user: str, since: int = 0, timeout: float = 20.0
    ) -> None:
        """Until ``user`` has a watch on ``resource`` open (its ResponseStarted stage)."""

        def started() -> bool:
            return any(
                e.stage == "ResponseStarted"
                and e.verb == "watch"
                and e.user == user
                and e.resource == resource
                for e in self.events(since)
            )

        wait_until(started, timeout=timeout, message=f"a watch on {resource} by {user}")


class AuditTail:
    """New events as they are written, from a position on (only whole lines)."""

    def __init__(self, audit: AuditLog, since: int) -> None:
        self.audit = audit
        self.position = since

    def read(self) -> list[AuditEvent]:
        end = self.audit.mark()
        try:
            with open(self.audit.path, "rb") as log:
                log.seek(self.position)
                data = log.read(max(0, end - self.position))
        except FileNotFoundError:
            return []
        whole = data.rfind(b"\n") + 1
        events = self.audit.events(self.position, self.position + whole)
        self.position += whole
        return events

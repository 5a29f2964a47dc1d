"""The tests' side of the real control plane (hack/cluster/controlplane.py).

- :class:`Kube`: plain synchronous REST calls as the admin (a client certificate in
  system:masters), with resources named like ``"v1/nodes"`` or
  ``"nodemem.dev/v1alpha1/nodememorypolicies"``. Errors raise :class:`ApiError` with the
  server's status and message.
- :class:`AuditLog`: the API server's own audit log (level Metadata, one JSON line per
  request stage), which is how the tests count who sent which request: ``mark()`` a
  position, then ``requests(since=..., user=..., verb=..., resource=...)``.
- :func:`wait_until`: poll a condition with a deadline.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    message: str = "the condition",
) -> None:
    """Poll until ``predicate()`` is true, or fail with AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        self.status = status
        self.body = body
        self.message = body.get("message", "") if isinstance(body, dict) else body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        super().__init__(f"HTTP {status}: {self.message}")


def resource_path(resource: str, name: str | None = None, *, namespace: str | None = None) -> str:
    """``"v1/pods"`` → ``/api/v1/namespaces/NS/pods[/NAME]``; groups under /apis."""
    *group_version, plural = resource.split("/")
    prefix = "/api/" if len(group_version) == 1 else "/apis/"
    path = prefix + "/".join(group_version)
    if namespace is not None:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{urllib.parse.quote(name, safe='')}"
    return path


class Kube:
    """The admin's REST client. Methods mirror what the tests need, nothing more."""

    def __init__(self, url: str, context: ssl.SSLContext, *, token: str | None = None) -> None:
        self.url = url
        self.context = context
        self.token = token  # a bearer token (a ServiceAccount's) sent with every request

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raw = error.read().decode(errors="replace")
            try:
                raise ApiError(error.code, json.loads(raw)) from None
            except ValueError:
                raise ApiError(error.code, raw) from None
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


@dataclass(frozen=True)
class AuditEvent:
    verb: str
    user: str
    stage: str
    code: int | None
    resource: str  # "group/version/plural" as in Kube's resource names ("v1/nodes")
    name: str | None
    subresource: str | None
    uri: str

    @property
    def plural(self) -> str:
        return self.resource.rsplit("/", 1)[-1]


class AuditLog:
    """The API server's audit log file, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """A position: events after it are those of requests sent from now on."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def events(self, since: int = 0) -> list[AuditEvent]:
        try:
            with open(self.path, "rb") as log:
                log.seek(since)
                data = log.read()
        except FileNotFoundError:
            return []
        events = []
        for line in data.splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue  # the last line may still be being written
            ref = raw.get("objectRef") or {}
            group = ref.get("apiGroup")
            version = ref.get("apiVersion", "")
            resource = (
                f"{group}/{version}/{ref.get('resource', '')}"
                if group
                else f"{version}/{ref.get('resource', '')}"
            )
            events.append(
                AuditEvent(
                    verb=raw.get("verb", ""),
                    user=raw.get("user", {}).get("username", ""),
                    stage=raw.get("stage", ""),
                    code=(raw.get("responseStatus") or {}).get("code"),
                    resource=resource,
                    name=ref.get("name"),
                    subresource=ref.get("subresource"),
                    uri=raw.get("requestURI", ""),
                )
            )
        return events

    def requests(
        self,
        *,
        since: int = 0,
        user: str | None = None,
        verb: str | Iterable[str] | None = None,
        resource: str | None = None,
    ) -> list[AuditEvent]:
        """Completed requests (one event each) matching every filter given."""
        verbs = {verb} if isinstance(verb, str) else (set(verb) if verb is not None else None)
        found = []
        for event in self.events(since):
            if event.stage != "ResponseComplete":
                continue
            if user is not None and event.user != user:
                continue
            if verbs is not None and event.verb not in verbs:
                continue
            if resource is not None and event.resource != resource:
                continue
            found.append(event)
        return found

    def writes(
        self, *, since: int = 0, user: str | None = None, resource: str | None = None
    ) -> list[AuditEvent]:
        return self.requests(since=since, user=user, verb=WRITE_VERBS, resource=resource)

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

"""Connecting to the API server: one client configuration for the official client and
for kopf, from in-cluster credentials or a kubeconfig file. Shared by agent and
controller (neither may import the other). kopf is the controller's alone: imported by
`kopf_login` when called, so the agent, which uses `load_client_config` only, never
loads it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

if TYPE_CHECKING:
    import kopf


def load_client_config(kubeconfig: str | None = None) -> k8s.Configuration:
    """In-cluster service account first, else the kubeconfig (`kubeconfig` or default)."""
    configuration = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
        return configuration
    try:
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return configuration


def kopf_login(configuration: k8s.Configuration) -> Callable[..., kopf.ConnectionInfo]:
    """A kopf on.login handler that uses exactly `configuration` (kopf's own helpers
    would load the default kubeconfig again, ignoring an explicit file)."""
    import kopf  # noqa: PLC0415  (the controller's alone; see the module docstring)

    def login(**_: Any) -> kopf.ConnectionInfo:
        header = configuration.get_api_key_with_prefix(
            "BearerToken"
        ) or configuration.get_api_key_with_prefix("authorization")
        scheme, _space, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            insecure=not configuration.verify_ssl,
            scheme=scheme or ("Bearer" if token else None),
            token=token or None,
            certificate_path=configuration.cert_file,
            private_key_path=configuration.key_file,
        )

    return login

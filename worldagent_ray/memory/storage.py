"""Where the memory table lives: local folders, and object-store options from the environment.

LanceDB opens ``s3://bucket/prefix`` URIs itself; it needs credentials, a region and, for an
S3-compatible server (MinIO, Ceph, a test server on 127.0.0.1), an endpoint. Those come from
the process environment only, never from a config file, so a profile can say
``memory.uri: s3://bucket/runs`` and each node supplies its own credentials. Pure core (no Ray).
"""

from __future__ import annotations

import os
from typing import Mapping

#: Per-request bounds for object-store calls (so a stalled connection fails and is retried).
DEFAULT_OBJECT_STORE_TIMEOUTS: dict[str, str] = {"timeout": "60s", "connect_timeout": "10s"}

# (storage option, environment variables in order of preference)
_S3_ENV: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aws_access_key_id", ("AWS_ACCESS_KEY_ID",)),
    ("aws_secret_access_key", ("AWS_SECRET_ACCESS_KEY",)),
    ("aws_session_token", ("AWS_SESSION_TOKEN",)),
    ("aws_region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
    ("aws_endpoint", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")),
    ("allow_http", ("AWS_ALLOW_HTTP",)),
)


def is_local_uri(uri: str) -> bool:
    """True for a plain path or a ``file://`` URI."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def storage_options_from_env(uri: str, environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """LanceDB ``storage_options`` for ``uri`` from environment variables; ``None`` for local URIs.

    For ``s3://`` (and ``s3a://``): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), the endpoint from
    ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT`` (an ``http://`` endpoint
    also sets ``allow_http``), and ``AWS_ALLOW_HTTP``. Unset variables are left out, so
    LanceDB's own credential chain (instance roles, profiles) still applies. Every object store
    also gets request timeouts (:data:`DEFAULT_OBJECT_STORE_TIMEOUTS`).

    Args:
        uri (`str`): The memory URI.
        environ (`Mapping[str, str]`, *optional*): The environment (default ``os.environ``).
    """
    if is_local_uri(uri):
        return None
    env = os.environ if environ is None else environ
    options = dict(DEFAULT_OBJECT_STORE_TIMEOUTS)
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        for key, names in _S3_ENV:
            value = next((env[n] for n in names if env.get(n)), None)
            if value is not None:
                options[key] = value
        if options.get("aws_endpoint", "").startswith("http://"):
            options.setdefault("allow_http", "true")
    return options

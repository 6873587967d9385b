"""The one filesystem layer: local paths, ``file://`` and ``s3://`` URIs (fsspec, s3fs, pyarrow).

Every artefact of a run (videos, frames, reference images, memory, ledger copies,
checkpoints) lives under ``run.root``, which may be a local folder or a URI. Everything that
reads or writes artefacts goes through this module, so a frame written by a world replica on
one node is read by the critic on another with the same call. Pure core: no Ray.

Locations
    A *location* is a plain local path (``runs/x``, made absolute), a ``file://`` URI, an
    ``s3://bucket/key`` URI, or any other fsspec URI (``memory://`` in tests, ``http(s)://``
    for reading reference images). Functions return locations in the style they were given:
    a plain path stays a plain path, a URI stays a URI.

API
    - :func:`join` ``(base, *parts) -> str``, :func:`is_local`, :func:`local_path`,
      :func:`normalize`
    - :func:`read_bytes` ``(uri, *, timeout_s, retries, max_bytes) -> bytes``
    - :func:`write_bytes` ``(uri, data, *, timeout_s, retries) -> str`` (atomic on local
      disk: temp file + rename; a single PUT on S3, which is atomic too)
    - :func:`exists`, :func:`size`, :func:`ls` (direct children), :func:`find` (all files
      below), :func:`makedirs` (a no-op on object stores), :func:`delete`
    - :func:`filesystem` ``(uri) -> (fsspec filesystem, path)``: the configured filesystem
    - :func:`s3_settings` ``() -> S3Settings``: credentials, endpoint and region, read from
      the environment only
    - :func:`lancedb_storage_options` ``(uri) -> dict | None``: ``storage_options`` for
      ``lancedb.connect(uri, storage_options=...)``
    - :func:`pyarrow_filesystem` ``(uri) -> (pyarrow.fs.FileSystem, path)`` and
      :func:`train_storage` ``(uri) -> (storage_path, storage_filesystem)`` for
      ``ray.train.RunConfig(storage_path=..., storage_filesystem=...)``

Credentials (S3)
    Read ONLY from the environment, never from config files: ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN`` for temporary keys), or role
    credentials that the environment declares (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``
    as on EKS, or ``AWS_CONTAINER_CREDENTIALS_*_URI``), which botocore then resolves. The
    endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset: AWS S3), the
    region from ``AWS_DEFAULT_REGION`` or ``AWS_REGION`` (unset: ``us-east-1``). Missing
    credentials raise :class:`StorageCredentialsError` naming the variables to set.

Bounds
    Every remote call (any async fsspec filesystem: S3, HTTP) has a per-attempt deadline
    (``timeout_s``; the coroutine is cancelled when it passes) and is retried with
    exponential backoff on transient errors (timeouts, refused or dropped connections, S3
    throttling and 5xx) up to ``retries`` more times, so one call takes at most about
    ``(retries + 1) * timeout_s`` plus the backoff. botocore's own retries are off (one
    policy, here). Permanent errors (missing object, access denied, bad request) fail at
    once. Every error is a :class:`StorageError` whose message names the URI. Local files
    have no deadline (a local disk does not stall like a network).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
"""Deadline of one attempt of a remote call."""
DEFAULT_RETRIES = 3
"""Retries of a remote call after a transient error (so up to 4 attempts)."""
BACKOFF_S = 0.5
"""First backoff; it doubles after each failed attempt, capped at :data:`MAX_BACKOFF_S`."""
MAX_BACKOFF_S = 8.0
DEFAULT_REGION = "us-east-1"

_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
     errno.ECONNABORTED, errno.EPIPE, errno.EREMOTEIO, errno.ENETUNREACH, errno.EHOSTUNREACH}
)


# --------------------------------------------------------------------------- errors


class StorageError(OSError):
    """A storage call that failed; ``uri`` is the location, the message names it too."""

    def __init__(self, uri: str, message: str):
        super().__init__(f"{uri}: {message}")
        self.uri = uri


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or folder does not exist."""


class StorageTimeoutError(StorageError, TimeoutError):
    """Every attempt ran past its deadline."""


class StorageCredentialsError(StorageError, PermissionError):
    """Credentials are missing from the environment, or were refused."""


# --------------------------------------------------------------------------- locations


def _protocol(uri: str) -> str:
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return _protocol(uri) in ("file", "local")


def is_s3(uri: str) -> bool:
    return _protocol(uri) in ("s3", "s3a")


def local_path(uri: str) -> str | None:
    """The absolute local path of a plain path or ``file://`` URI; ``None`` for a remote URI."""
    if not is_local(uri):
        return None
    if "://" in uri:
        uri = uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def normalize(uri: str) -> str:
    """Plain paths become absolute (a Ray worker's working folder is not the driver's);
    URIs are returned unchanged. Raises ``ValueError`` for an empty location."""
    if not isinstance(uri, (str, os.PathLike)) or not str(uri).strip():
        raise ValueError(f"a storage location must be a non-empty path or URI, got {uri!r}")
    uri = str(uri)
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for local paths and URIs alike (``s3://b/run`` + ``videos``)."""
    out = str(base).rstrip("/") or "/"
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}" if out != "/" else f"/{p}"
    return out


def _styled(original: str, fs: Any, path: str) -> str:
    """Give ``path`` (as a filesystem returns it) the style of ``original``."""
    if "://" not in original:
        return path
    if original.lower().startswith("file://"):
        return f"file://{path}"
    return fs.unstrip_protocol(path)


# --------------------------------------------------------------------------- S3 settings


@dataclass(frozen=True)
class S3Settings:
    """S3 connection settings read from the environment (secrets are left out of ``repr``)."""

    endpoint_url: str | None
    region: str
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def uses_role(self) -> bool:
        """Role credentials declared by the environment, resolved by the AWS SDK."""
        return self.key is None

    @property
    def allow_http(self) -> bool:
        return bool(self.endpoint_url) and self.endpoint_url.lower().startswith("http://")


def s3_settings(environ: Mapping[str, str] | None = None, uri: str = "s3://") -> S3Settings:
    """Read S3 credentials, endpoint and region from the environment.

    Raises:
        StorageCredentialsError: neither access keys nor role credentials are declared,
            or only one of ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` is set. The
            message names the variables (never their values).
    """
    env = os.environ if environ is None else environ
    key = env.get("AWS_ACCESS_KEY_ID") or None
    secret = env.get("AWS_SECRET_ACCESS_KEY") or None
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or DEFAULT_REGION
    if key and secret:
        return S3Settings(endpoint, region, key, secret, env.get("AWS_SESSION_TOKEN") or None)
    if key or secret:
        missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        raise StorageCredentialsError(uri, f"{missing} is not set (the other half of the S3 key pair is)")
    role = (env.get("AWS_ROLE_ARN") and env.get("AWS_WEB_IDENTITY_TOKEN_FILE")) or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if role:
        return S3Settings(endpoint, region)
    raise StorageCredentialsError(
        uri,
        "no S3 credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(plus AWS_ENDPOINT_URL for an S3-compatible server), or declare role credentials "
        "(AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE). Credentials are read only from the "
        "environment, never from config files.",
    )


# --------------------------------------------------------------------------- filesystems

_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def _s3_fs(settings: S3Settings, timeout_s: float) -> Any:
    import s3fs

    key = ("s3", os.getpid(), settings, timeout_s)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = s3fs.S3FileSystem(
                key=settings.key,
                secret=settings.secret,
                token=settings.token,
                endpoint_url=settings.endpoint_url,
                client_kwargs={"region_name": settings.region},
                config_kwargs={
                    "connect_timeout": min(timeout_s, 10.0),
                    "read_timeout": timeout_s,
                    "retries": {"max_attempts": 1, "mode": "standard"},
                },
                use_listings_cache=False,  # other nodes write too: never trust a cached listing
                skip_instance_cache=True,  # this instance is configured here and kept here
            )
            fs.retries = 1  # s3fs's own retry loop off: the retries are ours (one policy)
            _FS_CACHE[key] = fs
        return fs


def filesystem(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` and the path within it.

    S3 filesystems are built from :func:`s3_settings` (the environment) with botocore
    timeouts of ``timeout_s`` and without botocore/s3fs retries (callers of this module
    retry). Other protocols use fsspec's defaults.

    Raises:
        StorageCredentialsError: an ``s3://`` URI and no credentials in the environment.
        StorageError: an unknown protocol or a malformed URI.
    """
    uri = normalize(uri)
    if is_s3(uri):
        path = uri.split("://", 1)[1].strip("/")
        if not path:
            raise StorageError(uri, "an s3:// URI needs a bucket (s3://bucket/prefix)")
        return _s3_fs(s3_settings(uri=uri), timeout_s), path
    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as e:
        raise StorageError(uri, f"unsupported location ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- bounded calls


def _transient(e: BaseException) -> bool:
    """Whether retrying can help: timeouts, connection trouble, throttling, 5xx."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                      FileExistsError, StorageCredentialsError)):
        return False
    if isinstance(e, (TimeoutError, FSTimeoutError, ConnectionError, socket.timeout)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    names = {c.__name__ for c in type(e).__mro__}
    # botocore: EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ... are
    # HTTPClientError; aiohttp: ClientConnectionError, ServerDisconnectedError, payload errors.
    if names & {"HTTPClientError", "ResponseParserError", "IncompleteRead", "ClientConnectionError",
                "ClientPayloadError", "ServerTimeoutError"}:
        return True
    status = getattr(e, "status", None)  # aiohttp.ClientResponseError (HTTP)
    return isinstance(status, int) and (status >= 500 or status == 429)


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text}"[:500]


def _call(uri: str, what: str, fs: Any, fn: Callable[..., T], *args: Any, timeout_s: float,
          retries: int, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` (a sync method of ``fs``) with a deadline per attempt
    (async filesystems) and retries with backoff on transient errors."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    bounded = isinstance(fs, AsyncFileSystem)
    if bounded:
        kwargs["timeout"] = timeout_s  # fsspec runs the coroutine under asyncio.wait_for
    delay = BACKOFF_S
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except FileNotFoundError as e:
            raise StorageNotFoundError(uri, f"{what}: does not exist ({_describe(e)})") from None
        except PermissionError as e:
            raise StorageCredentialsError(uri, f"{what}: access denied ({_describe(e)})") from None
        except Exception as e:
            if not _transient(e):
                raise StorageError(uri, f"{what} failed: {_describe(e)}") from None
            last = e
    timeouts = isinstance(last, (TimeoutError, FSTimeoutError, socket.timeout)) or "Timeout" in type(last).__name__
    msg = f"{what} failed after {retries + 1} attempt(s) (timeout {timeout_s:g}s each): {_describe(last)}"
    if timeouts:
        raise StorageTimeoutError(uri, msg)
    raise StorageError(uri, msg)


# --------------------------------------------------------------------------- operations


def read_bytes(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
               max_bytes: int | None = None) -> bytes:
    """The whole content of ``uri``.

    Args:
        max_bytes: refuse (before downloading) an object larger than this.

    Raises:
        StorageNotFoundError, StorageTimeoutError, StorageCredentialsError, StorageError.
    """
    fs, path = filesystem(uri, timeout_s=timeout_s)
    if max_bytes is not None:
        n = size(uri, timeout_s=timeout_s, retries=retries)
        if n is not None and n > max_bytes:
            raise StorageError(uri, f"is {n} bytes, more than the {max_bytes}-byte limit")
    data = _call(uri, "read", fs, fs.cat_file, path, timeout_s=timeout_s, retries=retries)
    if max_bytes is not None and len(data) > max_bytes:  # no size in the listing
        raise StorageError(uri, f"is more than the {max_bytes}-byte limit")
    return data


def write_bytes(uri: str, data: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                retries: int = DEFAULT_RETRIES) -> str:
    """Write ``data`` to ``uri`` (parents created) and return ``uri`` (plain paths made absolute).

    On local disk the write is atomic (a unique temp file, fsynced, then renamed), so a
    reader never sees half a file; on S3 a single PUT is atomic by itself.
    """
    uri = normalize(uri)
    fs, path = filesystem(uri, timeout_s=timeout_s)
    if isinstance(fs, LocalFileSystem):
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            raise StorageError(uri, f"write failed: {_describe(e)}") from None
        return uri
    _call(uri, "write", fs, fs.pipe_file, path, bytes(data), timeout_s=timeout_s, retries=retries)
    return uri


def exists(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> bool:
    """Whether an object or folder (a non-empty prefix on S3) exists at ``uri``."""
    fs, path = filesystem(uri, timeout_s=timeout_s)
    return bool(_call(uri, "exists", fs, fs.exists, path, timeout_s=timeout_s, retries=retries))


def size(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> int | None:
    """Size in bytes of the object at ``uri`` (``None`` where the filesystem does not say)."""
    fs, path = filesystem(uri, timeout_s=timeout_s)
    info = _call(uri, "stat", fs, fs.info, path, timeout_s=timeout_s, retries=retries)
    n = info.get("size")
    return int(n) if n is not None else None


def ls(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> list[str]:
    """Direct children of the folder (prefix) ``uri``, sorted, in the style of ``uri``.
    A missing folder raises :class:`StorageNotFoundError`."""
    fs, path = filesystem(uri, timeout_s=timeout_s)
    names = _call(uri, "list", fs, fs.ls, path, detail=False, timeout_s=timeout_s, retries=retries)
    base = path.rstrip("/")
    return sorted(_styled(normalize(uri), fs, n) for n in names if n.rstrip("/") != base)


def find(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> list[str]:
    """Every file below ``uri`` (recursively), sorted, in the style of ``uri``; ``[]`` if none."""
    fs, path = filesystem(uri, timeout_s=timeout_s)
    names = _call(uri, "find", fs, fs.find, path, timeout_s=timeout_s, retries=retries)
    return sorted(_styled(normalize(uri), fs, n) for n in names)


def makedirs(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> str:
    """Create the folder ``uri`` and its parents (nothing to do on S3: prefixes need no
    creation, and buckets are never created implicitly). Returns ``uri`` normalised."""
    uri = normalize(uri)
    if is_s3(uri):
        return uri
    fs, path = filesystem(uri, timeout_s=timeout_s)
    _call(uri, "makedirs", fs, fs.makedirs, path, exist_ok=True, timeout_s=timeout_s, retries=retries)
    return uri


def delete(uri: str, *, recursive: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
           retries: int = DEFAULT_RETRIES) -> None:
    """Remove the object (or with ``recursive``, everything below the folder) at ``uri``."""
    fs, path = filesystem(uri, timeout_s=timeout_s)
    _call(uri, "delete", fs, fs.rm, path, recursive=recursive, timeout_s=timeout_s, retries=retries)


# --------------------------------------------------------------------------- other consumers


def lancedb_storage_options(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, str] | None:
    """``storage_options`` for ``lancedb.connect(uri, storage_options=...)``: the same
    credentials, endpoint and region as this module, as Lance's object store expects them.
    ``None`` for a local ``uri`` (LanceDB needs none)."""
    if not is_s3(uri):
        return None
    s = s3_settings(uri=uri)
    opts = {"region": s.region, "timeout": f"{int(max(1, timeout_s))}s",
            "connect_timeout": f"{int(max(1, min(timeout_s, 10)))}s"}
    if s.key:
        opts.update(aws_access_key_id=s.key, aws_secret_access_key=s.secret or "")
        if s.token:
            opts["aws_session_token"] = s.token
    if s.endpoint_url:
        opts["aws_endpoint"] = s.endpoint_url
        opts["allow_http"] = "true" if s.allow_http else "false"
    return opts


def _env_s3fs(timeout_s: float) -> Any:
    """An s3fs for pyarrow: this module's settings from THIS process's environment,
    botocore timeouts, and s3fs's own retries (pyarrow calls it directly)."""
    import s3fs

    s = s3_settings()
    return s3fs.S3FileSystem(
        key=s.key, secret=s.secret, token=s.token, endpoint_url=s.endpoint_url,
        client_kwargs={"region_name": s.region},
        config_kwargs={"connect_timeout": min(timeout_s, 10.0), "read_timeout": timeout_s},
        use_listings_cache=False, skip_instance_cache=True,
    )


def _env_s3_handler(timeout_s: float) -> Any:
    import pyarrow.fs as pafs

    class EnvS3Handler(pafs.FSSpecHandler):
        """pyarrow handler over :func:`_env_s3fs` that pickles WITHOUT credentials: Ray
        sends the storage filesystem to every train worker, and each rebuilds it from its
        own node's environment (secrets never travel in task arguments)."""

        def __init__(self, timeout: float):
            self.timeout_s = timeout
            super().__init__(_env_s3fs(timeout))

        def __reduce__(self):
            return (_env_s3_handler, (self.timeout_s,))

        def __eq__(self, other: Any) -> bool:
            return isinstance(other, pafs.FSSpecHandler) and self.fs == other.fs

    return EnvS3Handler(timeout_s)


def pyarrow_filesystem(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Any, str]:
    """A ``pyarrow.fs.FileSystem`` for ``uri`` and the path within it.

    S3 goes through s3fs (``PyFileSystem(FSSpecHandler(...))``) with this module's
    credentials, endpoint and timeouts (pyarrow's native S3 client ignores read timeouts on
    Linux) and s3fs's own retries (5 attempts with backoff: pyarrow calls it directly, not
    through :func:`read_bytes`). It pickles without credentials: unpickled in another
    process (a Ray Train worker), it reads them from that process's environment. Local
    locations get ``LocalFileSystem``.
    """
    import pyarrow.fs as pafs

    uri = normalize(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)  # type: ignore[return-value]
    _, path = filesystem(uri, timeout_s=timeout_s)  # validates the URI and the credentials
    if not is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(_), path)
    return pafs.PyFileSystem(_env_s3_handler(timeout_s)), path


def train_storage(uri: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``: a local folder
    is returned as an absolute path with ``None`` (Ray's default); a URI as the path
    within its filesystem plus the :func:`pyarrow_filesystem` (Ray then writes checkpoints
    through it; each worker with its own node's credentials from the environment)."""
    if is_local(uri):
        return local_path(uri), None  # type: ignore[return-value]
    fs, path = pyarrow_filesystem(uri)
    return path, fs


__all__ = [
    "DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "S3Settings", "StorageCredentialsError", "StorageError",
    "StorageNotFoundError", "StorageTimeoutError", "delete", "exists", "filesystem", "find", "is_local",
    "is_s3", "join", "lancedb_storage_options", "local_path", "ls", "makedirs", "normalize",
    "pyarrow_filesystem", "read_bytes", "s3_settings", "size", "train_storage", "write_bytes",
]

"""Object storage by URI: ``file:///dir`` (a local directory) or ``s3://bucket/prefix``.

The S3 side is `obstore <https://developmentseed.org/obstore/>`_ (Python bindings of the Rust
``object_store`` crate); the local side is plain Python, so a ``file://`` write stays atomic
and durable (a temporary file, ``fsync``, ``os.replace``). Both offer the same few operations:
put-if-absent of bytes, get, head and a chunked streaming read (bounded memory).

Keys are ``/``-separated and checked strictly (:func:`check_key`): no empty, ``.`` or ``..``
segment, no backslash or control character. An ``s3://`` URI's key is taken literally, as the
AWS CLI does: ``s3://b/a#b`` names the key ``a#b`` and ``%2e`` is three characters, never
decoded. Content-addressed keys are ``ab/cd/<blake3 hex><suffix>`` (:func:`content_key`).

Which ``s3://`` objects may be stamped, per namespace, is :class:`ContentPrefixes`.
"""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import obstore
from blake3 import blake3
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotSupportedError,
    PreconditionError,
)
from obstore.store import S3Store

from stampflow.contracts.events import NAMESPACE_PATTERN

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import ClientConfig, RetryConfig, S3Config


__all__ = [
    "ALL_NAMESPACES",
    "CHUNK_SIZE",
    "ContentObject",
    "ContentPrefixes",
    "LocalObjectStore",
    "ObjectChangedError",
    "ObjectInfo",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectURI",
    "ObjectURIError",
    "S3ObjectStore",
    "S3Options",
    "check_key",
    "content_key",
    "is_s3_uri",
    "open_store",
    "parse_uri",
]

_T = TypeVar("_T")

CHUNK_SIZE = 1 << 20
ALL_NAMESPACES = "*"
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
# S3's bucket naming rules (the "general purpose bucket" ones, without the legacy forms).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ObjectURIError(ValueError):
    """A URI or key that names no object: ``str(err)`` is one line naming it and why."""


class ObjectStoreError(Exception):
    """An object store failed (not "not found": that is :class:`FileNotFoundError`). One line."""


class ObjectChangedError(ObjectStoreError):
    """The object changed between its ``head`` and its read (its ETag no longer matches)."""


# --- URIs and keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectURI:
    """A parsed ``file://`` or ``s3://`` URI. ``key`` is the object key (``s3``, may be empty
    or end with ``/`` for a prefix) or the absolute local path (``file``)."""

    scheme: Literal["file", "s3"]
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return Path(self.key).as_uri()


def is_s3_uri(value: object) -> bool:
    """Does ``value`` (a stamp request's path, say) use the ``s3://`` scheme (any case)?"""
    return isinstance(value, str) and value[:5].lower() == "s3://"


def parse_uri(uri: str) -> ObjectURI:
    """Parse ``s3://bucket[/key]`` or ``file:///absolute/path``; else :class:`ObjectURIError`.

    An ``s3://`` key may be empty or end with one ``/`` (a prefix); its other rules are
    :func:`check_key`'s. A ``file://`` URI has no host (or ``localhost``), an absolute path and
    no query or fragment; its path is percent-decoded and may not hold ``.`` or ``..``.
    """
    if not isinstance(uri, str) or not uri:
        raise ObjectURIError(f"{uri!r}: not a URI (expected s3://bucket/prefix or file:///path)")
    if _CONTROL.search(uri):
        raise ObjectURIError(f"{uri!r}: a URI may not hold control characters")
    scheme, sep, rest = uri.partition("://")
    if is_s3_uri(uri):
        bucket, _, key = rest.partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ObjectURIError(f"{uri}: {bucket!r} is not a valid S3 bucket name (3-63 "
                                 "characters: lowercase letters, digits, '.', '-')")
        if key:
            check_key(key.removesuffix("/"), shown=uri)
        return ObjectURI("s3", bucket, key)
    if sep and scheme.lower() == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ObjectURIError(f"{uri}: a file:// URI has no host, query or fragment "
                                 "(file:///absolute/path)")
        try:
            path = unquote(parts.path, errors="strict")
        except UnicodeDecodeError:
            raise ObjectURIError(f"{uri}: the path is not percent-encoded UTF-8") from None
        if not path.startswith("/"):
            raise ObjectURIError(f"{uri}: not an absolute path")
        if path != "/":
            check_key(path.strip("/"), shown=uri)
        return ObjectURI("file", "", path)
    raise ObjectURIError(f"{uri}: unsupported scheme (expected s3://bucket/prefix or "
                         "file:///path)")


def check_key(key: str, *, shown: str | None = None) -> str:
    """``key`` when it is a well-formed object key, else :class:`ObjectURIError`."""
    where = shown if shown is not None else repr(key)
    if not key:
        raise ObjectURIError(f"{where}: empty key")
    if _CONTROL.search(key):
        raise ObjectURIError(f"{where}: a key may not hold control characters")
    if "\\" in key:
        raise ObjectURIError(f"{where}: a key may not hold a backslash")
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_KEY_BYTES:
        raise ObjectURIError(f"{where}: a key is at most {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            what = "an empty segment ('//' or a leading '/')" if not segment else f"{segment!r}"
            raise ObjectURIError(f"{where}: the key holds {what}")
    return key


def content_key(digest: str, suffix: str = "") -> str:
    """``ab/cd/<digest><suffix>``: where content with BLAKE3 ``digest`` lives in a store."""
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ValueError(f"artifact hash {digest!r} is not 64 lowercase hex characters")
    if suffix and not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"artifact suffix {suffix!r} is not a short lowercase extension")
    return f"{digest[:2]}/{digest[2:4]}/{digest}{suffix}"


# --- stores --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class ContentObject:
    """What :meth:`ObjectStore.put_content` stored: BLAKE3 hash, size, key and URI."""

    hash: str
    size: int
    key: str
    uri: str
    created: bool


class ObjectStore(ABC):
    """Objects under one base URI (:attr:`uri`); keys are relative to it."""

    uri: str

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{check_key(key)}"

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Store ``data`` at ``key`` unless an object is already there. ``True``: written;
        ``False``: one was there (callers use content-addressed keys: same key, same bytes)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`FileNotFoundError` when there is none."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """The object's size (and ETag); :class:`FileNotFoundError` when there is none."""

    @abstractmethod
    def stream(self, key: str, *, chunk_size: int = CHUNK_SIZE,
               etag: str | None = None) -> Generator[bytes, None, None]:
        """The object's bytes as chunks of about ``chunk_size`` (the last may be shorter): at
        most a chunk or two is held at a time. With ``etag``, the read fails with
        :class:`ObjectChangedError` unless the object still has it (where the store knows)."""

    def put_content(self, data: bytes | memoryview, suffix: str = "") -> ContentObject:
        """Store ``data`` once under its BLAKE3 key (:func:`content_key`)."""
        digest = blake3(data).hexdigest()
        key = content_key(digest, suffix)
        created = self.put_if_absent(key, data)
        return ContentObject(digest, memoryview(data).nbytes, key, self.uri_for(key), created)


class LocalObjectStore(ObjectStore):
    """A local directory. Writes are atomic and durable: temporary file, fsync, rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.uri = self.root.as_uri()

    def path_for(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri_for(self, key: str) -> str:
        return self.path_for(key).as_uri()

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        path = self.path_for(key)
        size = memoryview(data).nbytes
        # A file of another size is a torn copy from outside this store: it is replaced.
        if path.is_file() and path.stat().st_size == size:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def get(self, key: str) -> bytes:
        return self.path_for(key).read_bytes()

    def head(self, key: str) -> ObjectInfo:
        return ObjectInfo(self.path_for(key).stat().st_size)

    def stream(self, key: str, *, chunk_size: int = CHUNK_SIZE,
               etag: str | None = None) -> Generator[bytes, None, None]:
        _check_chunk_size(chunk_size)
        with self.path_for(key).open("rb", buffering=0) as file:
            while chunk := file.read(chunk_size):
                yield chunk


@dataclass(frozen=True, slots=True)
class S3Options:
    """How to reach an S3-API server. ``None`` fields fall back to the usual ``AWS_*``
    environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL``...), then to AWS's defaults."""

    endpoint_url: str | None = None  # e.g. http://minio:9000 or a moto server
    region: str | None = None
    allow_http: bool = False  # needed for an http:// endpoint
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    timeout_s: float = 300.0  # one whole request, body included
    connect_timeout_s: float = 5.0
    max_retries: int = 3
    retry_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"S3 endpoint {self.endpoint_url!r} is not an http:// or "
                                 "https:// URL")
            if parts.scheme == "http" and not self.allow_http:
                raise ValueError(f"S3 endpoint {self.endpoint_url!r} is plain http: allow it "
                                 "explicitly (allow_http)")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("S3 credentials need both an access key id and a secret access key")


class S3ObjectStore(ObjectStore):
    """Objects in one S3 bucket, under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None) -> None:
        prefix = prefix.strip("/")
        parse_uri(f"s3://{bucket}/{prefix}")  # checks both
        self.bucket, self.prefix = bucket, prefix
        self.options = options or S3Options()
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._store = _s3_store(bucket, prefix, self.options)

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{check_key(key)}"

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        check_key(key)
        try:
            # "create" is a PUT with If-None-Match: *, refused (412) when the key exists.
            obstore.put(self._store, key, data, mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        except NotSupportedError:
            # A server without conditional writes: look, then write (same key, same bytes).
            try:
                self.head(key)
                return False
            except FileNotFoundError:
                pass
            self._call(key, lambda: obstore.put(self._store, key, data))
        except (BaseError, OSError) as err:
            raise self._error(key, err) from None
        return True

    def get(self, key: str) -> bytes:
        check_key(key)
        return self._call(key, lambda: bytes(obstore.get(self._store, key).bytes()))

    def head(self, key: str) -> ObjectInfo:
        check_key(key)
        meta = self._call(key, lambda: obstore.head(self._store, key))
        return ObjectInfo(meta["size"], meta["e_tag"])

    def stream(self, key: str, *, chunk_size: int = CHUNK_SIZE,
               etag: str | None = None) -> Generator[bytes, None, None]:
        check_key(key)
        _check_chunk_size(chunk_size)
        options: GetOptions | None = {"if_match": etag} if etag is not None else None
        result = self._call(key, lambda: obstore.get(self._store, key, options=options))
        chunks = result.stream(min_chunk_size=chunk_size)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except (BaseError, OSError) as err:
                raise self._error(key, err) from None
            yield chunk

    def _call(self, key: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (BaseError, OSError) as err:
            raise self._error(key, err) from None

    def _error(self, key: str, err: BaseException) -> Exception:
        uri = f"{self.uri}/{key}"
        first = (str(err).splitlines() or [type(err).__name__])[0]
        if len(first) > 300:
            first = first[:297] + "..."
        if isinstance(err, FileNotFoundError):
            return FileNotFoundError(f"{uri}: no such object")
        if isinstance(err, PreconditionError):
            return ObjectChangedError(f"{uri}: the object changed while being read")
        return ObjectStoreError(f"{uri}: {first}")


def _s3_store(bucket: str, prefix: str, options: S3Options) -> S3Store:
    config: S3Config = {}
    if options.endpoint_url is not None:
        config["endpoint"] = options.endpoint_url
    if options.region is not None:
        config["region"] = options.region
    if options.access_key_id is not None and options.secret_access_key is not None:
        config["access_key_id"] = options.access_key_id
        config["secret_access_key"] = options.secret_access_key
        if options.session_token is not None:
            config["session_token"] = options.session_token
    client: ClientConfig = {
        "allow_http": options.allow_http,
        "timeout": timedelta(seconds=options.timeout_s),
        "connect_timeout": timedelta(seconds=options.connect_timeout_s),
    }
    retry: RetryConfig = {"max_retries": options.max_retries,
                          "retry_timeout": timedelta(seconds=options.retry_timeout_s)}
    return S3Store(bucket, prefix=prefix or None, config=config, client_options=client,
                   retry_config=retry)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size!r} is not a positive integer")


def open_store(uri: str, *, s3: S3Options | None = None) -> ObjectStore:
    """The store at ``uri``: ``file:///dir`` or ``s3://bucket[/prefix]``."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return LocalObjectStore(parsed.key)
    return S3ObjectStore(parsed.bucket, parsed.key, s3)


# --- which objects may be stamped ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContentPrefixes:
    """Namespace (or ``*``, every namespace) -> the ``s3://bucket/prefix/`` URIs whose objects
    it may stamp. A prefix is a whole "folder": ``s3://b/data`` allows ``s3://b/data/x`` but
    not ``s3://b/database``; ``s3://b`` allows the whole bucket."""

    by_namespace: Mapping[str, tuple[ObjectURI, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, mapping: Mapping[str, Sequence[str]] | None) -> ContentPrefixes:
        """From ``{"ns": ["s3://bucket/prefix/", ...]}``; :class:`ValueError`, one line."""
        out: dict[str, tuple[ObjectURI, ...]] = {}
        for namespace, uris in (mapping or {}).items():
            if namespace != ALL_NAMESPACES and not NAMESPACE_PATTERN.fullmatch(namespace):
                raise ValueError(f"content objects: {namespace!r} is neither a namespace nor "
                                 f"{ALL_NAMESPACES!r}")
            if isinstance(uris, str):
                raise ValueError(f"content objects for {namespace!r}: expected a list of "
                                 "s3:// URIs, got one string")
            prefixes = []
            for uri in uris:
                try:
                    parsed = parse_uri(uri)
                except ObjectURIError as err:
                    raise ValueError(f"content objects for {namespace!r}: {err}") from None
                if parsed.scheme != "s3":
                    raise ValueError(f"content objects for {namespace!r}: {uri} is not an "
                                     "s3:// URI (local files come from the content root)")
                key = parsed.key.removesuffix("/")
                prefixes.append(ObjectURI("s3", parsed.bucket, f"{key}/" if key else ""))
            out[namespace] = tuple(prefixes)
        return cls(out)

    def __bool__(self) -> bool:
        return any(self.by_namespace.values())

    def allowed(self, namespace: str) -> tuple[ObjectURI, ...]:
        return (*self.by_namespace.get(namespace, ()), *self.by_namespace.get(ALL_NAMESPACES, ()))

    def refusal(self, obj: ObjectURI, namespace: str) -> str | None:
        """Why ``namespace`` may not read ``obj``; ``None`` when it may."""
        allowed = self.allowed(namespace)
        if obj.scheme != "s3":
            return "not an s3:// object"
        if not allowed:
            return f"no object prefix is allowed for namespace {namespace!r}"
        same_bucket = [p for p in allowed if p.bucket == obj.bucket]
        if not same_bucket:
            return f"bucket {obj.bucket!r} is not allowed for namespace {namespace!r}"
        if any(obj.key.startswith(p.key) for p in same_bucket):
            return None
        return f"not under a prefix allowed for namespace {namespace!r}"

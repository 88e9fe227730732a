"""The stamping compute node: BLAKE3 of inline bytes, of a file under the content root, or of
an ``s3://bucket/key`` object under a prefix its namespace may read.

Pure of Kafka and PostgreSQL. Files are streamed through one fixed buffer (``readinto``): no
``mmap`` (mapped pages count toward the process's RSS) and no read-it-all; objects are streamed
in chunks of :data:`CHUNK_SIZE`. Every failure to stamp a path is a :class:`StampError` with a
code and one line naming the path and the reason.

Why one file past 400 lines: half of it is the file safety of one operation (resolve below the
root without following a link out of it, open without following the last link, check the file
is regular and did not change while read, map each OS error to a code); it is read and changed
together with the stamping it guards, and has no other user. The object side is the same
kind of code (containment per namespace, size before reading, each store error to a code); the
object store itself is :mod:`stampflow.nodes.objectstore`.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote

from blake3 import blake3

from stampflow.contracts.events import NAMESPACE_PATTERN, utc_now
from stampflow.nodes.content_type import SNIFF_BYTES, sniff_content_type
from stampflow.nodes.objectstore import (
    ContentPrefixes,
    ObjectChangedError,
    ObjectStoreError,
    ObjectURIError,
    S3ObjectStore,
    S3Options,
    is_s3_uri,
    parse_uri,
)

__all__ = [
    "ALGORITHM",
    "CHUNK_SIZE",
    "LINE_VERSION",
    "Stamp",
    "StampError",
    "StampErrorCode",
    "StampingNode",
    "hash_bytes",
    "hash_file",
    "is_s3_uri",
    "resolve_in_root",
    "sniff_content_type",
    "utc_now",
]

ALGORITHM = "blake3"
CHUNK_SIZE = 1 << 20
LINE_VERSION = "stampflow/1"

StampErrorCode = Literal["not_found", "not_a_file", "unreadable", "too_large", "outside_root"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"0|[1-9][0-9]*")
_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
# A content type is written percent-encoded: every printable ASCII character but space and "%"
# stands for itself, so a stamp line is one line of printable ASCII whatever the type holds.
_TYPE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_SMALL_BUFFER = 1 << 16
_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})


class StampError(Exception):
    """Content could not be stamped. ``str(err)`` is one line: ``"<path>: <reason>"``."""

    code: StampErrorCode
    path: str
    reason: str

    def __init__(self, code: StampErrorCode, path: str | Path, reason: str) -> None:
        super().__init__(code, path, reason)
        self.code, self.path, self.reason = code, _show(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Stamp:
    """A content stamp. Construction validates every field (``ValueError``, one line)."""

    hash: str
    size: int
    content_type: str
    algorithm: str
    namespace: str
    stamped_at: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HEX64.fullmatch(self.hash):
            raise ValueError(f"stamp hash {self.hash!r} is not 64 lowercase hex characters")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"stamp size {self.size!r} is not a non-negative integer")
        if not isinstance(self.content_type, str) or not self.content_type:
            raise ValueError(f"stamp content type {self.content_type!r} is empty")
        if self.algorithm != ALGORITHM:
            raise ValueError(f"stamp algorithm {self.algorithm!r} is not {ALGORITHM!r}")
        if not isinstance(self.namespace, str) or not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError(
                f"stamp namespace {self.namespace!r} does not match {NAMESPACE_PATTERN.pattern}"
            )
        if not isinstance(self.stamped_at, datetime) or self.stamped_at.utcoffset() is None:
            raise ValueError(f"stamp time {self.stamped_at!r} is not timezone-aware")
        object.__setattr__(self, "stamped_at", self.stamped_at.astimezone(UTC))

    def line(self) -> str:
        """``stampflow/1 blake3:<hash> size=<n> type=<type> ns=<ns> at=<UTC, µs>Z``.

        One line of printable ASCII; the content type is percent-encoded (space, "%" and
        anything outside printable ASCII), so ``text/plain; charset=utf-8`` is written
        ``text/plain;%20charset=utf-8``.
        """
        at = self.stamped_at.replace(tzinfo=None).isoformat(timespec="microseconds")
        return (
            f"{LINE_VERSION} {self.algorithm}:{self.hash} size={self.size} "
            f"type={_encode_type(self.content_type)} ns={self.namespace} at={at}Z"
        )

    @classmethod
    def parse_line(cls, line: str) -> Stamp:
        """The inverse of :meth:`line`. Only the canonical form is accepted."""
        fields = line.strip().split(" ")
        if len(fields) != 6:
            raise _bad_line(line, f"expected 6 space-separated fields, got {len(fields)}")
        version, digest, *rest = fields
        if version != LINE_VERSION:
            raise _bad_line(line, f"unsupported version {version!r} (expected {LINE_VERSION!r})")
        algorithm, _, hash_ = digest.partition(":")
        if algorithm != ALGORITHM or not _HEX64.fullmatch(hash_):
            raise _bad_line(line, f"expected '{ALGORITHM}:<64 lowercase hex>', got {digest!r}")
        values: dict[str, str] = {}
        for key, field in zip(("size", "type", "ns", "at"), rest, strict=True):
            name, eq, value = field.partition("=")
            if name != key or not eq:
                raise _bad_line(line, f"expected '{key}=...', got {field!r}")
            values[key] = value
        if not _SIZE.fullmatch(values["size"]):
            raise _bad_line(line, f"size {values['size']!r} is not a non-negative integer")
        content_type = unquote(values["type"], errors="surrogatepass")
        if not content_type or _encode_type(content_type) != values["type"]:
            raise _bad_line(line, f"type {values['type']!r} is not a percent-encoded type")
        stamped_at = _parse_at(line, values["at"])
        try:
            return cls(hash_, int(values["size"]), content_type, algorithm, values["ns"],
                       stamped_at)
        except ValueError as err:
            raise _bad_line(line, str(err)) from None


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """BLAKE3 (32-byte digest) of ``data`` as 64 lowercase hex characters."""
    return blake3(data).hexdigest()


def hash_file(
    path: str | Path, *, max_bytes: int | None = None, chunk_size: int = CHUNK_SIZE
) -> tuple[str, int]:
    """``(blake3 hex, size)`` of the regular file at ``path``, streamed in ``chunk_size`` reads.

    Raises :class:`StampError` (``too_large``) before reading when the file's size is over
    ``max_bytes``, and as soon as more than ``max_bytes`` have been read if it grows.
    """
    fd = _open_regular(path, path, follow_symlinks=True)
    try:
        digest, size, _ = _digest_fd(fd, path, max_bytes=max_bytes, chunk_size=chunk_size)
    finally:
        os.close(fd)
    return digest, size


def resolve_in_root(root: Path, path: str | Path) -> Path:
    """The real path of ``path`` (relative paths are relative to ``root``) inside ``root``.

    Symlinks are followed; the result must lie inside the real ``root``, else ``outside_root``
    (a link inside the root that points out of it included). A path outside the root is
    reported as such whether or not it exists. Missing: ``not_found``; not a regular file
    (a directory, a FIFO, a device): ``not_a_file``; cannot be examined: ``unreadable``.
    """
    return Path(_resolve_below(os.path.realpath(root), path))


def _resolve_below(real_root: str, path: str | Path) -> str:
    # os.path rather than pathlib: several times faster on Python 3.11, for the same answer.
    # A symlink loop comes back unresolved from realpath() and fails os.stat() with ELOOP.
    try:
        resolved = os.path.realpath(os.path.join(real_root, path))
    except ValueError:
        raise StampError("not_found", path, "not found (the path contains a NUL byte)") from None
    except OSError as err:
        raise _from_os_error(err, path) from None
    if not _inside(resolved, real_root):
        raise StampError("outside_root", path, "outside the content root")
    try:
        st = os.stat(resolved)
    except OSError as err:
        raise _from_os_error(err, path) from None
    _require_regular(st.st_mode, path)
    return resolved


def _inside(real_path: str, real_root: str) -> bool:
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True, slots=True)
class _Digest:
    hash: str
    size: int
    content_type: str


class StampingNode:
    """The compute node. Pure of Kafka/PostgreSQL; reads files (its job)."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        clock: Callable[[], datetime] = utc_now,
        content_objects: ContentPrefixes | Mapping[str, Sequence[str]] | None = None,
        s3: S3Options | None = None,
    ) -> None:
        """``content_objects``: namespace (or ``*``) -> the ``s3://bucket/prefix/`` URIs whose
        objects it may stamp (none: ``s3://`` paths are refused); ``s3``: how to reach the
        S3-API server (else the ``AWS_*`` environment variables)."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes {max_bytes!r} is not a non-negative integer")
        self.root = Path(os.path.realpath(root))
        self._real_root = str(self.root)
        self.max_bytes = max_bytes
        self.clock = clock
        self.content_objects = (content_objects if isinstance(content_objects, ContentPrefixes)
                                else ContentPrefixes.parse(content_objects))
        self.s3 = s3
        self._buckets: dict[str, S3ObjectStore] = {}

    def stamp_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        namespace: str,
        content_type: str | None = None,
        name: str | None = None,
    ) -> Stamp:
        """Stamp inline content. A blank ``content_type`` is sniffed from ``data`` and ``name``."""
        size = memoryview(data).nbytes
        label = name or "<inline content>"
        if size > self.max_bytes:
            raise StampError("too_large", label, _too_large(self.max_bytes, size))
        if content_type is None or not content_type.strip():
            head = bytes(memoryview(data)[:SNIFF_BYTES])
            content_type = sniff_content_type(name, head, final=size <= SNIFF_BYTES)
        return self._stamp(_Digest(hash_bytes(data), size, content_type.strip()), namespace)

    def stamp_path(self, path: str | Path, *, namespace: str) -> Stamp:
        """Stamp the file at ``path`` under the root (see :func:`resolve_in_root`), or the
        ``s3://bucket/key`` object at ``path`` when ``namespace`` may read it.

        An object is refused with ``outside_root`` when no object storage is configured, when
        its bucket or prefix is not allowed for ``namespace``, or when its URI is not plain
        (``..``, ``.``, ``//``, a bad bucket name); ``too_large`` from its size before any of
        it is read (and while reading); ``not_found`` when it is missing; ``not_a_file`` for a
        key ending in ``/``; ``unreadable`` when the store fails or the object changes.
        """
        digest = self._digest_path(path, max_bytes=self.max_bytes, namespace=namespace)
        return self._stamp(digest, namespace)

    def verify(
        self,
        stamp: Stamp,
        *,
        data: bytes | bytearray | memoryview | None = None,
        path: str | Path | None = None,
    ) -> bool:
        """Does this content (exactly one of ``data`` or ``path``) have the stamp's hash and size?

        Namespace, type and time are not compared (an ``s3://`` path is read with the stamp's
        namespace's rights). A path that cannot be stamped raises :class:`StampError`; a file
        larger than the stamp says is ``False`` without reading it.
        """
        if data is not None and path is None:
            return memoryview(data).nbytes == stamp.size and hash_bytes(data) == stamp.hash
        if path is None or data is not None:
            raise ValueError("verify needs exactly one of data= or path=")
        if stamp.size > self.max_bytes:
            raise StampError("too_large", path, _too_large(self.max_bytes, stamp.size))
        try:
            digest = self._digest_path(path, max_bytes=stamp.size, namespace=stamp.namespace)
        except StampError as err:
            if err.code == "too_large":
                return False
            raise
        return digest.size == stamp.size and digest.hash == stamp.hash

    def _digest_path(self, path: str | Path, *, max_bytes: int, namespace: str) -> _Digest:
        if is_s3_uri(path):
            return self._digest_object(str(path), max_bytes=max_bytes, namespace=namespace)
        resolved = _resolve_below(self._real_root, path)
        return self._digest_resolved(resolved, path, max_bytes=max_bytes)

    def object_refusal(self, uri: str, namespace: str) -> StampError | None:
        """Why ``namespace`` may not stamp the object at ``uri``; ``None`` when it may."""
        if not self.content_objects:
            return StampError("outside_root", uri, "outside the content root (no object "
                              "storage is configured for stamping)")
        try:
            obj = parse_uri(uri)
        except ObjectURIError as err:
            reason = str(err).removeprefix(f"{uri}: ")
            return StampError("outside_root", uri, f"outside the allowed objects ({reason})")
        if refused := self.content_objects.refusal(obj, namespace):
            return StampError("outside_root", uri, f"outside the allowed objects ({refused})")
        if not obj.key or obj.key.endswith("/"):
            return StampError("not_a_file", uri, "not a file (a prefix, not an object)")
        return None

    def _digest_object(self, uri: str, *, max_bytes: int, namespace: str) -> _Digest:
        if refused := self.object_refusal(uri, namespace):
            raise refused
        obj = parse_uri(uri)
        store = self._bucket(obj.bucket)
        try:
            info = store.head(obj.key)
            if info.size > max_bytes:
                raise StampError("too_large", uri, _too_large(max_bytes, info.size))
            hasher = blake3()
            head = bytearray()
            size = 0
            # The read is of the version headed (If-Match on its ETag), and counted as it goes.
            with closing(store.stream(obj.key, chunk_size=CHUNK_SIZE, etag=info.etag)) as chunks:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise StampError("too_large", uri,
                                         _too_large(max_bytes, size, grew=True))
                    hasher.update(chunk)
                    if len(head) < SNIFF_BYTES:
                        head += chunk[: SNIFF_BYTES - len(head)]
        except FileNotFoundError:
            raise StampError("not_found", uri, "not found") from None
        except ObjectChangedError:
            raise StampError("unreadable", uri,
                             "unreadable (the object changed while being read)") from None
        except ObjectStoreError as err:
            reason = str(err).removeprefix(f"{uri}: ")
            raise StampError("unreadable", uri, f"unreadable ({reason})") from None
        if size != info.size:
            raise StampError("unreadable", uri, "unreadable (the object changed while being "
                             f"read: {size} bytes read, {info.size} expected)")
        name = obj.key.rsplit("/", 1)[-1]
        content_type = sniff_content_type(name, bytes(head), final=size <= len(head))
        return _Digest(hasher.hexdigest(), size, content_type)

    def _bucket(self, bucket: str) -> S3ObjectStore:
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets.setdefault(bucket, S3ObjectStore(bucket, "", self.s3))
        return store

    def _digest_resolved(
        self, resolved: str | Path, path: str | Path, *, max_bytes: int
    ) -> _Digest:
        # The checked path is opened without following a final symlink, and the opened file's
        # own path is checked again: a component swapped for a symlink since the check cannot
        # lead out of the root.
        fd = _open_regular(resolved, path, follow_symlinks=False)
        try:
            opened = _fd_path(fd)
            if opened is not None and not _inside(opened, self._real_root):
                raise StampError("outside_root", path, "outside the content root")
            digest, size, head = _digest_fd(fd, path, max_bytes=max_bytes)
        finally:
            os.close(fd)
        name = os.path.basename(resolved)
        content_type = sniff_content_type(name, head, final=size <= len(head))
        return _Digest(digest, size, content_type)

    def _stamp(self, digest: _Digest, namespace: str) -> Stamp:
        return Stamp(digest.hash, digest.size, digest.content_type, ALGORITHM, namespace,
                      self.clock())


# --- files ---------------------------------------------------------------------------------------


def _open_regular(path: str | Path, shown: str | Path, *, follow_symlinks: bool) -> int:
    """An fd open for reading on the regular file at ``path``; the caller closes it."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a file).
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except ValueError:
        raise StampError("not_found", shown, "not found (the path contains a NUL byte)") from None
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_symlinks:
            reason = "unreadable (replaced by a symlink while being opened)"
            raise StampError("unreadable", shown, reason) from None
        raise _from_os_error(err, shown) from None
    try:
        _require_regular(os.fstat(fd).st_mode, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _digest_fd(
    fd: int, shown: str | Path, *, max_bytes: int | None, chunk_size: int = CHUNK_SIZE
) -> tuple[str, int, bytes]:
    """``(blake3 hex, size, first SNIFF_BYTES bytes)`` of what is left to read from ``fd``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size!r} is not a positive integer")
    try:
        st_size = os.fstat(fd).st_size
        if max_bytes is not None and st_size > max_bytes:
            raise StampError("too_large", shown, _too_large(max_bytes, st_size))
        os.set_blocking(fd, True)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        hasher = blake3()
        # A small file gets a small buffer: zeroing a whole chunk would cost more than hashing.
        buffer = bytearray(min(chunk_size, max(st_size + 1, _SMALL_BUFFER)))
        view = memoryview(buffer)
        head = bytearray()
        size = 0
        with open(fd, "rb", buffering=0, closefd=False) as file:
            while n := file.readinto(buffer):
                size += n
                if max_bytes is not None and size > max_bytes:
                    raise StampError("too_large", shown, _too_large(max_bytes, size, grew=True))
                hasher.update(view[:n])
                if len(head) < SNIFF_BYTES:
                    head += view[: min(n, SNIFF_BYTES - len(head))]
    except OSError as err:
        raise _from_os_error(err, shown) from None
    return hasher.hexdigest(), size, bytes(head)


def _fd_path(fd: int) -> str | None:
    """The path the kernel has for an open fd (Linux ``/proc``); ``None`` where unavailable."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _require_regular(mode: int, shown: str | Path) -> None:
    if stat.S_ISDIR(mode):
        raise StampError("not_a_file", shown, "not a file (a directory)")
    if not stat.S_ISREG(mode):
        raise StampError("not_a_file", shown, "not a regular file")


def _from_os_error(err: OSError, shown: str | Path) -> StampError:
    if err.errno == errno.EISDIR:
        return StampError("not_a_file", shown, "not a file (a directory)")
    if err.errno == errno.ELOOP:
        return StampError("not_found", shown, "not found (too many levels of symbolic links)")
    if err.errno in _NOT_FOUND_ERRNOS:
        return StampError("not_found", shown, "not found")
    return StampError("unreadable", shown, f"unreadable ({err.strerror or err})")


def _too_large(limit: int, size: int, *, grew: bool = False) -> str:
    if grew:
        return f"too large (more than the limit of {limit} bytes were read)"
    return f"too large ({size} bytes; the limit is {limit} bytes)"


# --- stamp lines ---------------------------------------------------------------------------------


def _encode_type(content_type: str) -> str:
    return quote(content_type, safe=_TYPE_SAFE, errors="surrogatepass")


def _parse_at(line: str, value: str) -> datetime:
    if not _AT.fullmatch(value):
        raise _bad_line(line, f"at={value!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError as err:
        raise _bad_line(line, f"at={value!r}: {err}") from None


def _bad_line(line: str, reason: str) -> ValueError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return ValueError(f"not a stamp line ({reason}): {shown!r}")


def _show(path: str | Path) -> str:
    """A path as one printable line: control characters and the like are escaped."""
    text = os.fspath(path) if isinstance(path, Path) else str(path)
    return text if text and text.isprintable() else repr(text)

"""A content-addressed artifact store: ``<base>/ab/cd/<blake3>.<ext>``, on a local directory
(written atomically) or on S3 (a conditional create: the same content is stored once).

The objects themselves are :mod:`stampflow.nodes.objectstore`'s: ``ArtifactStore(Path)`` is
a local directory, ``ArtifactStore.from_uri("s3://bucket/prefix", s3=S3Options(...))`` a bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stampflow.nodes.objectstore import (
    LocalObjectStore,
    ObjectStore,
    S3Options,
    content_key,
    open_store,
)

__all__ = ["ArtifactStore", "StoredArtifact", "artifact_path"]


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """A stored artifact: its BLAKE3 hash, size and URI (``file:///...`` or ``s3://...``);
    ``path`` is its local path in a ``file://`` store, else ``None``."""

    hash: str
    size: int
    uri: str
    path: Path | None = None


def artifact_path(root: Path, digest: str, suffix: str = ".png") -> Path:
    """Where content with BLAKE3 ``digest`` lives under ``root``."""
    return root.joinpath(*content_key(digest, suffix).split("/"))


class ArtifactStore:
    """Artifacts by content: ``ArtifactStore(Path)`` (local) or :meth:`from_uri`."""

    def __init__(self, root: Path | ObjectStore) -> None:
        self.objects: ObjectStore = (
            root if isinstance(root, ObjectStore) else LocalObjectStore(root))
        self._local = self.objects if isinstance(self.objects, LocalObjectStore) else None
        self.root: Path | None = self._local.root if self._local is not None else None

    @classmethod
    def from_uri(cls, uri: str, *, s3: S3Options | None = None) -> ArtifactStore:
        """The store at ``file:///dir`` or ``s3://bucket[/prefix]`` (``s3`` says how to reach
        the server; without it the ``AWS_*`` environment variables do)."""
        return cls(open_store(uri, s3=s3))

    @property
    def uri(self) -> str:
        return self.objects.uri

    def path_for(self, digest: str, suffix: str = ".png") -> Path:
        """The local path of an artifact; only a ``file://`` store has one."""
        if self._local is None:
            raise ValueError(f"artifact store {self.uri} is not local: artifacts have URIs, "
                             "not paths")
        return self._local.path_for(content_key(digest, suffix))

    def uri_for(self, digest: str, suffix: str = ".png") -> str:
        return self.objects.uri_for(content_key(digest, suffix))

    def put(self, data: bytes, suffix: str = ".png") -> StoredArtifact:
        """Store ``data`` once; the same content always lands at the same key."""
        stored = self.objects.put_content(data, suffix)
        path = self._local.path_for(stored.key) if self._local is not None else None
        return StoredArtifact(stored.hash, stored.size, stored.uri, path)

    def get(self, digest: str, suffix: str = ".png") -> bytes:
        """The artifact's bytes; :class:`FileNotFoundError` naming the hash when absent."""
        key = content_key(digest, suffix)
        try:
            return self.objects.get(key)
        except FileNotFoundError:
            where = self.objects.uri_for(key)
            raise FileNotFoundError(f"artifact {digest}: not in the store at {where}") from None

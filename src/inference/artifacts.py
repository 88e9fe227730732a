"""A content-addressed artifact store: ``root/ab/cd/<blake3>.<ext>``, written atomically."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import blake3

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,10}$")


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    hash: str
    size: int
    path: Path

    @property
    def uri(self) -> str:
        return self.path.as_uri()


def artifact_path(root: Path, digest: str, suffix: str = ".png") -> Path:
    """Where content with BLAKE3 ``digest`` lives under ``root``."""
    if not _HEX64.fullmatch(digest):
        raise ValueError(f"artifact hash {digest!r} is not 64 lowercase hex characters")
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"artifact suffix {suffix!r} is not a short lowercase extension")
    return root / digest[:2] / digest[2:4] / f"{digest}{suffix}"


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))

    def path_for(self, digest: str, suffix: str = ".png") -> Path:
        return artifact_path(self.root, digest, suffix)

    def put(self, data: bytes, suffix: str = ".png") -> StoredArtifact:
        """Store ``data`` once; the same content always lands at the same path."""
        digest = blake3.blake3(data).hexdigest()
        path = self.path_for(digest, suffix)
        if not (path.is_file() and path.stat().st_size == len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=suffix)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return StoredArtifact(digest, len(data), path)

    def get(self, digest: str, suffix: str = ".png") -> bytes:
        path = self.path_for(digest, suffix)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"artifact {digest}: not in the store at {path}") from None

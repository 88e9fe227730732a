"""Content-type sniffing: magic bytes first, then the file name, then a UTF-8 text check.

Only the name's extension is looked at, against Python's built-in table (not the host's
``/etc/mime.types``), so the same input gives the same answer on every machine.
"""

from __future__ import annotations

import codecs
import mimetypes
import posixpath
import re

SNIFF_BYTES = 4096
"""How much of the content's head the callers in this package pass to :func:`sniff_content_type`."""

TEXT_UTF8 = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"\x1f\x8b", "application/gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),  # an empty archive
    (b"PK\x07\x08", "application/zip"),  # a spanned archive
    (b"\x28\xb5\x2f\xfd", "application/zstd"),
)

# A name like "x.tar.gz" is guessed as ("application/x-tar", "gzip"): the bytes are gzip.
_ENCODINGS = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}

# C0 controls that plain text does not carry (all but \b \t \n \v \f \r and ESC) and DEL:
# content with one of them is binary, even when its bytes happen to be valid UTF-8. In UTF-8
# these bytes never occur inside a multi-byte character, so they can be searched for as bytes.
_NON_TEXT_BYTES = re.compile(rb"[\x00-\x07\x0e-\x1a\x1c-\x1f\x7f]")

_BUILTIN_TYPES = mimetypes.MimeTypes()  # built-in table only: no host files are read into it


def sniff_content_type(name: str | None, head: bytes, *, final: bool = False) -> str:
    """The content type of content that starts with ``head`` (and is called ``name``).

    ``final`` says ``head`` is the whole content. Without it a multi-byte UTF-8 character cut
    at the end of ``head`` is taken as text, since the rest of it would follow.
    """
    magic = _by_magic(head)
    if magic is not None:
        return magic
    if name:
        guessed = _by_name(name)
        if guessed is not None:
            return guessed
    return TEXT_UTF8 if _is_utf8_text(head, final=final) else BINARY


def _by_magic(head: bytes) -> str | None:
    for prefix, content_type in _MAGIC:
        if head.startswith(prefix):
            return content_type
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _by_name(name: str) -> str | None:
    base = posixpath.basename(name.replace("\\", "/"))
    if not base:
        return None
    # "./" keeps a base name such as "data:x,y" from being read as a data: URL.
    content_type, encoding = _BUILTIN_TYPES.guess_type("./" + base, strict=False)
    if encoding is not None:
        return _ENCODINGS.get(encoding, BINARY)
    return content_type


def _is_utf8_text(head: bytes, *, final: bool) -> bool:
    if _NON_TEXT_BYTES.search(head):
        return False
    try:
        codecs.getincrementaldecoder("utf-8")(errors="strict").decode(head, final=final)
    except UnicodeDecodeError:
        return False
    return True

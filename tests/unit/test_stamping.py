"""The BLAKE3 stamping compute node: hashes, stamp lines, sniffing, root confinement, errors."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stampflow.contracts.events import NAMESPACE_PATTERN
from stampflow.nodes.stamping import (
    ALGORITHM,
    CHUNK_SIZE,
    Stamp,
    StampError,
    StampingNode,
    hash_bytes,
    hash_file,
    resolve_in_root,
    sniff_content_type,
)

EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
ABC = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
ONE_ZERO_BYTE = "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213"
AT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"


def fixed_clock() -> datetime:
    return AT


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A content root holding a.txt, blob.bin and sub/, beside a file outside it."""
    base = tmp_path / "content"
    (base / "sub").mkdir(parents=True)
    (base / "a.txt").write_bytes(b"hello\n")
    (base / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "secret.txt").write_bytes(b"outside\n")
    return base


@pytest.fixture
def node(root: Path) -> StampingNode:
    return StampingNode(root, max_bytes=1024, clock=fixed_clock)


def code_of(node: StampingNode, path: str | Path) -> str:
    with pytest.raises(StampError) as info:
        node.stamp_path(path, namespace="default")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{info.value.path}: ")
    return info.value.code


# --- hashes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"), [(b"", EMPTY), (b"abc", ABC), (b"\x00", ONE_ZERO_BYTE)]
)
def test_known_vectors(tmp_path: Path, data: bytes, expected: str) -> None:
    assert hash_bytes(data) == expected
    assert hash_bytes(memoryview(data)) == expected
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hash_file(path) == (expected, len(data))


def test_identical_content_identical_hash(root: Path, node: StampingNode) -> None:
    (root / "copy.txt").write_bytes(b"hello\n")
    first = node.stamp_path("a.txt", namespace="default")
    second = node.stamp_path(root / "copy.txt", namespace="other")
    inline = node.stamp_bytes(b"hello\n", namespace="default")
    assert first.hash == second.hash == inline.hash == hash_bytes(b"hello\n")
    assert first.size == second.size == inline.size == 6
    assert node.stamp_bytes(b"hello!", namespace="default").hash != first.hash


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE])
def test_hash_file_at_the_real_chunk_size(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hash_file(path) == (hash_bytes(data), size)


@st.composite
def chunked_data(draw: st.DrawFn) -> tuple[int, bytes]:
    """A chunk size and data whose length is near a multiple of it (0 to 4 chunks, +-2)."""
    chunk = draw(st.integers(min_value=1, max_value=64))
    size = max(0, draw(st.integers(0, 4)) * chunk + draw(st.integers(-2, 2)))
    return chunk, draw(st.binary(min_size=size, max_size=size))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=chunked_data())
def test_hash_file_equals_hash_bytes(tmp_path: Path, case: tuple[int, bytes]) -> None:
    chunk, data = case
    path = tmp_path / "blob"
    path.write_bytes(data)  # overwritten by every example
    assert hash_file(path, chunk_size=chunk) == (hash_bytes(data), len(data))
    assert hash_file(path, chunk_size=chunk, max_bytes=len(data)) == (hash_bytes(data), len(data))


# --- stamps and stamp lines ----------------------------------------------------------------------


def test_stamp_fields(node: StampingNode) -> None:
    stamp = node.stamp_path("a.txt", namespace="team-a")
    assert stamp == Stamp(hash_bytes(b"hello\n"), 6, "text/plain", ALGORITHM, "team-a", AT)
    assert stamp.stamped_at.tzinfo is UTC
    assert len({stamp, Stamp.parse_line(stamp.line())}) == 1  # hashable, equal


def test_line_format() -> None:
    stamp = Stamp(EMPTY, 0, TEXT, "blake3", "default", AT)
    assert stamp.line() == (
        f"stampflow/1 blake3:{EMPTY} size=0 type=text/plain;%20charset=utf-8 ns=default "
        "at=2024-05-06T07:08:09.123456Z"
    )
    assert Stamp.parse_line(stamp.line() + "\n") == stamp


def test_stamped_at_is_normalised_to_utc() -> None:
    at = datetime(2024, 5, 6, 9, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    stamp = Stamp(EMPTY, 0, TEXT, "blake3", "default", at)
    assert stamp.stamped_at == AT
    assert stamp.stamped_at.tzinfo is UTC
    assert stamp.line().endswith("at=2024-05-06T07:08:09.123456Z")


@given(
    digest=st.binary(min_size=32, max_size=32).map(bytes.hex),
    size=st.integers(min_value=0, max_value=2**63),
    content_type=st.text(min_size=1, max_size=80),
    namespace=st.from_regex(NAMESPACE_PATTERN, fullmatch=True),
    at=st.datetimes(timezones=st.timezones()),
)
def test_line_round_trip(
    digest: str, size: int, content_type: str, namespace: str, at: datetime
) -> None:
    stamp = Stamp(digest, size, content_type, ALGORITHM, namespace, at)
    line = stamp.line()
    assert line.isascii()
    assert line.isprintable()
    assert Stamp.parse_line(line) == stamp


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "expected 6 space-separated fields, got 1"),
        (f"stampflow/2 blake3:{EMPTY} size=0 type=a ns=d at=2024-05-06T07:08:09.123456Z",
         "unsupported version"),
        (f"stampflow/1 sha256:{EMPTY} size=0 type=a ns=d at=2024-05-06T07:08:09.123456Z",
         "expected 'blake3:<64 lowercase hex>'"),
        (f"stampflow/1 blake3:{EMPTY.upper()} size=0 type=a ns=d at=2024-05-06T07:08:09.123456Z",
         "expected 'blake3:<64 lowercase hex>'"),
        (f"stampflow/1 blake3:{EMPTY} size=-1 type=a ns=d at=2024-05-06T07:08:09.123456Z",
         "is not a non-negative integer"),
        (f"stampflow/1 blake3:{EMPTY} size=01 type=a ns=d at=2024-05-06T07:08:09.123456Z",
         "is not a non-negative integer"),
        (f"stampflow/1 blake3:{EMPTY} type=a size=0 ns=d at=2024-05-06T07:08:09.123456Z",
         "expected 'size=...'"),
        (f"stampflow/1 blake3:{EMPTY} size=0 type= ns=d at=2024-05-06T07:08:09.123456Z",
         "is not a percent-encoded type"),
        (f"stampflow/1 blake3:{EMPTY} size=0 type=%41 ns=d at=2024-05-06T07:08:09.123456Z",
         "is not a percent-encoded type"),
        (f"stampflow/1 blake3:{EMPTY} size=0 type=a ns=Bad at=2024-05-06T07:08:09.123456Z",
         "stamp namespace 'Bad' does not match"),
        (f"stampflow/1 blake3:{EMPTY} size=0 type=a ns=d at=2024-05-06T07:08:09Z",
         "is not YYYY-MM-DDTHH:MM:SS.ffffffZ"),
        (f"stampflow/1 blake3:{EMPTY} size=0 type=a ns=d at=2024-02-30T07:08:09.123456Z",
         "day is out of range"),
    ],
)
def test_parse_line_rejects(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^not a stamp line") as info:
        Stamp.parse_line(line)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hash", "ab", "is not 64 lowercase hex characters"),
        ("size", -1, "is not a non-negative integer"),
        ("content_type", "", "is empty"),
        ("algorithm", "sha256", "is not 'blake3'"),
        ("namespace", "no spaces", "does not match"),
        ("stamped_at", datetime(2024, 1, 1), "is not timezone-aware"),
    ],
)
def test_stamp_validates(field: str, value: object, message: str) -> None:
    fields: dict[str, object] = {
        "hash": EMPTY, "size": 0, "content_type": TEXT, "algorithm": "blake3",
        "namespace": "default", "stamped_at": AT,
    }
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        Stamp(**fields)  # type: ignore[arg-type]


# --- content types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        (None, b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
        (None, b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (None, b"GIF89a\x01\x00", "image/gif"),
        (None, b"GIF87a\x01\x00", "image/gif"),
        (None, b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (None, b"RIFF\x24\x00\x00\x00WAVEfmt ", BINARY),
        (None, b"%PDF-1.7\n", "application/pdf"),
        (None, b"\x1f\x8b\x08\x00", "application/gzip"),
        (None, b"PK\x03\x04\x14\x00", "application/zip"),
        (None, b"PK\x05\x06" + bytes(18), "application/zip"),
        (None, b"\x28\xb5\x2f\xfd\x04\x00", "application/zstd"),
        ("photo.png", b"%PDF-1.4", "application/pdf"),  # the bytes win over the name
        ("page.html", b"\x00\x01", "text/html"),
        ("dir/report.PDF", b"", "application/pdf"),
        ("data.json", b"{}", "application/json"),
        ("backup.tar.gz", b"not really gzip", "application/gzip"),
        ("data:image/png,x", b"\x00", BINARY),  # a name, not a data: URL
        ("notes.unknown-ext", "héllo wörld\n".encode(), TEXT),
        (None, b"", TEXT),
        (None, "plain text, ünïcödé, 😀\n".encode(), TEXT),
        (None, b"tab\tand\r\nnewline\x1b[0m", TEXT),
        (None, b"abc\xff", BINARY),  # not UTF-8
        (None, b"a\x00b", BINARY),  # valid UTF-8, but NUL means binary
        (None, b"\x7fELF\x02\x01", BINARY),
    ],
)
def test_sniff(name: str | None, head: bytes, expected: str) -> None:
    assert sniff_content_type(name, head) == expected


def test_sniff_multibyte_cut_at_the_end_of_head() -> None:
    cut = "😀".encode()[:3]
    assert sniff_content_type(None, b"ok " + cut) == TEXT
    assert sniff_content_type(None, b"ok " + cut, final=True) == BINARY


def test_sniffed_file_cut_mid_character(root: Path) -> None:
    # The head is the first 4096 bytes; a 4-byte character straddles its end.
    node = StampingNode(root, max_bytes=1 << 20)
    (root / "long").write_bytes(b"x" * 4094 + "😀".encode() * 10)
    assert node.stamp_path("long", namespace="default").content_type == TEXT
    (root / "short").write_bytes(b"x" * 10 + "😀".encode()[:2])  # whole content, cut
    assert node.stamp_path("short", namespace="default").content_type == BINARY


def test_stamp_bytes_content_type(node: StampingNode) -> None:
    assert node.stamp_bytes(b"\x89PNG\r\n\x1a\n", namespace="d").content_type == "image/png"
    assert node.stamp_bytes(b"{}", namespace="d", name="x.json").content_type == (
        "application/json"
    )
    given_type = node.stamp_bytes(b"{}", namespace="d", content_type=" application/x-mine ")
    assert given_type.content_type == "application/x-mine"
    assert node.stamp_bytes(b"hi", namespace="d", content_type="  ").content_type == TEXT


# --- root confinement ----------------------------------------------------------------------------


def test_paths_inside_the_root(root: Path, node: StampingNode) -> None:
    (root / "sub" / "inner.txt").write_bytes(b"inner")
    (root / "link.txt").symlink_to("sub/inner.txt")
    expected = hash_bytes(b"inner")
    paths: list[str | Path] = ["sub/inner.txt", "sub/../sub/inner.txt", "./link.txt",
                               root / "sub/inner.txt"]
    for path in paths:
        assert resolve_in_root(root, path) == (root / "sub" / "inner.txt").resolve()
        assert node.stamp_path(path, namespace="default").hash == expected


def test_root_given_through_a_symlink(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert resolve_in_root(alias, "a.txt") == (root / "a.txt").resolve()
    assert StampingNode(alias, max_bytes=10).stamp_path(alias / "a.txt", namespace="d").size == 6


@pytest.mark.parametrize(
    "path", ["../secret.txt", "sub/../../secret.txt", "../missing", "/etc/passwd", "/"]
)
def test_traversal_is_outside_root(root: Path, node: StampingNode, path: str) -> None:
    assert code_of(node, path) == "outside_root"
    with pytest.raises(StampError, match="outside the content root"):
        resolve_in_root(root, path)


def test_symlink_escapes_are_outside_root(root: Path, node: StampingNode) -> None:
    (root / "file-link").symlink_to(root.parent / "secret.txt")
    (root / "dir-link").symlink_to(root.parent)
    (root / "sub" / "rel-link").symlink_to("../../secret.txt")
    (root / "dangling-out").symlink_to(root.parent / "missing")
    for path in ["file-link", "dir-link/secret.txt", "sub/rel-link", "dangling-out"]:
        assert code_of(node, path) == "outside_root", path


def test_swapped_for_a_symlink_after_the_check(tmp_path: Path, root: Path) -> None:
    """A component replaced by a symlink between resolving and opening is still caught."""
    node = StampingNode(root, max_bytes=1024)
    (root / "sub" / "f").write_bytes(b"inside")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "f").write_bytes(b"outside")

    checked = resolve_in_root(root, "sub/f")
    (root / "sub" / "f").unlink()
    (root / "sub" / "f").symlink_to(outside / "f")
    with pytest.raises(StampError) as info:
        node._digest_resolved(checked, "sub/f", max_bytes=1024)
    assert info.value.code == "unreadable"

    (root / "sub" / "f").unlink()
    (root / "sub").rmdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(StampError) as info:
        node._digest_resolved(checked, "sub/f", max_bytes=1024)
    assert info.value.code == "outside_root"


# --- errors --------------------------------------------------------------------------------------


def test_not_found(root: Path, node: StampingNode) -> None:
    (root / "dangling").symlink_to("nowhere")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    for path in ["missing.txt", "sub/missing", "a.txt/below-a-file", "dangling", "loop-a",
                 "nul\x00byte", "x" * 5000]:
        assert code_of(node, path) == "not_found", path
    with pytest.raises(StampError, match=r"^'missing\\n': not found$"):
        node.stamp_path("missing\n", namespace="default")
    with pytest.raises(StampError, match="not found") as info:
        hash_file(root / "missing.txt")
    assert info.value.code == "not_found"


def test_not_a_file(root: Path, node: StampingNode) -> None:
    os.mkfifo(root / "fifo")  # refused without blocking on the FIFO
    (root / "dir-link").symlink_to("sub")
    for path in ["sub", ".", "", "dir-link", "fifo"]:
        assert code_of(node, path) == "not_a_file", path
    for special in [root / "sub", root / "fifo", Path("/dev/null")]:
        with pytest.raises(StampError) as info:
            hash_file(special)
        assert info.value.code == "not_a_file"


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_unreadable_read_error() -> None:
    """/proc/self/mem opens as a regular file but reading at offset 0 fails with EIO."""
    node = StampingNode(Path("/proc/self"), max_bytes=1024)
    with pytest.raises(StampError, match=r"^mem: unreadable \(Input/output error\)$") as info:
        node.stamp_path("mem", namespace="default")
    assert info.value.code == "unreadable"
    with pytest.raises(StampError) as info:
        hash_file("/proc/self/mem")
    assert info.value.code == "unreadable"


def test_unreadable_permission_denied(root: Path, node: StampingNode) -> None:
    (root / "a.txt").chmod(0)
    try:
        if _can_open(root / "a.txt"):  # root, or CAP_DAC_OVERRIDE
            pytest.skip("this process may read a mode-000 file")
        with pytest.raises(StampError, match=r"^a.txt: unreadable \(Permission denied\)$"):
            node.stamp_path("a.txt", namespace="default")
    finally:
        (root / "a.txt").chmod(0o644)


def _can_open(path: Path) -> bool:
    try:
        path.open("rb").close()
    except PermissionError:
        return False
    return True


def test_too_large(root: Path) -> None:
    node = StampingNode(root, max_bytes=5)
    assert code_of(node, "a.txt") == "too_large"  # 6 bytes, known from st_size
    with pytest.raises(StampError, match=r"^<inline content>: too large \(6 bytes; the limit "):
        node.stamp_bytes(b"hello\n", namespace="default")
    with pytest.raises(StampError, match=r"^x.bin: too large") as info:
        node.stamp_bytes(b"hello\n", namespace="default", name="x.bin")
    assert info.value.code == "too_large"
    assert node.stamp_bytes(b"hello", namespace="default").size == 5
    with pytest.raises(StampError, match="too large"):
        hash_file(root / "a.txt", max_bytes=5)
    assert hash_file(root / "a.txt", max_bytes=6)[1] == 6


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_too_large_while_streaming() -> None:
    """/proc files report st_size 0, so only the count of bytes read can stop them."""
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(StampError, match="more than the limit of 16 bytes were read") as info:
        hash_file("/proc/self/status", max_bytes=16, chunk_size=4)
    assert info.value.code == "too_large"


def test_errors_are_one_line_and_pickle(root: Path) -> None:
    import pickle

    err = StampError("not_found", Path("a\nb"), "not found")
    assert str(err) == "'a\\nb': not found"
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, str(again)) == ("not_found", str(err))


def test_max_bytes_must_be_non_negative(root: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes -1 is not a non-negative integer"):
        StampingNode(root, max_bytes=-1)


# --- verify --------------------------------------------------------------------------------------


def test_verify(root: Path, node: StampingNode) -> None:
    stamp = node.stamp_path("a.txt", namespace="default")
    assert node.verify(stamp, data=b"hello\n")
    assert node.verify(stamp, path="a.txt")
    assert not node.verify(stamp, data=b"hello!")  # same size, other bytes
    assert not node.verify(stamp, data=b"hello")  # other size
    (root / "a.txt").write_bytes(b"hello!")
    assert not node.verify(stamp, path="a.txt")
    (root / "a.txt").write_bytes(b"hello\n and more")  # larger than stamped: not read at all
    assert not node.verify(stamp, path="a.txt")
    with pytest.raises(StampError, match="not found"):
        node.verify(stamp, path="missing")
    with pytest.raises(StampError, match="outside the content root"):
        node.verify(stamp, path="../secret.txt")


def test_verify_needs_exactly_one_source(node: StampingNode) -> None:
    stamp = node.stamp_bytes(b"", namespace="default")
    with pytest.raises(ValueError, match="exactly one of data= or path="):
        node.verify(stamp)
    with pytest.raises(ValueError, match="exactly one of data= or path="):
        node.verify(stamp, data=b"", path="a.txt")
    assert node.verify(stamp, data=b"")


def test_verify_refuses_a_stamp_larger_than_the_limit(node: StampingNode) -> None:
    stamp = Stamp(EMPTY, 10**9, TEXT, ALGORITHM, "default", AT)
    with pytest.raises(StampError, match=r"^a.txt: too large \(1000000000 bytes; the limit"):
        node.verify(stamp, path="a.txt")


def test_hash_file_matches_an_incremental_hash(tmp_path: Path) -> None:
    blocks = [os.urandom(1000) for _ in range(50)]
    path = tmp_path / "f"
    path.write_bytes(b"".join(blocks))
    hasher = blake3()
    for block in blocks:
        hasher.update(block)
    assert hash_file(path, chunk_size=777) == (hasher.hexdigest(), 50_000)

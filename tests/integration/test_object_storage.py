"""Object storage against a real S3-API server (moto, in a process of its own): artifacts on
s3://, and stamping s3:// objects streamed in bounded memory, inside the allowed prefixes."""

from __future__ import annotations

import os
import tracemalloc
import uuid
from collections.abc import Generator
from pathlib import Path

import blake3
import pytest

from stampflow.contracts.events import GenerationRequested
from stampflow.inference.artifacts import ArtifactStore
from stampflow.nodes.objectstore import (
    CHUNK_SIZE,
    ObjectInfo,
    S3ObjectStore,
    content_key,
)
from stampflow.nodes.stamping import StampError, StampingNode
from stampflow.testing.pytest_plugin import Services
from stampflow.testing.s3 import S3Server
from stampflow.testing.stack import fetch, finished_count, running_stack, settings_for, wait_for

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh bucket per test."""
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


def _keys(s3_server: S3Server, bucket: str) -> list[str]:
    import obstore

    store = S3ObjectStore(bucket, "", s3_server.options)
    listed = obstore.list(store._store).collect()  # the raw store: every key in the bucket
    return sorted(meta["path"] for meta in listed)


# --- artifacts -----------------------------------------------------------------------------------


def test_artifacts_round_trip_on_s3(s3_server: S3Server, bucket: str) -> None:
    store = ArtifactStore.from_uri(f"s3://{bucket}/gen/v1", s3=s3_server.options)
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)
    digest = blake3.blake3(data).hexdigest()
    first = store.put(data)
    assert (first.hash, first.size, first.path) == (digest, len(data), None)
    assert first.uri == f"s3://{bucket}/gen/v1/{digest[:2]}/{digest[2:4]}/{digest}.png"
    second = store.put(data)  # the same content again: no failure, the same artifact
    assert second == first
    assert _keys(s3_server, bucket) == [f"gen/v1/{content_key(digest, '.png')}"]
    assert store.get(digest) == data
    with pytest.raises(FileNotFoundError, match=f"artifact {'0' * 64}: not in the store at s3://"):
        store.get("0" * 64)


def test_s3_put_if_absent_is_a_conditional_create(s3_server: S3Server, bucket: str) -> None:
    """The server honours If-None-Match: an existing key is neither overwritten nor an error."""
    store = S3ObjectStore(bucket, "cas", s3_server.options)
    assert store.put_if_absent("k", b"first") is True
    assert store.put_if_absent("k", b"other bytes") is False
    assert store.get("k") == b"first"
    assert store.head("k").size == 5
    stored = store.put_content(b"payload", ".bin")
    again = store.put_content(b"payload", ".bin")
    assert (stored.created, again.created) == (True, False)
    assert again.uri == stored.uri == f"s3://{bucket}/cas/{stored.key}"


def test_artifacts_on_file_uri_unchanged(tmp_path: Path) -> None:
    store = ArtifactStore.from_uri((tmp_path / "art").as_uri())
    data = b"png bytes"
    stored = store.put(data)
    assert stored.path is not None and stored.path.read_bytes() == data
    assert stored.uri == stored.path.as_uri()
    assert stored.path == store.path_for(stored.hash)
    assert store.get(stored.hash) == data


# --- stamping s3:// objects ----------------------------------------------------------------------


def _node(s3_server: S3Server, tmp_path: Path, content_objects: dict[str, list[str]] | None,
          max_bytes: int = 64 * MIB) -> StampingNode:
    return StampingNode(tmp_path, max_bytes=max_bytes, content_objects=content_objects,
                        s3=s3_server.options)


def _put(s3_server: S3Server, bucket: str, key: str, data: bytes) -> None:
    assert S3ObjectStore(bucket, "", s3_server.options).put_if_absent(key, data)


def _refused(node: StampingNode, path: str, namespace: str = "ns") -> StampError:
    with pytest.raises(StampError) as info:
        node.stamp_path(path, namespace=namespace)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: ")
    return info.value


def test_stamp_large_object_streams_in_bounded_memory(s3_server: S3Server, bucket: str,
                                                      tmp_path: Path) -> None:
    size = 20 * MIB + 12345  # many chunks, and a last short one
    data = os.urandom(size)
    _put(s3_server, bucket, "inbox/big.bin", data)
    expected = blake3.blake3(data).hexdigest()
    node = _node(s3_server, tmp_path, {"ns": [f"s3://{bucket}/inbox/"]})
    del data

    tracemalloc.start()
    try:
        stamp = node.stamp_path(f"s3://{bucket}/inbox/big.bin", namespace="ns")
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # The control: reading the whole object is seen by the same measure.
        whole = S3ObjectStore(bucket, "", s3_server.options).get("inbox/big.bin")
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (stamp.hash, stamp.size, stamp.namespace) == (expected, size, "ns")
    assert stamp.content_type == "application/octet-stream"
    assert len(whole) == size and whole_peak >= size
    assert streamed_peak < 8 * CHUNK_SIZE, f"peak {streamed_peak} bytes for a {size}-byte object"
    assert node.verify(stamp, path=f"s3://{bucket}/inbox/big.bin")


def test_stamp_small_object_sniffs_its_type(s3_server: S3Server, bucket: str,
                                            tmp_path: Path) -> None:
    _put(s3_server, bucket, "shared/note.txt", b"hello\n")
    node = _node(s3_server, tmp_path, {"*": [f"s3://{bucket}/shared"]})
    stamp = node.stamp_path(f"s3://{bucket}/shared/note.txt", namespace="anyone")
    assert stamp.hash == blake3.blake3(b"hello\n").hexdigest() and stamp.size == 6
    assert stamp.content_type.startswith("text/plain")
    # An empty object is content too.
    _put(s3_server, bucket, "shared/empty", b"")
    assert node.stamp_path(f"s3://{bucket}/shared/empty", namespace="x").size == 0


def test_stamp_refuses_objects_outside_the_allowed_prefixes(
        s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    other = s3_server.create_bucket(f"o-{uuid.uuid4().hex[:12]}")
    for b, key in ((bucket, "allowed/a.txt"), (bucket, "secret"), (bucket, "team-b/b.txt"),
                   (bucket, "allowed-not/c.txt"), (other, "allowed/a.txt")):
        _put(s3_server, b, key, b"exists")
    node = _node(s3_server, tmp_path, {"ns": [f"s3://{bucket}/allowed/"],
                                       "team-b": [f"s3://{bucket}/team-b/"]})
    assert node.stamp_path(f"s3://{bucket}/allowed/a.txt", namespace="ns").size == 6
    cases = {
        f"s3://{other}/allowed/a.txt": f"bucket '{other}' is not allowed for namespace 'ns'",
        f"s3://{bucket}/team-b/b.txt": "not under a prefix allowed for namespace 'ns'",
        f"s3://{bucket}/allowed-not/c.txt": "not under a prefix allowed for namespace 'ns'",
        f"s3://{bucket}/allowed/../secret": "the key holds '..'",
        f"s3://{bucket}/allowed//../secret": "the key holds an empty segment",
        f"s3://{bucket}//secret": "the key holds an empty segment",
    }
    for path, reason in cases.items():
        err = _refused(node, path)
        assert err.code == "outside_root", path
        assert err.reason.startswith("outside the allowed objects ("), err.reason
        assert reason in err.reason, err.reason
    # The namespace that owns team-b/ may read it.
    assert node.stamp_path(f"s3://{bucket}/team-b/b.txt", namespace="team-b").size == 6


def test_stamp_refuses_when_s3_is_not_configured(s3_server: S3Server, bucket: str,
                                                 tmp_path: Path) -> None:
    _put(s3_server, bucket, "a.txt", b"exists")
    err = _refused(_node(s3_server, tmp_path, None), f"s3://{bucket}/a.txt")
    assert err.code == "outside_root"
    assert err.reason == ("outside the content root (no object storage is configured for "
                          "stamping)")


def test_stamp_refuses_a_too_large_object_before_reading_it(
        s3_server: S3Server, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _put(s3_server, bucket, "in/big.bin", b"x" * 5000)
    node = _node(s3_server, tmp_path, {"ns": [f"s3://{bucket}/in/"]}, max_bytes=4096)

    def no_read(*args: object, **kwargs: object) -> Generator[bytes, None, None]:
        raise AssertionError("the object was read")
        yield b""  # pragma: no cover - makes this a generator

    monkeypatch.setattr(S3ObjectStore, "stream", no_read)
    err = _refused(node, f"s3://{bucket}/in/big.bin")
    assert (err.code, err.reason) == ("too_large",
                                      "too large (5000 bytes; the limit is 4096 bytes)")


def test_stamp_counts_while_streaming(s3_server: S3Server, bucket: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """If the size from head was wrong (the object grew), the read stops at the limit."""
    _put(s3_server, bucket, "in/grew.bin", b"y" * 3 * MIB)
    node = _node(s3_server, tmp_path, {"ns": [f"s3://{bucket}/in/"]}, max_bytes=2 * MIB)
    real_head = S3ObjectStore.head

    def stale_head(self: S3ObjectStore, key: str) -> ObjectInfo:
        return ObjectInfo(1024, real_head(self, key).etag)

    monkeypatch.setattr(S3ObjectStore, "head", stale_head)
    err = _refused(node, f"s3://{bucket}/in/grew.bin")
    assert err.code == "too_large" and "were read" in err.reason


def test_stamp_refuses_an_object_that_changed_since_head(
        s3_server: S3Server, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _put(s3_server, bucket, "in/v.bin", b"version 2")
    node = _node(s3_server, tmp_path, {"ns": [f"s3://{bucket}/in/"]})
    monkeypatch.setattr(S3ObjectStore, "head",
                        lambda self, key: ObjectInfo(9, '"etag-of-version-1"'))
    err = _refused(node, f"s3://{bucket}/in/v.bin")
    assert (err.code, err.reason) == ("unreadable",
                                      "unreadable (the object changed while being read)")


def test_stamp_missing_object_or_bucket_is_not_found(s3_server: S3Server, bucket: str,
                                                     tmp_path: Path) -> None:
    node = _node(s3_server, tmp_path, {"*": [f"s3://{bucket}/in/", "s3://no-such-bucket-x/"]})
    for path in (f"s3://{bucket}/in/missing.bin", "s3://no-such-bucket-x/a"):
        err = _refused(node, path)
        assert (err.code, err.reason) == ("not_found", "not found"), path


# Rust-side buffers are invisible to tracemalloc: the whole process's peak RSS is measured too,
# in a fresh interpreter (VmHWM starts afresh at exec).
RSS_CHILD = """
import json, sys
from pathlib import Path
from stampflow.nodes.objectstore import S3Options
from stampflow.nodes.stamping import StampingNode

def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))

endpoint, uri = sys.argv[1], sys.argv[2]
options = S3Options(endpoint_url=endpoint, allow_http=True, region="us-east-1",
                    access_key_id="test", secret_access_key="test")
node = StampingNode(Path("."), max_bytes=1 << 30, content_objects={"*": [uri.rsplit("/", 1)[0]]},
                    s3=options)
before = peak_kib()
stamp = node.stamp_path(uri, namespace="large")
print(json.dumps({"hash": stamp.hash, "size": stamp.size, "before": before,
                  "after": peak_kib()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_stamp_large_object_keeps_rss_small(s3_server: S3Server, bucket: str) -> None:
    import json
    import subprocess
    import sys

    size = 128 * MIB
    data = os.urandom(size)
    _put(s3_server, bucket, "big.bin", data)
    expected = blake3.blake3(data).hexdigest()
    del data
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(src), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, s3_server.endpoint_url,
                          f"s3://{bucket}/big.bin"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert (result["hash"], result["size"]) == (expected, size)
    grown_kib = result["after"] - result["before"]
    assert grown_kib < 32 * 1024, f"stamping {size} bytes grew the peak RSS by {grown_kib} KiB"


@pytest.mark.slow
async def test_the_stack_stores_images_and_stamps_objects_on_s3(
    services: Services, fresh_database_url: str, topic_prefix: str, tmp_path: Path,
    tiny_flux_model: Path, s3_server: S3Server, bucket: str,
) -> None:
    """Settings alone switch the running nodes to S3: an image lands at an s3:// URI, and a
    stamp request naming an allowed object is stamped from it (one outside is refused)."""
    endpoints = services.endpoints.with_database(fresh_database_url)
    content = os.urandom(3 * 1024 * 1024 + 17)
    store = S3ObjectStore(bucket, "", s3_server.options)
    store.put_if_absent("inbox/a.bin", content)
    store.put_if_absent("private/b.bin", b"secret")
    settings = settings_for(
        endpoints, topic_prefix, tmp_path, models={"tiny": str(tiny_flux_model)},
        artifact_uri=f"s3://{bucket}/images", s3_endpoint_url=s3_server.endpoint_url,
        s3_region="us-east-1", s3_allow_http=True, s3_access_key_id="test",
        s3_secret_access_key="test", content_objects={"lab": [f"s3://{bucket}/inbox/"]})
    async with running_stack(settings, endpoints) as stack:
        c = stack.client
        await c.submit_generation("lab", GenerationRequested(
            prompt="a cat", seed=3, width=64, height=64, num_inference_steps=1, model="tiny"))
        await c.submit_stamp("lab", path=f"s3://{bucket}/inbox/a.bin")
        await c.submit_stamp("lab", path=f"s3://{bucket}/private/b.bin")
        await wait_for(lambda: _finished(fresh_database_url, 3), 120, "3 workflows")
    rows = await fetch(fresh_database_url, "SELECT artifact_uri, hash FROM generations")
    assert len(rows) == 1 and rows[0]["artifact_uri"].startswith(f"s3://{bucket}/images/")
    key = rows[0]["artifact_uri"].removeprefix(f"s3://{bucket}/")
    assert blake3.blake3(store.get(key)).hexdigest() == rows[0]["hash"]
    stamped = await fetch(fresh_database_url, "SELECT hash, source FROM stamps WHERE source "
                                              "LIKE '%.bin'")
    assert stamped == [{"hash": blake3.blake3(content).hexdigest(),
                        "source": f"s3://{bucket}/inbox/a.bin"}]
    failed = await fetch(fresh_database_url, "SELECT error_code, reason FROM workflows "
                                             "WHERE state = 'failed'")
    assert len(failed) == 1 and failed[0]["error_code"] == "outside_root"
    assert "private/b.bin" in failed[0]["reason"]


async def _finished(url: str, n: int) -> bool:
    return await finished_count(url) >= n

"""The object store's pure parts: URIs and keys, content keys, which objects a namespace may
stamp, the local store, and the refusals a stamping node makes before touching any server."""

from __future__ import annotations

import re
from pathlib import Path

import blake3
import pytest
from pydantic import ValidationError

from stampflow.inference.artifacts import ArtifactStore
from stampflow.nodes.objectstore import (
    ContentPrefixes,
    LocalObjectStore,
    ObjectURI,
    ObjectURIError,
    S3ObjectStore,
    S3Options,
    content_key,
    is_s3_uri,
    open_store,
    parse_uri,
)
from stampflow.nodes.stamping import StampError, StampingNode
from stampflow.settings import Settings

DIGEST = "abcd" + "0" * 60

# --- URIs and keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://bucket", ObjectURI("s3", "bucket", "")),
    ("s3://bucket/", ObjectURI("s3", "bucket", "")),
    ("s3://my.bucket-1/a/b.txt", ObjectURI("s3", "my.bucket-1", "a/b.txt")),
    ("s3://bucket/prefix/", ObjectURI("s3", "bucket", "prefix/")),
    ("S3://bucket/k", ObjectURI("s3", "bucket", "k")),
    # Taken literally, as the AWS CLI does: never percent-decoded, '#' and '?' are key text.
    ("s3://bucket/a/%2e%2e/b", ObjectURI("s3", "bucket", "a/%2e%2e/b")),
    ("s3://bucket/a#b?c", ObjectURI("s3", "bucket", "a#b?c")),
    ("file:///srv/artifacts", ObjectURI("file", "", "/srv/artifacts")),
    ("file://localhost/srv/a%20b", ObjectURI("file", "", "/srv/a b")),
])
def test_parse_uri_accepts(uri: str, expected: ObjectURI) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(("uri", "reason"), [
    ("s3://bucket/a/../secret", r"the key holds '\.\.'"),
    ("s3://bucket/..", r"the key holds '\.\.'"),
    ("s3://bucket/a/./b", r"the key holds '\.'"),
    ("s3://bucket//etc/passwd", "empty segment"),
    ("s3://bucket/a//b", "empty segment"),
    ("s3://bucket/a\\b", "backslash"),
    ("s3://bucket/a\nb", "control characters"),
    ("s3://Bucket/a", "not a valid S3 bucket name"),
    ("s3://b/a", "not a valid S3 bucket name"),
    ("s3://bucket..x/a", "not a valid S3 bucket name"),
    ("s3:///a", "not a valid S3 bucket name"),
    ("s3://bucket:9000/a", "not a valid S3 bucket name"),
    ("s3://bucket/" + "k" * 1025, "at most 1024 bytes"),
    ("http://bucket/a", "unsupported scheme"),
    ("/srv/artifacts", "unsupported scheme"),
    ("file://host/srv", "no host"),
    ("file:///srv/../etc", r"'\.\.'"),
    ("file:///srv?x=1", "no host, query or fragment"),
    ("file:///srv/%ff", "not percent-encoded UTF-8"),
    ("", "not a URI"),
])
def test_parse_uri_refuses_with_one_line(uri: str, reason: str) -> None:
    with pytest.raises(ObjectURIError, match=reason) as info:
        parse_uri(uri)
    assert "\n" not in str(info.value)


def test_is_s3_uri() -> None:
    assert is_s3_uri("s3://bucket/key") and is_s3_uri("S3://bucket/key")
    assert not is_s3_uri("s3:/bucket/key") and not is_s3_uri("data/s3://x")
    assert not is_s3_uri(Path("s3://bucket/key"))  # a Path is a local path


def test_object_uri_round_trips_through_str() -> None:
    for uri in ("s3://bucket/a/b.png", "file:///srv/a%20b"):
        assert str(parse_uri(uri)) == uri


def test_content_key_layout_and_checks() -> None:
    assert content_key(DIGEST, ".png") == f"ab/cd/{DIGEST}.png"
    assert content_key(DIGEST) == f"ab/cd/{DIGEST}"
    with pytest.raises(ValueError, match="not 64 lowercase hex"):
        content_key("../" + DIGEST[3:])
    with pytest.raises(ValueError, match="suffix"):
        content_key(DIGEST, "/x")


# --- which objects a namespace may stamp ---------------------------------------------------------


PREFIXES = ContentPrefixes.parse({
    "*": ["s3://shared/public"],
    "team-a": ["s3://data/team-a/", "s3://whole-bucket"],
})


@pytest.mark.parametrize(("uri", "namespace", "refused"), [
    ("s3://shared/public/x.bin", "anyone", None),
    ("s3://shared/public/deep/x.bin", "team-a", None),  # "*" applies to every namespace
    ("s3://data/team-a/x.bin", "team-a", None),
    ("s3://whole-bucket/any/key", "team-a", None),
    ("s3://data/team-a/x.bin", "team-b", "bucket 'data' is not allowed for namespace 'team-b'"),
    ("s3://data/team-b/x.bin", "team-a", "not under a prefix allowed for namespace 'team-a'"),
    # A prefix is a whole folder: "public" does not allow "public-secret" or "publicity".
    ("s3://shared/public-secret/x", "anyone", "not under a prefix allowed"),
    ("s3://shared/publicity", "anyone", "not under a prefix allowed"),
    ("s3://shared/public", "anyone", "not under a prefix allowed"),
    ("s3://other/public/x", "anyone", "bucket 'other' is not allowed"),
])
def test_content_prefix_decisions(uri: str, namespace: str, refused: str | None) -> None:
    decision = PREFIXES.refusal(parse_uri(uri), namespace)
    if refused is None:
        assert decision is None
    else:
        assert decision is not None and refused in decision


def test_content_prefixes_without_entries_allow_nothing() -> None:
    empty = ContentPrefixes.parse({})
    assert not empty and not ContentPrefixes.parse({"ns": []})
    assert bool(PREFIXES)
    only_a = ContentPrefixes.parse({"team-a": ["s3://data/a/"]})
    assert only_a.refusal(parse_uri("s3://data/a/x"), "team-b") == (
        "no object prefix is allowed for namespace 'team-b'")


@pytest.mark.parametrize(("mapping", "reason"), [
    ({"Team A": ["s3://data/a/"]}, "neither a namespace nor"),
    ({"ns": ["file:///srv/data"]}, "not an s3:// URI"),
    ({"ns": ["s3://data/a/../b/"]}, r"'\.\.'"),
    ({"ns": "s3://data/a/"}, "expected a list"),
])
def test_content_prefixes_refuse_bad_configuration(mapping: dict[str, list[str]],
                                                   reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ContentPrefixes.parse(mapping)


# --- the local store -----------------------------------------------------------------------------


def test_local_store_put_if_absent_get_head_stream(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    assert isinstance(store, LocalObjectStore)
    data = bytes(range(256)) * 40  # 10,240 bytes
    assert store.put_if_absent("a/b.bin", data) is True
    assert store.put_if_absent("a/b.bin", data) is False
    assert store.get("a/b.bin") == data
    assert store.head("a/b.bin").size == len(data)
    chunks = list(store.stream("a/b.bin", chunk_size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 2048]
    assert b"".join(chunks) == data
    assert store.uri_for("a/b.bin") == (tmp_path.resolve() / "a" / "b.bin").as_uri()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no temp left
    with pytest.raises(FileNotFoundError):
        store.get("a/missing")
    with pytest.raises(ObjectURIError, match=r"'\.\.'"):
        store.get("../outside")


def test_local_store_replaces_a_torn_copy(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    (tmp_path / "k").write_bytes(b"tor")
    assert store.put_if_absent("k", b"torn? no") is True
    assert (tmp_path / "k").read_bytes() == b"torn? no"


def test_artifact_store_from_file_uri_matches_path_store(tmp_path: Path) -> None:
    data = b"\x89PNG not really"
    digest = blake3.blake3(data).hexdigest()
    by_uri = ArtifactStore.from_uri(tmp_path.as_uri()).put(data)
    by_path = ArtifactStore(tmp_path).put(data)
    assert by_uri == by_path
    expected = tmp_path.resolve() / digest[:2] / digest[2:4] / f"{digest}.png"
    assert by_uri.path == expected and by_uri.uri == expected.as_uri()
    assert by_uri.hash == digest and by_uri.size == len(data)


def test_artifact_store_on_s3_has_uris_not_paths() -> None:
    # Building an S3 store talks to no server.
    store = ArtifactStore.from_uri("s3://artifacts/gen/", s3=S3Options(region="us-east-1"))
    assert store.uri == "s3://artifacts/gen" and store.root is None
    assert store.uri_for(DIGEST) == f"s3://artifacts/gen/ab/cd/{DIGEST}.png"
    with pytest.raises(ValueError, match="not local"):
        store.path_for(DIGEST)


# --- S3 options and settings ---------------------------------------------------------------------


def test_s3_options_refuse_plain_http_unless_allowed_and_half_credentials() -> None:
    with pytest.raises(ValueError, match="plain http"):
        S3Options(endpoint_url="http://minio:9000")
    assert S3Options(endpoint_url="http://minio:9000", allow_http=True).allow_http
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        S3Options(endpoint_url="minio:9000")
    with pytest.raises(ValueError, match="both an access key id and a secret"):
        S3Options(access_key_id="id")
    assert "hush" not in repr(S3Options(access_key_id="id", secret_access_key="hush"))


def test_settings_object_storage_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMPFLOW_ARTIFACT_URI", "s3://artifacts/gen")
    monkeypatch.setenv("STAMPFLOW_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("STAMPFLOW_S3_ALLOW_HTTP", "true")
    monkeypatch.setenv("STAMPFLOW_S3_ACCESS_KEY_ID", "minio")
    monkeypatch.setenv("STAMPFLOW_S3_SECRET_ACCESS_KEY", "minio-secret")
    monkeypatch.setenv("STAMPFLOW_CONTENT_OBJECTS", '{"*": ["s3://inbox/shared/"]}')
    settings = Settings()
    assert settings.artifact_uri == "s3://artifacts/gen"
    assert settings.content_objects == {"*": ["s3://inbox/shared/"]}
    options = settings.s3_options()
    assert (options.endpoint_url, options.allow_http, options.access_key_id,
            options.secret_access_key) == ("http://minio:9000", True, "minio", "minio-secret")
    assert "minio-secret" not in repr(settings)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"artifact_uri": "s3://Bad_Bucket/x"}, "not a valid S3 bucket name"),
    ({"artifact_uri": "ftp://host/x"}, "unsupported scheme"),
    ({"s3_endpoint_url": "http://minio:9000"}, "plain http"),
    ({"content_objects": {"*": ["s3://inbox/../x"]}}, r"'\.\.'"),
])
def test_settings_refuse_bad_object_storage(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        Settings(**fields)  # type: ignore[arg-type]


# --- stamping refusals that need no server -------------------------------------------------------


def _node(tmp_path: Path, content_objects: dict[str, list[str]] | None = None) -> StampingNode:
    # A closed port: any request that got as far as the network would fail "unreadable".
    options = S3Options(endpoint_url="http://127.0.0.1:1", allow_http=True, region="us-east-1",
                        access_key_id="x", secret_access_key="y", max_retries=0,
                        connect_timeout_s=1.0)
    return StampingNode(tmp_path, max_bytes=1 << 20, content_objects=content_objects,
                        s3=options)


def _refusal(node: StampingNode, path: str, namespace: str = "ns") -> StampError:
    with pytest.raises(StampError) as info:
        node.stamp_path(path, namespace=namespace)
    assert "\n" not in str(info.value)
    return info.value


def test_s3_paths_are_refused_when_no_object_storage_is_configured(tmp_path: Path) -> None:
    err = _refusal(_node(tmp_path), "s3://inbox/shared/a.txt")
    assert err.code == "outside_root"
    assert str(err) == ("s3://inbox/shared/a.txt: outside the content root (no object storage "
                        "is configured for stamping)")


@pytest.mark.parametrize(("path", "code", "reason"), [
    ("s3://other/shared/a.txt", "outside_root", "bucket 'other' is not allowed"),
    ("s3://inbox/private/a.txt", "outside_root", "not under a prefix allowed for namespace"),
    ("s3://inbox/shared/../private/a.txt", "outside_root", r"'\.\.'"),
    ("s3://inbox/shared//a.txt", "outside_root", "empty segment"),
    ("s3://inbox/shared/./a.txt", "outside_root", r"'\.'"),
    ("s3://INBOX/shared/a.txt", "outside_root", "not a valid S3 bucket name"),
    ("s3://inbox/shared/", "not_a_file", "a prefix, not an object"),
    ("s3://inbox/shared/dir/", "not_a_file", "a prefix, not an object"),
])
def test_s3_containment_refusals(tmp_path: Path, path: str, code: str, reason: str) -> None:
    node = _node(tmp_path, {"*": ["s3://inbox/shared/"]})
    err = _refusal(node, path)
    assert err.code == code
    assert re.search(reason, err.reason), err.reason


def test_an_allowed_object_on_an_unreachable_server_is_unreadable(tmp_path: Path) -> None:
    node = _node(tmp_path, {"ns": ["s3://inbox/shared/"]})
    err = _refusal(node, "s3://inbox/shared/a.txt")
    assert err.code == "unreadable" and err.reason.startswith("unreadable (")
    # The same object for a namespace without rights is refused before any request.
    assert _refusal(node, "s3://inbox/shared/a.txt", "other").code == "outside_root"


def test_local_paths_that_look_like_uris_stay_local(tmp_path: Path) -> None:
    (tmp_path / "s3:").mkdir()
    (tmp_path / "s3:" / "x").write_bytes(b"local")
    node = _node(tmp_path)
    # "s3:/x" is a relative local path (one slash), stamped from the content root as before.
    assert node.stamp_path("s3:/x", namespace="ns").hash == blake3.blake3(b"local").hexdigest()
    assert node.stamp_path(Path("s3:/x"), namespace="ns").size == 5


def test_s3_object_store_refuses_bad_keys_before_any_request() -> None:
    store = S3ObjectStore("inbox", "shared", S3Options(region="us-east-1"))
    assert store.uri == "s3://inbox/shared"
    for key in ("../x", "a//b", "", "a/./b"):
        with pytest.raises(ObjectURIError):
            store.get(key)

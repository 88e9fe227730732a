"""discover(): which files are migrations, their order, and one clear error per bad file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg
import pytest

import stampflow.migrate
from stampflow.errors import ServiceUnavailable
from stampflow.migrate import (
    DatabaseUnreachable,
    Migration,
    MigrationError,
    default_migrations_dir,
    discover,
)


def _write(directory: Path, name: str, text: str | bytes = "SELECT 1;\n") -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _error(directory: Path) -> str:
    with pytest.raises(MigrationError) as caught:
        discover(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_orders_by_number_with_gaps_and_ignores_other_files(tmp_path: Path) -> None:
    _write(tmp_path, "0010_later.sql", "CREATE TABLE later (id int);\n")
    _write(tmp_path, "0002_second.sql")
    _write(tmp_path, "0001_init.sql")
    _write(tmp_path, "README.md", "not a migration")
    _write(tmp_path, ".0003_hidden.sql")
    (tmp_path / "notes").mkdir()

    found = discover(tmp_path)

    assert [m.version for m in found] == [1, 2, 10]
    assert [m.name for m in found] == ["init", "second", "later"]
    assert [m.filename for m in found] == ["0001_init.sql", "0002_second.sql", "0010_later.sql"]
    later = found[-1]
    assert later.path == tmp_path / "0010_later.sql"
    assert later.sql == "CREATE TABLE later (id int);\n"
    assert later.checksum == hashlib.sha256(b"CREATE TABLE later (id int);\n").hexdigest()


def test_empty_directory_has_no_migrations(tmp_path: Path) -> None:
    assert discover(tmp_path) == []


def test_checksum_is_over_the_bytes_on_disk(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbfSELECT 1;\r\n"
    _write(tmp_path, "0001_bom.sql", raw)

    (found,) = discover(tmp_path)

    assert found.sql == "SELECT 1;\r\n"  # the BOM is not sent to PostgreSQL
    assert found.checksum == hashlib.sha256(raw).hexdigest()


def test_migration_is_immutable(tmp_path: Path) -> None:
    (found,) = discover(_write(tmp_path, "0001_init.sql").parent)

    assert isinstance(found, Migration)
    with pytest.raises(AttributeError):
        found.version = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "name",
    [
        "1_init.sql",
        "00001_init.sql",
        "0001-init.sql",
        "0001_.sql",
        "0001init.sql",
        "0001_Init.sql",
        "0001_add-index.sql",
        "abcd_init.sql",
        "0001_init.SQL.sql",
    ],
)
def test_bad_file_name(tmp_path: Path, name: str) -> None:
    _write(tmp_path, "0002_fine.sql")
    _write(tmp_path, name)

    message = _error(tmp_path)

    assert name in message
    assert "bad migration file name" in message
    assert "NNNN_name.sql" in message


def test_duplicate_version_names_both_files(tmp_path: Path) -> None:
    _write(tmp_path, "0001_init.sql")
    _write(tmp_path, "0002_users.sql")
    _write(tmp_path, "0002_orders.sql")

    message = _error(tmp_path)

    assert "duplicate migration version 2" in message
    assert "0002_orders.sql" in message
    assert "0002_users.sql" in message


@pytest.mark.parametrize("text", ["", "   \n\t\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    _write(tmp_path, "0001_init.sql")
    _write(tmp_path, "0002_nothing.sql", text)

    message = _error(tmp_path)

    assert "0002_nothing.sql" in message
    assert "empty migration file" in message


def test_not_utf8(tmp_path: Path) -> None:
    _write(tmp_path, "0001_latin1.sql", "SELECT 'café';".encode("latin-1"))

    message = _error(tmp_path)

    assert "0001_latin1.sql" in message
    assert "not UTF-8" in message


def test_sql_named_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "0001_init.sql").mkdir()

    message = _error(tmp_path)

    assert "0001_init.sql" in message
    assert "not a regular file" in message


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    message = _error(missing)

    assert str(missing) in message
    assert "does not exist" in message


def test_directory_is_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "migrations")

    message = _error(path)

    assert str(path) in message
    assert "not a directory" in message


def test_default_dir_is_the_checkout_migrations_folder() -> None:
    import stampflow.migrate

    package = Path(stampflow.migrate.__file__).resolve().parent
    checkout = package.parent.parent
    if not (checkout / "pyproject.toml").is_file():
        pytest.skip("stampflow is installed, not run from a checkout")

    assert default_migrations_dir() == checkout / "migrations"


@pytest.mark.parametrize("error", [
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
])
def test_a_database_that_went_away_mid_migration_is_waited_for(error: BaseException) -> None:
    """A node restarted in a database outage (or one that began during its migration) waits
    for the database instead of exiting: these are ServiceUnavailable (app.until_ready)."""
    failure = stampflow.migrate._failure(error, "127.0.0.1:5432", "schema_migrations: ...")
    assert isinstance(failure, DatabaseUnreachable)
    assert isinstance(failure, ServiceUnavailable)
    assert str(failure).startswith("PostgreSQL at 127.0.0.1:5432 is unreachable")


def test_a_migration_postgresql_rejects_is_not_waited_for() -> None:
    error = asyncpg.SyntaxOrAccessError("syntax error at or near \"CREAT\"")
    failure = stampflow.migrate._failure(error, "127.0.0.1:5432", "0001_x.sql: failed")
    assert not isinstance(failure, ServiceUnavailable)
    assert str(failure) == "0001_x.sql: failed"

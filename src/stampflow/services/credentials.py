"""Secrets on disk and in SQL: private directories (0700, or 0710 for PostgreSQL's system user
as root) and files (0600, written atomically), the generated passwords kept in such files, and
the SCRAM verifier and ``PASSWORD`` clause that set a role's password without the password
itself reaching the server's logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pwd
import secrets
import stat
import uuid
from pathlib import Path

from stampflow.errors import StampflowError


def private_dir(path: Path, server_user: pwd.struct_passwd | None = None) -> None:
    """Make ``path`` a directory only its owner may use: 0700. As root, PostgreSQL runs as
    ``server_user``, which must pass through to its data directory inside: 0710, with that
    user's group (it can neither list nor read anything here but what it owns).

    Refuses a directory of another user or a shared one (world-writable or sticky, as /tmp).
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise StampflowError(f"{path}: belongs to uid {info.st_uid}, not to this user "
                             f"(uid {os.geteuid()}); the state directory must be its own")
    if info.st_mode & (stat.S_IWOTH | stat.S_ISVTX):
        raise StampflowError(f"{path}: a shared directory (world-writable or sticky); the "
                             "state directory must be private: choose another")
    mode = 0o700
    if server_user is not None:
        mode = 0o710
        if info.st_gid != server_user.pw_gid:
            os.chown(path, -1, server_user.pw_gid)
    if stat.S_IMODE(info.st_mode) != mode:
        path.chmod(mode)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _secret(path: Path, *, create: bool) -> str:
    """The password kept in ``path`` (0600); generated and written there if missing and
    ``create``. URL-safe characters only."""
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    except OSError as err:
        raise StampflowError(f"{path}: cannot read it: {err.strerror or err}") from None
    if not value:
        if not create:
            raise StampflowError(f"{path}: missing; it holds the password of the embedded "
                                 "PostgreSQL")
        value = secrets.token_urlsafe(24)
        write_private(path, value + "\n")
    return value


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a scram-sha-256 password, computed here: ``PASSWORD`` given
    this never carries the password itself, so no server log (a failed statement is logged
    with its text) can show it. An ASCII password only (SASLprep leaves it as it is)."""
    if not password.isascii() or not password.isprintable():
        raise ValueError("scram_verifier takes printable ASCII only")
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def password_clause(password: str) -> str:
    """``PASSWORD '...'`` for CREATE/ALTER ROLE: a SCRAM verifier where possible, else the
    password as a literal (non-ASCII: SASLprep is the server's to apply)."""
    try:
        secret = scram_verifier(password)
    except ValueError:
        secret = password
    return "PASSWORD '" + secret.replace("'", "''") + "'"

"""The command line without services: stamping, contracts, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from blake3 import blake3

from stampflow import contracts


def cli(*args: str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stampflow", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd,
                          env={"COLUMNS": "200", "PATH": "", **(env or {})})


def test_stamp_prints_one_line_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    done = cli("stamp", str(tmp_path), "-n", "docs")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"stampflow/1 blake3:{blake3(b'alpha').hexdigest()} size=5 ")
    assert " ns=docs " in lines[0] and lines[0].endswith("a.txt")


def test_stamp_errors_are_one_line_and_the_rest_still_stamps(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine")
    done = cli("stamp", str(tmp_path / "missing.txt"), str(tmp_path / "ok.txt"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"stampflow: {tmp_path / 'missing.txt'}: not found"
    assert "ok.txt" in done.stdout
    bad_ns = cli("stamp", str(tmp_path / "ok.txt"), "-n", "Bad NS")
    assert bad_ns.returncode == 1
    assert bad_ns.stderr.count("\n") == 1 and "not a valid namespace" in bad_ns.stderr
    assert "Traceback" not in bad_ns.stderr


def test_contracts_export_and_check(tmp_path: Path) -> None:
    done = cli("contracts", "export", str(tmp_path / "schemas"))
    assert done.returncode == 0, done.stderr
    schema = json.loads((tmp_path / "schemas" / "stamp.requested.schema.json").read_text())
    assert schema["properties"]["type"]["const"] == "stamp.requested"
    assert cli("contracts", "check").returncode == 0
    specs = Path(contracts.__file__).parent / "specs"
    bad = tmp_path / "bad"
    bad.mkdir()
    for spec in specs.glob("*.yaml"):
        (bad / spec.name).write_text(spec.read_text())
    (bad / "reducer.yaml").write_text(
        (specs / "reducer.yaml").read_text().replace("kind: reducer", "kind: reducr"))
    broken = cli("contracts", "check", str(bad))
    assert broken.returncode == 1
    assert broken.stderr.strip().startswith(f"stampflow: {bad / 'reducer.yaml'}: kind: ")
    assert broken.stderr.count("\n") == 1


def test_commands_without_services_say_how_to_start_them(tmp_path: Path) -> None:
    done = cli("status", cwd=tmp_path)
    assert done.returncode == 1
    assert "no embedded services running" in done.stderr
    assert "stampflow services up" in done.stderr


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


def test_a_trailing_newline_is_refused_in_a_namespace_and_a_role_name(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine")
    ns = cli("stamp", str(tmp_path / "ok.txt"), "-n", "acme\n")
    assert ns.returncode != 0 and ns.stdout == ""
    assert "not a valid namespace" in _one_line_error(ns)
    # Refused before any connection is tried: the database below does not exist.
    role = cli("roles", "create", "acme\n", "-n", "acme",
               env={"STAMPFLOW_SERVICES": "external",
                    "STAMPFLOW_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/x"})
    assert role.returncode == 1
    assert "not a valid role name" in _one_line_error(role)
    from stampflow.queries import ROLE_NAME

    assert ROLE_NAME.fullmatch("acme") and not ROLE_NAME.match("acme\n")


def test_roles_create_takes_no_password_on_the_command_line() -> None:
    done = cli("roles", "create", "alice", "-n", "acme", "--password", "on-argv",
               env={"STAMPFLOW_SERVICES": "external",
                    "STAMPFLOW_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/x"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "No such option" in done.stderr and "on-argv" not in done.stdout + done.stderr


def test_an_invalid_setting_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    for name, value, problem in (("STAMPFLOW_MAX_IN_FLIGHT", "-3", "must be >= 1"),
                                 ("STAMPFLOW_SERVICES", "bogus", "must be one of"),
                                 ("STAMPFLOW_TOPIC_PARTITIONS", "many", "must be an integer"),
                                 ("STAMPFLOW_MODELS", "{not json", "not valid JSON")):
        for command in (["status"], ["stamp", str(tmp_path)], ["migrate"]):
            done = cli(*command, env={name: value}, cwd=tmp_path)
            line = _one_line_error(done)
            assert done.returncode == 2, (command, line)
            assert line.startswith(f"stampflow: {name}="), line
            assert problem in line, line


def test_verify_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pdf"
    done = cli("verify", str(missing), "-n", "acme", cwd=tmp_path)
    assert done.returncode == 2
    assert _one_line_error(done) == f"stampflow: {missing}: not found"


def test_make_tiny_into_a_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "tiny"
    done = cli("models", "make-tiny", str(target))
    assert done.returncode == 1
    line = _one_line_error(done)
    assert line.startswith(f"stampflow: {target}: cannot create it: "), line


def test_the_settings_name_the_real_redaction() -> None:
    import stampflow.settings
    from stampflow.observability import redact

    source = Path(stampflow.settings.__file__).read_text()
    assert "stampflow.logs" not in source  # no such module
    assert "stampflow.observability.redact" in source
    assert redact("postgresql://app:pw@db/x") == "postgresql://app:***@db/x"

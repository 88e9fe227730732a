"""The command line without services: stamping, contracts, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from blake3 import blake3

import contracts


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stampflow", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env={"COLUMNS": "200", "PATH": ""})


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

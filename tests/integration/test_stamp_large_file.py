"""Stamping a 1 GiB file streams it: the stamping process's peak RSS stays small."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from blake3 import blake3

GIB = 1 << 30
MIB = 1 << 20
PEAK_RSS_LIMIT_KIB = 150 * 1000  # 150 MB; VmHWM counts KiB
GROWTH_LIMIT_KIB = 32 * 1024  # what stamping may add to the peak after the imports
SRC = Path(__file__).resolve().parents[2] / "src"

# Run in a fresh interpreter, so that its peak RSS is the stamping's own and not the test's.
# The peak is read from /proc/self/status (VmHWM), which starts afresh at exec; ru_maxrss
# would not: Linux carries it over from the forking parent, here a pytest that loaded torch.
CHILD = """
import json, sys, time
from pathlib import Path
from stampflow.nodes.stamping import StampingNode

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")

node = StampingNode(Path(sys.argv[1]), max_bytes=4 << 30)
before = peak_kib()
started = time.perf_counter()
stamp = node.stamp_path(sys.argv[2], namespace="large")
seconds = time.perf_counter() - started
after = peak_kib()
print(json.dumps({"hash": stamp.hash, "size": stamp.size, "seconds": seconds,
                  "maxrss_kib_before": before, "maxrss_kib": after}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc (Linux)")
def test_stamping_one_gib_keeps_rss_small(tmp_path: Path) -> None:
    if shutil.disk_usage(tmp_path).free < 2 * GIB:
        pytest.skip(f"{tmp_path}: needs 2 GiB free for a 1 GiB file")
    path = tmp_path / "one-gib.bin"
    expected = blake3()
    block = bytearray(os.urandom(MIB))
    try:
        with path.open("wb") as file:
            for index in range(GIB // MIB):
                block[:8] = index.to_bytes(8, "little")  # every MiB differs from the others
                expected.update(block)
                file.write(block)

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path), path.name],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )
        assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
        result = json.loads(done.stdout)
    finally:
        path.unlink(missing_ok=True)

    assert result["size"] == GIB
    assert result["hash"] == expected.hexdigest()
    assert result["maxrss_kib"] < PEAK_RSS_LIMIT_KIB, result
    assert result["maxrss_kib"] - result["maxrss_kib_before"] < GROWTH_LIMIT_KIB, result

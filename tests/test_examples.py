"""Every example runs as a user would run it, against a running cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name, expect", [
    ("first_touch.py", "pages are on nodes: [0, 0, 0"),
    ("interleave.py", "interleave: [0, 1, 0, 1"),
    ("shared_memory.py", "read back: hello from another process"),
    ("file_mapping.py", "file now starts with: b'numaemu was here'"),
    ("policies.py", "MPOL_BIND with no nodes: EINVAL"),
    ("relocate_and_migrate.py", "0 pages not moved; pages on {1}: 80.4 ns per read"),
    ("latency_matrix.py", "168.84"),
    ("gups.py", "GUPS verified"),
    ("stream_triad.py", "triad verified"),
])
def test_example_runs(cluster, tmp_path, name, expect):
    env = dict(os.environ, NUMAEMU_ADDRESS=cluster.address)
    args = [sys.executable, str(EXAMPLES / name)]
    if name == "file_mapping.py":
        args.append(str(tmp_path / "data.bin"))
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout

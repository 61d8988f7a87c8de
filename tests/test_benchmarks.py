"""The benchmark scripts run and report the shapes they promise (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_migration_batch_sweep_reports_every_batch_size():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "migration_batches.py"),
                          "--pages", "64", "--repeat", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["batch"] for r in rows] == [1, 16, 512, 4096]
    for r in rows:
        assert r["gb_per_s"] > 0 and r["memcpy_gb_per_s"] > 0 and r["ratio"] > 0

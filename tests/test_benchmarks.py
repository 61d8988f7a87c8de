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


def test_placement_bench_reports_every_policy_and_plots(tmp_path):
    """A short run of two policies: the figures and the plot `bench placement` promises."""
    code = ("import json, sys; from numaemu.bench_placement import bench_placement, plot; "
            "r = bench_placement(seconds=2.0, pages=64, policies=('none', 'all-local')); "
            f"plot(r, {str(tmp_path / 'p.png')!r}); print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.splitlines()[-1])
    assert list(results) == ["none", "all-local"]
    for r in results.values():
        assert len(r["times"]) == len(r["local_share"]) > 10
        assert r["late_ns_per_access"] > 0 and r["pages_migrated"] >= 0
    assert results["all-local"]["late_local_share"] > 0.99  # every page is where its task is
    assert results["all-local"]["vs_all_local"] == 1.0
    assert (tmp_path / "p.png").stat().st_size > 1000

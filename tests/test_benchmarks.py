"""The benchmark scripts run and report the shapes they promise (no timing asserts)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def bench(*args: str, timeout: float = 120) -> list[dict]:
    """``numaemu bench ARGS --json`` as a user runs it: its JSON lines."""
    out = subprocess.run([sys.executable, "-m", "numaemu", "bench", *args, "--json"],
                         capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def assert_positive(figures: dict, keys) -> None:
    for key in keys:
        value = figures[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value) and value > 0, (key, value)


def test_bench_array_reports_each_op_beside_numpy():
    [figures] = bench("array", "--pages", "16", "--repeat", "1")
    assert figures["bench"] == "array"
    assert figures["elements"] == 16 * 4096 // 8 and figures["contiguous"] is True
    assert_positive(figures, [f"{op}{suffix}" for op in ("gather", "scatter", "update",
                                                         "asarray", "sum")
                              for suffix in ("_ms", "_numpy_ms", "_slowdown")])


def test_bench_scale_reports_both_sweeps_and_plots(tmp_path):
    png = tmp_path / "scale.png"
    [figures] = bench("scale", "--pages", "64", "--repeat", "1", "--plot", str(png))
    assert figures["bench"] == "scale" and figures["plot"] == str(png)
    assert [r["pages"] for r in figures["migrate"]] == [4, 16, 64]  # below the default sizes
    for row in figures["migrate"]:
        assert_positive(row, ["us_per_page", "warm_copy_us_per_page", "cold_copy_us_per_page",
                              "slowdown_vs_warm_copy"])
    assert [r["pages"] for r in figures["fault"]] == [1, 16]  # the default batches up to 64
    for row in figures["fault"]:
        assert_positive(row, ["us_per_page", "raw_us_per_page", "slowdown"])
    assert_positive(figures, ["migrate_growth", "warm_copy_growth",
                              "migrate_largest_over_smallest"])
    assert figures["migrate_growth"] >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_bench_ping_reports_round_trips_beside_bare_zmq():
    [figures] = bench("ping", "--steps", "50", "--repeat", "1")
    assert figures["bench"] == "ping" and figures["count"] == 50
    assert_positive(figures, ["ping_ms", "zmq_ms", "ping_slowdown", "ping_p99_ms", "zmq_p99_ms",
                              "syscall_ms", "syscall_slowdown"])


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_bench_remote_reports_the_data_path_beside_bare_zmq(transport):
    [figures] = bench("remote", "--steps", "20", "--repeat", "1", "--transport", transport)
    assert figures["bench"] == "remote" and figures["count"] == 20
    assert figures["transport"] == transport
    assert_positive(figures, ["read4k_ms", "zmq4k_ms", "read4k_slowdown", "read1m_gb_s",
                              "zmq_read1m_gb_s", "read1m_ratio", "write1m_gb_s",
                              "zmq_write1m_gb_s", "write1m_ratio", "data_requests"])


def test_bench_memory_reports_coordinator_bytes_per_page_and_client_after_munmap():
    [figures] = bench("memory", "--pages", "16384", "--cycles", "2")
    assert figures["bench"] == "memory" and figures["pages"] == 16384
    assert_positive(figures, ["coordinator_rss_before_kib", "coordinator_rss_touched_kib",
                              "coordinator_rss_after_munmap_kib", "coordinator_bytes_per_page",
                              "kernel_pte_bytes_per_page", "kernel_bytes_per_page",
                              "touch_us_per_page", "client_rss_anon_before_kib",
                              "client_rss_anon_after_kib", "client_cycle_ms",
                              "client_tlb_slots_peak"])
    assert figures["client_tlb_slots_peak"] >= 16384  # the TLB covered the mapping ...
    assert figures["client_tlb_slots_after"] <= figures["client_tlb_slots_before"]  # ... not now
    assert isinstance(figures["client_returned"], bool)


def test_bench_all_prints_one_json_line_per_quick_bench():
    lines = bench("all", "--pages", "64", "--repeat", "1", "--steps", "300", timeout=300)
    assert [f["bench"] for f in lines] == ["startup", "fault", "access", "migrate", "latency",
                                           "array", "ping"]
    figures = {f["bench"]: f for f in lines}
    # migrate's line is the object `numaemu bench migrate --json` promises, and no more.
    assert set(figures["migrate"]) == {"bench", "pages", "bytes", "seconds", "gb_per_s",
                                       "memcpy_gb_per_s", "ratio"}
    assert_positive(figures["startup"], ["start_s", "python_start_s", "stop_s",
                                         "python_stop_s"])
    assert_positive(figures["fault"], ["single_page_us", "single_page_raw_us",
                                       "batch_64_us_per_page", "batch_64_raw_us_per_page"])
    assert_positive(figures["access"], ["read8_ns", "read8_numpy_ns", "read8_slowdown"])
    assert figures["latency"]["virtual_ns"] == figures["latency"]["configured_ns"]


def test_bench_text_prints_each_figure_beside_its_baseline():
    out = subprocess.run([sys.executable, "-m", "numaemu", "bench", "ping", "--steps", "50",
                          "--repeat", "1"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    title, header, *rows = out.stdout.splitlines()
    assert "baseline: bare zmq" in title
    assert header.split()[:3] == ["emulated", "baseline", "ratio"]
    assert len(rows) == 3
    for row in rows:  # label, emulated, baseline, ratio, [target]
        words = row.split()
        ratio = next(i for i, w in enumerate(words) if re.fullmatch(r"[\d.e+-]+x", w))
        assert float(words[ratio - 2]) > 0 and float(words[ratio - 1]) > 0

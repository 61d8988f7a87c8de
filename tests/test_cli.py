"""The numaemu command line, run as a user runs it (subprocesses against a detached cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import cluster_is_gone


def numaemu(*args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "numaemu", *args], capture_output=True,
                          text=True, env=env or dict(os.environ), timeout=timeout)


@pytest.fixture(scope="module")
def detached():
    """``numaemu up --detach`` with 2 nodes; ``numaemu down`` at the end."""
    up = numaemu("up", "--detach", "--nodes", "2", "--frames-per-node", "512",
                 "--cpus-per-node", "2")
    assert up.returncode == 0, up.stderr
    address = up.stdout.strip()
    assert address.startswith("ipc://")
    env = dict(os.environ, NUMAEMU_ADDRESS=address)
    cid = os.path.basename(os.path.dirname(address.removeprefix("ipc://")))
    yield env
    down = numaemu("down", env=env)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert cluster_is_gone(cid)


def test_hardware_prints_numactl_layout(detached):
    out = numaemu("hardware", env=detached)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "available: 2 nodes (0-1)"
    assert "node 0 cpus: 0 1" in lines
    assert "node 1 size: 2 MB" in lines
    assert lines[-3:] == ["node     0    1 ", "   0:   10   21 ", "   1:   21   10 "]


SCRIPT = textwrap.dedent("""
    import sys, numaemu
    task = numaemu.attach()
    m = task.mmap(8 * task.page_size)
    task.write(m.addr, bytes(m.length))
    print(task.pid, task.cpu, task.get_mempolicy()[0], *task.move_pages(m.pages))
    sys.stdout.flush()
    if len(sys.argv) > 1:
        sys.stdin.readline()   # stay attached until the test is done looking
""")


def test_run_applies_cpu_binding_and_memory_policy(detached, tmp_path):
    script = tmp_path / "place.py"
    script.write_text(SCRIPT)
    out = numaemu("run", "--cpunodebind=1", "--membind=0", "--", sys.executable, str(script),
                  env=detached)
    assert out.returncode == 0, out.stderr
    pid, cpu, mode, *nodes = map(int, out.stdout.split())
    assert cpu in (2, 3) and mode == 2 and nodes == [0] * 8
    out = numaemu("run", "--physcpubind=3", "--interleave=all", "--", sys.executable,
                  str(script), env=detached)
    pid, cpu, mode, *nodes = map(int, out.stdout.split())
    assert cpu == 3 and mode == 3 and sorted(nodes) == [0] * 4 + [1] * 4


def test_run_rejects_conflicting_policies_and_bad_node_lists(detached):
    out = numaemu("run", "--membind=0", "--preferred=1", "--", "true", env=detached)
    assert out.returncode == 1 and "Conflicting policies" in out.stderr
    out = numaemu("run", "--membind=7", "--", "true", env=detached)
    assert out.returncode == 1 and "invalid" in out.stderr


def test_numa_maps_numastat_and_tasks_show_a_running_task(detached, tmp_path):
    script = tmp_path / "stay.py"
    script.write_text(SCRIPT)
    env = dict(detached)
    proc = subprocess.Popen([sys.executable, "-m", "numaemu", "run", "--preferred=1", "--",
                             sys.executable, str(script), "stay"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(proc.stdout.readline().split()[0])
        assert pid == proc.pid  # `numaemu run` execs, and the task takes the OS pid
        maps = numaemu("numa-maps", str(pid), env=env)
        assert maps.returncode == 0, maps.stderr
        assert "prefer:1 anon=8 dirty=8" in maps.stdout and "N1=8" in maps.stdout
        tasks = numaemu("tasks", env=env)
        assert str(pid) in tasks.stdout
        stat = numaemu("numastat", env=env)
        assert stat.stdout.splitlines()[0].split() == ["node0", "node1"]
        assert stat.stdout.splitlines()[1].startswith("numa_hit")
        per = numaemu("numastat", "-p", str(pid), env=env)
        assert per.returncode == 0, per.stderr
        assert f"for PID {pid}" in per.stdout
        private = [line for line in per.stdout.splitlines() if line.startswith("Private")][0]
        assert private.split()[1:] == ["0.00", "0.03", "0.03"]
    finally:
        proc.stdin.close()
        proc.wait(30)


def test_commands_fail_cleanly_without_a_cluster(tmp_path):
    env = dict(os.environ, NUMAEMU_RUN_DIR=str(tmp_path))
    env.pop("NUMAEMU_ADDRESS", None)
    out = numaemu("hardware", env=env)
    assert out.returncode == 1 and "no cluster is running" in out.stderr
    out = numaemu("numa-maps", "12345", env=dict(env, NUMAEMU_ADDRESS=f"ipc://{tmp_path}/x"))
    assert out.returncode == 1 and "no coordinator answers" in out.stderr


def test_unknown_pid_is_esrch(detached):
    out = numaemu("numa-maps", "999999", env=detached)
    assert out.returncode == 1 and "ESRCH" in out.stderr


def test_up_rejects_a_bad_topology():
    out = numaemu("up", "--distance", "10,21;9,10", "--detach")
    assert out.returncode == 1 and "distance" in out.stderr


def test_demo_tells_the_migration_story_end_to_end(tmp_path):
    plot = tmp_path / "demo.png"
    out = numaemu("demo", "--quick", "--plot", str(plot), timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        name = line[:18].strip()
        if name in ("local", "moved to node 1", "migrating", "local again"):
            where, local, vns, wall, waits = line[18:].split()
            rows[name] = (where, local, float(vns), int(waits))
    assert rows["local"][:2] == (rows["local"][0], "100%") and rows["local"][0].startswith("N0=")
    assert rows["moved to node 1"][0].startswith("N0=") and rows["moved to node 1"][1] == "0%"
    assert rows["local again"][0].startswith("N1=") and rows["local again"][1] == "100%"
    assert rows["moved to node 1"][2] > 2 * rows["local"][2] * 0.9  # remote costs more
    assert rows["local again"][2] < rows["moved to node 1"][2]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no process or segment" in out.stdout


def test_migratepages_moves_a_running_task_and_bench_migrate_json_parses(detached, tmp_path):
    script = tmp_path / "stay.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, "-m", "numaemu", "run", "--membind=0", "--",
                             sys.executable, str(script), "stay"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=detached)
    try:
        pid = int(proc.stdout.readline().split()[0])
        out = numaemu("migratepages", str(pid), "0", "1", env=detached)
        assert out.returncode == 0, out.stderr
        maps = numaemu("numa-maps", str(pid), env=detached).stdout
        assert "N1=8" in maps and "N0=" not in maps
        bad = numaemu("migratepages", str(pid), "0", "9", env=detached)
        assert bad.returncode == 1 and "invalid" in bad.stderr
    finally:
        proc.stdin.close()
        proc.wait(30)
    out = numaemu("bench", "migrate", "--pages", "256", "--repeat", "1", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert set(figures) == {"bench", "pages", "bytes", "seconds", "gb_per_s",
                            "memcpy_gb_per_s", "ratio"}
    assert figures["bench"] == "migrate"
    assert figures["pages"] == 256 and figures["bytes"] == 256 * 4096
    assert figures["ratio"] == pytest.approx(figures["gb_per_s"] / figures["memcpy_gb_per_s"],
                                             rel=0.5)

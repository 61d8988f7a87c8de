"""Start, stop, crash and clean up: every process and segment goes away (invariant 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import cluster_is_gone, small_topology

import numaemu
from nodes.segment import cluster_segments


def wait_until(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def test_stop_leaves_no_process_and_no_segment():
    c = numaemu.Cluster(small_topology(nodes=3, frames=256))
    cid = c.cluster_id
    assert len(cluster_segments(cid)) == 3
    pids = c.processes()["children"]
    assert len(pids) == 4 and all(os.path.exists(f"/proc/{p}") for p in pids)
    c.stop()
    assert cluster_is_gone(cid)
    assert not os.path.exists(c.run_dir)


def test_with_block_cleans_up_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"), numaemu.Cluster(
            small_topology(frames=256)) as c:
        t = c.attach()
        t.write(t.mmap(4096).addr, b"x")
        raise RuntimeError("boom")
    assert cluster_is_gone(c.cluster_id)


def test_owner_killed_with_sigkill_takes_its_cluster_down(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import sys, time, numaemu
        c = numaemu.Cluster(numaemu.Topology.symmetric(nodes=2, frames_per_node=256))
        print(c.cluster_id, flush=True)
        time.sleep(60)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    cid = owner.stdout.readline().strip()
    assert cid and cluster_segments(cid)
    owner.kill()
    owner.wait()
    assert wait_until(lambda: cluster_is_gone(cid), 20)


def test_coordinator_sigkill_gives_clients_cluster_error_and_nodes_exit():
    c = numaemu.Cluster(small_topology(frames=256))
    try:
        t = c.attach()
        m = t.mmap(4 * 4096)
        t.write(m.addr, b"before")
        coordinator_pid = c.processes()["children"][0]
        os.kill(coordinator_pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(numaemu.ClusterError):
            t.write(m.addr + 3 * 4096, b"needs a fault")
        assert time.monotonic() - t0 < 5
        # TLB hits still work on the frames this client already maps; nothing hangs.
        assert t.read(m.addr, 6) == b"before"
        # Nodes notice the missing heartbeats and exit by themselves, removing their memory.
        assert wait_until(lambda: not cluster_segments(c.cluster_id), 15)
        with open(c.log_path) as f:
            assert "no heartbeat from the coordinator" in f.read()
    finally:
        c.stop()
    assert cluster_is_gone(c.cluster_id)


def test_attach_to_an_address_where_nothing_listens_fails_fast(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(numaemu.ClusterError):
        numaemu.attach(f"ipc://{tmp_path}/nobody.sock")
    assert time.monotonic() - t0 < 10


def test_attach_without_address_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("NUMAEMU_ADDRESS", raising=False)
    with pytest.raises(numaemu.ClusterError, match="NUMAEMU_ADDRESS"):
        numaemu.attach()


def test_every_role_logs_to_the_one_cluster_log():
    with numaemu.Cluster(small_topology(frames=256)) as c:
        t = c.attach(cpu=2)
        t.close()
        time.sleep(0.3)  # the collector re-emits forwarded records asynchronously
        log_path = c.log_path
    with open(log_path) as f:
        text = f.read()
    for where in ("[supervisor pid", "[coordinator pid", "[node 0 pid", "[node 1 pid",
                  "[client task"):
        assert where in text, f"no line from {where!r} in the cluster log"


def _touch_and_wait(task, pages):
    m = task.mmap(pages * task.page_size)
    task.write(m.addr, b"\xab" * m.length)
    time.sleep(60)


def test_a_killed_client_is_reaped_and_its_frames_freed(cluster):
    before = sum(cluster.free_frames().values())
    handle = cluster.spawn(_touch_and_wait, 64, cpu=0)
    assert wait_until(lambda: sum(cluster.free_frames().values()) <= before - 64, 10)
    handle.kill()
    assert wait_until(lambda: sum(cluster.free_frames().values()) == before, 15)
    tasks = cluster._call("tasks")["tasks"]
    assert handle.pid not in [t["pid"] for t in tasks]


def _add(task, a, b):
    return a + b


def _fail(task):
    raise ValueError(f"task {task.pid} failed on purpose")


def _sleep(task, seconds):
    time.sleep(seconds)
    return task.pid


def test_spawn_returns_the_result_and_reraises_the_exception(cluster):
    assert cluster.spawn(_add, 2, 3).join(30) == 5
    with pytest.raises(ValueError, match="failed on purpose"):
        cluster.spawn(_fail).join(30)
    slow = cluster.spawn(_sleep, 0.5)
    assert not slow.done()
    with pytest.raises(TimeoutError):
        slow.join(0.01)
    assert slow.join(30) == slow.pid


def test_up_sweeps_the_leftovers_of_a_crashed_cluster(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "numaemu", "up", "--detach", "--nodes", "2",
                          "--frames-per-node", "256"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    address = out.stdout.strip()
    run_dir = os.path.dirname(address.removeprefix("ipc://"))
    cid = os.path.basename(run_dir)
    with numaemu.transport.Connection(address) as conn:
        sup = conn.call("info")["supervisor_pid"]
    os.killpg(sup, signal.SIGKILL)  # supervisor, coordinator and nodes die at once
    from numaemu.rundir import pid_alive

    assert wait_until(lambda: not pid_alive(sup), 5)
    assert cluster_segments(cid), "a crash like this leaves segments behind"
    with numaemu.Cluster(small_topology(frames=256)) as c:  # starting sweeps leftovers
        assert c.cluster_id != cid
    assert not cluster_segments(cid)
    assert not os.path.exists(run_dir)


def test_a_memoryless_node_runs_and_its_cpus_allocate_on_the_nearest_node():
    topo = numaemu.Topology(distances=[[10, 21], [21, 10]], frames_per_node=[256, 0],
                            cpus=[[0], [1]])
    with numaemu.Cluster(topo) as c:
        t = c.attach(cpu=1)
        m = t.mmap(4 * 4096)
        t.write(m.addr, b"x" * m.length)
        assert t.move_pages(m.pages) == [0] * 4
        assert "node 1 size: 0 MB" in c.hardware()
        assert c.check() == []
    assert cluster_is_gone(c.cluster_id)

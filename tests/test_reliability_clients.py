"""Clients that die badly, pid reuse, and client structures that must not grow forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from numaemu import MPOL_MF_MOVE_ALL
from numaemu.rundir import STATE_FILE, base_dir, start_time, sweep_leftovers

PS = 4096

HOLDER = textwrap.dedent("""
    import sys, time
    import numaemu
    task = numaemu.attach(sys.argv[1], cpu=2)
    m = task.mmap(4096, shared=sys.argv[2])
    task.read(m.addr, 4096)  # caches the translation: a migration must shoot it down
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_zombie_client_neither_freezes_the_coordinator_nor_wedges_migration(cluster):
    root = cluster.attach(cpu=1, privileged=True)
    mine = root.mmap(PS, shared="zombie")
    root.write(mine.addr, b"kept" * 1024)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.address, "zombie"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        os.kill(holder.pid, signal.SIGKILL)
        time.sleep(0.2)  # not reaped: the client is a zombie now
        with open(f"/proc/{holder.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
        stalls_before = cluster.coordinator_stats()["loop_stall_max_ms"]
        status = root.move_pages([mine.addr], [1], MPOL_MF_MOVE_ALL)
        assert list(status) == [1]
        assert root.read(mine.addr, 4) == b"kept"
        stats = cluster.coordinator_stats()
        # The dead client was seen as dead (no 5 s fencing sleep in the loop, which used to
        # stop the nodes' heartbeats and kill the cluster).
        assert stats["loop_stall_max_ms"] < max(1000, stalls_before)
        assert stats["offline_nodes"] == []
    finally:
        holder.kill()
        holder.wait()
    root.munmap(mine.addr, PS)
    root.shm_unlink("zombie")
    root.close()
    assert cluster.check() == []


def test_mmap_touch_munmap_cycles_reuse_addresses_and_keep_the_tlb_small(task):
    """20 cycles of mmap / touch one page / munmap used to leave 20 x 4097 TLB slots."""
    first = None
    for _ in range(20):
        m = task.mmap(16 << 20)
        task.write(m.addr, b"t")
        first = first or m.addr
        assert m.addr == first  # the freed range is handed out again
        task.munmap(m.addr, m.length)
        assert len(task._rtlb) == len(task._wtlb) == len(task._tnode) == 0


def test_the_leftover_sweep_kills_only_the_processes_a_cluster_recorded(run_dir):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  "nodes", "coordinator", "numaemu"])
    try:
        path = os.path.join(base_dir(), "deadbeef")
        os.mkdir(path, 0o700)
        with open(os.path.join(path, STATE_FILE), "w") as f:
            # The bystander's pid is recorded with another start time: the pid was reused.
            json.dump({"cluster_id": "deadbeef", "supervisor_pid": 0,
                       "pids": [victim.pid, bystander.pid],
                       "starts": [start_time(victim.pid), start_time(bystander.pid) + 1]}, f)
        sweep_leftovers()
        assert victim.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None, "an unrelated process was killed"
        assert not os.path.exists(path)
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()

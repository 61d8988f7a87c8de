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


def test_a_huge_sparse_file_costs_what_is_mapped_of_it(cluster, task, tmp_path):
    """The page cache is sized by the mapping, not the file: a 1 TiB sparse file mapped in
    part used to cost the coordinator 2 GiB of slots, and its writeback a scan of them."""
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 40)
    coordinator = cluster.processes()["children"][0]
    rss_before = _rss_kib(coordinator)
    m = task.mmap(4 * PS, file=path)
    assert task.read(m.addr, 8) == bytes(8)
    task.write(m.page(3), b"tail page")
    assert task.msync(m.addr, m.length) == 1
    with open(path, "rb") as f:
        f.seek(3 * PS)
        assert f.read(9) == b"tail page"
    assert os.path.getsize(path) == 1 << 40  # never extended, never truncated
    assert _rss_kib(coordinator) - rss_before < 256 << 10  # not the 2 GiB of slots
    task.munmap(m.addr, m.length)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_only_the_owner_or_privilege_unlinks_a_shared_object(cluster, task):
    import errno

    import pytest

    from numaemu import NumaError

    m = task.mmap(PS, shared="owned")
    task.write(m.addr, b"mine")
    stranger = cluster.attach(cpu=0, uid=os.getuid() + 1)
    try:
        with pytest.raises(NumaError) as info:
            stranger.shm_unlink("owned")
        assert info.value.errno == errno.EPERM
        again = stranger.mmap(PS, shared="owned")  # still there, same page
        assert stranger.read(again.addr, 4) == b"mine"
    finally:
        stranger.close()
    task.munmap(m.addr, PS)
    task.shm_unlink("owned")
    assert cluster.check() == []

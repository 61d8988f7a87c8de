"""A node that dies: noticed at once, taken offline, its pages poisoned, the rest intact.

Every test here kills (or stops) a node process of a cluster of its own and then checks,
through real client processes and the public API, what ARCHITECTURE.md's failure model
promises: the cluster keeps answering in normal time, pages on the dead node raise EIO,
allocation falls back, migrations to or from it back out, and every other page is intact.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest
from conftest import cluster_is_gone, small_topology

import numaemu
from nodes.segment import segment_path
from numaemu import MPOL_BIND, MPOL_MF_MOVE, NumaError

PS = 4096


@pytest.fixture
def cluster3():
    """Three nodes (CPUs 0-1, 2-3, 4-5), killed and restarted per test."""
    with numaemu.Cluster(small_topology(nodes=3, frames=2048)) as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


def node_pid(cluster, node: int) -> int:
    return cluster.processes()["children"][1 + node]  # coordinator first, then the nodes


def fill(task, node: int, pages: int, tag: bytes):
    """A mapping of ``pages`` pages bound to ``node``, each page filled with ``tag``."""
    m = task.mmap(pages * PS)
    task.mbind(m.addr, m.length, MPOL_BIND, [node])
    for p in range(pages):
        task.write(m.page(p), tag * (PS // len(tag)))
    return m


def wait_offline(cluster, node: int, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while node not in cluster.offline_nodes():
        assert time.monotonic() - start < timeout, f"node {node} never went offline"
        time.sleep(0.02)
    return time.monotonic() - start


def timed(fn, *args):
    start = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - start


def test_a_killed_node_is_offline_within_a_second_and_its_pages_are_poisoned(cluster3):
    task = cluster3.attach(cpu=0)
    keep = fill(task, 0, 4, b"node0 ok")
    lost = fill(task, 1, 4, b"node1 xx")
    other = fill(task, 2, 4, b"node2 ok")
    os.kill(node_pid(cluster3, 1), signal.SIGKILL)
    noticed = wait_offline(cluster3, 1)
    assert noticed < 1.0

    # The cluster answers in normal time, and says which node failed.
    text, took = timed(cluster3.hardware)
    assert took < 2.0 and "offline (failed) nodes: 1" in text and "node 1 size: 0 MB" in text
    assert timed(cluster3.numastat)[1] < 2.0
    assert cluster3.free_frames()[1] == 0
    assert cluster3.check() == []

    # Pages of the dead node: EIO on touch (the SIGBUS of a poisoned page), -EIO in
    # move_pages, still listed in numa_maps; every other page intact.
    for access in (lambda: task.read(lost.addr, 8), lambda: task.write(lost.page(2), b"x")):
        with pytest.raises(NumaError) as info:
            access()
        assert info.value.errno == errno.EIO
    assert task.move_pages(lost.pages) == [-errno.EIO] * 4
    assert "N1=4" in task.numa_maps()
    assert task.read(keep.addr, 8) == b"node0 ok" and task.read(other.page(3), 8) == b"node2 ok"
    assert not os.path.exists(segment_path(cluster3.cluster_id, 1))

    # Migration from it fails per page, to it fails at once; allocation falls back.
    assert task.migrate_pages(None, [1], [0]) == 4
    with pytest.raises(NumaError) as info:
        task.move_pages(keep.pages[:1], [1], MPOL_MF_MOVE)
    assert info.value.errno == errno.ENODEV
    near = cluster3.attach(cpu=2)  # a CPU of the dead node: first touch goes elsewhere
    fresh = near.mmap(4 * PS)
    near.write(fresh.addr, b"y" * (4 * PS))
    assert set(near.move_pages(fresh.pages)) <= {0, 2}
    task.munmap(lost.addr, lost.length)  # a poisoned mapping can still be unmapped
    assert cluster3.check() == []


def move_while_a_node_dies(cluster, root, m, target: int, slow: int, dying: int):
    """Move ``m``'s pages to ``target`` while the copy sleeps in node ``slow``, and SIGKILL
    node ``dying`` meanwhile; return the move's statuses and how long it took after the
    kill."""
    root._sync_call("inject_fault", node=slow, request="copy_in", count=1, delay=5.0)
    result = {}
    mover = threading.Thread(target=lambda: result.update(
        status=root.move_pages(m.pages, [target] * len(m.pages), MPOL_MF_MOVE)))
    mover.start()
    time.sleep(0.5)  # the copy is now sleeping in node ``slow``
    os.kill(node_pid(cluster, dying), signal.SIGKILL)
    killed = time.monotonic()
    mover.join(10)
    assert not mover.is_alive()
    return list(result["status"]), time.monotonic() - killed


def test_a_migration_to_a_node_that_dies_mid_copy_backs_out(cluster3):
    root = cluster3.attach(cpu=0, privileged=True)
    m = fill(root, 0, 16, b"survives")
    status, took = move_while_a_node_dies(cluster3, root, m, target=1, slow=1, dying=1)
    assert took < 2.0
    assert status == [0] * 16  # the pages stayed where they were
    assert all(root.read(p, 8) == b"survives" for p in m.pages)
    root.write(m.addr, b"writable")
    assert root.read(m.addr, 8) == b"writable"
    assert cluster3.check() == []


def test_a_migration_from_a_node_that_dies_mid_copy_ends_in_eio(cluster3):
    root = cluster3.attach(cpu=0, privileged=True)
    m = fill(root, 1, 8, b"doomed!!")
    status, _ = move_while_a_node_dies(cluster3, root, m, target=0, slow=0, dying=1)
    assert status == [-errno.EIO] * 8
    with pytest.raises(NumaError) as info:
        root.read(m.addr, 8)
    assert info.value.errno == errno.EIO
    root._sync_call("inject_fault", node=0, request="copy_in", count=0, delay=0.1)
    assert cluster3.check() == []


def test_a_hung_node_is_declared_dead_by_its_lease_and_fenced(cluster3):
    task = cluster3.attach(cpu=0)
    m = fill(task, 2, 2, b"frozen!!")
    pid = node_pid(cluster3, 2)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_offline(cluster3, 2, timeout=8.0) < 6.0
        with pytest.raises(NumaError) as info:
            task.read(m.addr, 8)
        assert info.value.errno == errno.EIO
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            assert time.monotonic() < deadline, "the hung node was not fenced"
            time.sleep(0.05)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert cluster3.check() == []


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"

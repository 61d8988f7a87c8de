"""The remote data path (numaemu/remote.py): tasks that reach frames through each node's
data service instead of mapping its segment, forced with ``data_path="remote"`` so that it
runs on one machine.  Same bytes, same counters, same shootdown guarantee as the mapped path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq
from conftest import cluster_is_gone, small_topology
from test_migration_concurrent import PS, increments_under_moves

import numaemu
from nodes import node as node_mod
from nodes.node import COPY_KEYS
from numaemu import MPOL_BIND, MPOL_INTERLEAVE, NumaError, remote
from numaemu import protocol as P
from numaemu.transport import Connection

MODEL_KEYS = ("local_accesses", "remote_accesses", "local_bytes", "remote_bytes", "access_ns",
              "fault_ns", "faults", "accesses_by_pair", "bytes_by_pair")


@pytest.fixture(scope="module")
def rcluster():
    """A 2-node cluster whose tasks use the remote data path unless told otherwise, and whose
    nodes copy migrated pages through each other's data services."""
    with numaemu.Cluster(small_topology(frames=4096), data_path="remote") as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture
def rtask(rcluster):
    t = rcluster.attach(cpu=0)
    yield t
    t.close()
    assert rcluster.check() == []


@pytest.fixture
def ltask(rcluster):
    t = rcluster.attach(cpu=0, data_path="local")
    yield t
    t.close()


def test_a_remote_task_maps_no_segment_and_talks_to_every_node(rtask, ltask):
    assert rtask.data_path == "remote" and sorted(rtask._links) == [0, 1]
    assert not rtask._views
    assert ltask.data_path == "local" and not ltask._links


def test_the_environment_variable_forces_the_remote_path(rcluster, monkeypatch):
    monkeypatch.setenv("NUMAEMU_DATA_PATH", "remote")
    with numaemu.Task(rcluster.address, cpu=0) as t:
        assert sorted(t._links) == [0, 1]
    monkeypatch.setenv("NUMAEMU_DATA_PATH", "sideways")
    with pytest.raises(NumaError) as info:
        numaemu.Task(rcluster.address, cpu=0)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("policy", ["interleave", "one_node"])
def test_reads_and_writes_of_every_size_and_alignment_match_the_local_path(
        rcluster, rtask, ltask, policy):
    """Both tasks map one shared object: what one writes, the other reads, byte for byte,
    and a partial write leaves the rest of its pages alone."""
    pages = 24
    name = f"rt-{policy}"
    rm, lm = rtask.mmap(pages * PS, shared=name), ltask.mmap(pages * PS, shared=name)
    if policy == "interleave":
        rtask.mbind(rm.addr, rm.length, MPOL_INTERLEAVE, [0, 1])
    else:
        rtask.mbind(rm.addr, rm.length, MPOL_BIND, [1])
    rng = np.random.default_rng(7)
    model = bytearray(rng.integers(0, 256, pages * PS, dtype=np.uint8).tobytes())
    rtask.write(rm.addr, bytes(model))
    assert ltask.read(lm.addr, len(model)) == model
    sizes = [1, 7, 8, 100, PS - 1, PS, PS + 1, 3 * PS + 5, 9 * PS]
    offsets = [0, 1, 8, PS // 2, PS - 1, 5 * PS + 3]
    for size in sizes:
        for off in offsets:
            for writer, wm, reader, read_m in ((rtask, rm, ltask, lm), (ltask, lm, rtask, rm)):
                data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                writer.write(wm.addr + off, data)
                model[off : off + size] = data
                assert reader.read(read_m.addr + off, size) == data, (size, off)
                assert writer.read(wm.addr + off, size) == data
        assert rtask.read(rm.addr, len(model)) == model, size
    assert ltask.read(lm.addr, len(model)) == model
    for t, m in ((rtask, rm), (ltask, lm)):
        t.munmap(m.addr, m.length)
    rtask.shm_unlink(name)


def _workload(task) -> dict:
    """The same accesses, whatever the data path: the model's counters after them."""
    m = task.mmap(16 * PS)
    task.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1])
    task.write(m.addr + 3, b"x" * (5 * PS))
    task.read(m.addr, 8)
    task.read(m.addr + PS - 4, 8)
    task.read(m.addr, 16 * PS)
    task.write(m.page(7) + 100, b"y" * 33)
    task.read(m.page(15), 1)  # never written: faults in
    a = m.ndarray(np.int32)
    a[np.array([0, 5000, 1025, 7, 16000])] = 9
    assert list(a[np.array([5000, 7, 16000])]) == [9, 9, 9]
    a[100:4000:3] = np.arange(len(range(100, 4000, 3)))
    np.asarray(a)
    stats = task.stats()
    task.munmap(m.addr, m.length)
    return {k: stats[k] for k in MODEL_KEYS}


def test_the_latency_model_charges_the_same_counters_as_the_local_path(rtask, ltask):
    remote_stats, local_stats = _workload(rtask), _workload(ltask)
    assert remote_stats == local_stats
    assert remote_stats["remote_accesses"] > 0 and remote_stats["local_accesses"] > 0
    assert rtask.stats()["data_requests"] > 0 and rtask.stats()["data_ns"] > 0
    assert ltask.stats()["data_requests"] == 0


def test_array_views_gather_scatter_and_slice_through_the_data_services(rtask):
    m = rtask.mmap(8 * PS)
    rtask.mbind(m.addr, m.length, MPOL_INTERLEAVE, [0, 1])
    a = m.ndarray(np.int64)
    model = np.zeros(len(a), dtype=np.int64)
    a[:] = np.arange(len(a))
    model[:] = np.arange(len(a))
    idx = np.array([3, 4095, 512, 3, 1000, 2047])
    a[idx] = -np.arange(len(idx))
    model[idx] = -np.arange(len(idx))
    a[10:600:7] += 5
    model[10:600:7] += 5
    a[a.__array__() % 11 == 0] = 11
    model[model % 11 == 0] = 11
    assert (np.asarray(a) == model).all()
    assert (a[idx] == model[idx]).all() and a[17] == model[17]
    assert (a[100:3000] == model[100:3000]).all()
    b = m.ndarray(np.uint8, offset=PS - 4, shape=(2, 4))  # straddles nodes 0 and 1
    b[1] = [1, 2, 3, 4]
    assert rtask.read(m.addr + PS, 4) == bytes([1, 2, 3, 4])
    rtask.munmap(m.addr, m.length)


def copy_counters(cluster) -> dict[str, int]:
    """The nodes' copy-engine counters (``Cluster.node_stats``), summed over the nodes."""
    stats = cluster.node_stats()
    return {k: sum(s["copy"][k] for s in stats.values()) for k in COPY_KEYS}


def test_increments_are_exact_while_pages_move_under_remote_clients(rcluster):
    """The shootdown guarantee over the wire: incrementers in their own processes, reaching
    memory only through the data services, while a privileged task keeps moving the pages.
    The cluster's nodes are on the remote path too: every page moved went from node to node
    through the source's data service (seed step 12 across hosts), none by mapping."""
    root = rcluster.attach(cpu=1, privileged=True)
    before = copy_counters(rcluster)
    increments_under_moves(rcluster, root, "rstress", 30, pages=4)
    after = copy_counters(rcluster)
    root.close()
    assert after["frames_fetched"] - before["frames_fetched"] == 30 * 4
    assert after["frames_copied_mapped"] == before["frames_copied_mapped"]
    assert after["fetch_failures"] == before["fetch_failures"]
    assert rcluster.check() == []


def _mover(task, m, target: int, barrier, out: list) -> None:
    """Move ``m`` to ``target`` and back, each move started with the other mover's."""
    for t in (target, target ^ 1):
        barrier.wait(30)
        out.append(list(task.move_pages(m.pages, [t] * len(m.pages))))


def test_nodes_fetching_from_each_other_at_once_both_get_their_frames(rcluster):
    """Migrations in both directions at once: node 1 fetches task a's pages from node 0
    while node 0 fetches task b's from node 1.  A node's loop keeps serving its data
    endpoint while its own fetch waits, so neither waits for the other: no fetch fails or
    runs into its timeout, and the nodes did serve each other mid-fetch."""
    pages = 1024  # 4 MiB each way: fetches that last a few ms, so that they overlap
    a, b = rcluster.attach(cpu=0, privileged=True), rcluster.attach(cpu=2, privileged=True)
    ma, mb = a.mmap(pages * PS), b.mmap(pages * PS)
    data_a = bytes(range(256)) * (pages * PS // 256)
    data_b = bytes(range(255, -1, -1)) * (pages * PS // 256)
    a.write(ma.addr, data_a)  # first touch: on the task's own node
    b.write(mb.addr, data_b)
    assert set(a.move_pages(ma.pages)) == {0} and set(b.move_pages(mb.pages)) == {1}
    before = copy_counters(rcluster)
    overlapped, rounds = 0, 0
    while not overlapped and rounds < 40:  # (almost always the first round)
        barrier = threading.Barrier(2)
        results: dict[str, list] = {"a": [], "b": []}
        movers = [threading.Thread(target=_mover, args=(a, ma, 1, barrier, results["a"])),
                  threading.Thread(target=_mover, args=(b, mb, 0, barrier, results["b"]))]
        t0 = time.monotonic()
        for th in movers:
            th.start()
        for th in movers:
            th.join(60)
        elapsed = time.monotonic() - t0
        rounds += 2
        assert results["a"] == [[1] * pages, [0] * pages]
        assert results["b"] == [[0] * pages, [1] * pages]
        assert elapsed < node_mod.FETCH_TIMEOUT, "a fetch waited for the other node"
        counters = copy_counters(rcluster)
        assert counters["fetch_failures"] == before["fetch_failures"]
        overlapped = counters["served_during_fetch"] - before["served_during_fetch"]
    assert overlapped, "the fetches never overlapped: nothing was tested"
    assert a.read(ma.addr, pages * PS) == data_a and b.read(mb.addr, pages * PS) == data_b
    assert counters["frames_fetched"] - before["frames_fetched"] == 2 * rounds * pages
    a.close()
    b.close()
    assert rcluster.check() == []


def _links_of(task):
    return task.data_path, sorted(task._links)


def test_spawned_clients_use_the_remote_path_too(rcluster):
    assert rcluster.spawn(_links_of, cpu=2).join(30) == ("remote", [0, 1])


def test_a_data_service_that_refuses_gives_an_error_and_the_next_access_works(rcluster):
    root = rcluster.attach(cpu=0, privileged=True)
    m = root.mmap(PS)
    root.write(m.addr, b"kept")
    node = root.move_pages([m.addr])[0]
    root._sync_call("inject_fault", node=node, request="read_frames", count=1)
    with pytest.raises(NumaError) as info:
        root.read(m.addr, 4)
    assert info.value.errno == errno.EIO
    assert root.read(m.addr, 4) == b"kept"
    root.close()


def test_malformed_data_requests_get_errors_and_the_node_keeps_serving(rcluster):
    endpoint = rcluster._call("info")["segments"][0]["data_endpoint"]
    pfns = np.array([0, 1], dtype=P.PFN)
    bad = [P.WriteFrames(pfns=pfns, data=b"x" * 10, offset=0),  # does not reach frame 1
           P.WriteFrames(pfns=pfns, data=b"x" * PS, offset=PS),  # offset past the first
           P.WriteFrames(pfns=pfns, data=b"x" * 3 * PS, offset=0),
           P.WriteFrames(pfns=np.array([], dtype=P.PFN), data=b"x", offset=0),
           P.ReadFrames(pfns=pfns, offset=-1), P.ReadFrames(pfns=pfns, offset=0, length=3 * PS),
           P.ReadFrames(pfns=np.array([1 << 40], dtype=P.PFN)),
           P.ReadElements(elements=pfns, itemsize=3),
           P.ReadElements(elements=np.array([-1], dtype=P.PFN), itemsize=8),
           P.ReadElements(elements=np.array([1 << 40], dtype=P.PFN), itemsize=8),
           P.WriteElements(elements=pfns, itemsize=8, data=b"x" * 8),
           P.ReadElements(elements=np.zeros(P.elements_per_message(8) + 1, dtype=P.PFN),
                          itemsize=8)]
    with Connection(endpoint, peer="node 0's data service") as conn:
        for req in bad:
            with pytest.raises(NumaError) as info:
                conn.request(req, timeout=10)
            assert info.value.errno == errno.EINVAL, req
        with pytest.raises(NumaError) as info:  # the data endpoint serves data ops only
            conn.call("alloc", count=1, timeout=10)
        assert info.value.errno == errno.EPERM
        assert len(conn.call("read_frames", pfns=pfns, timeout=10)["data"]) == 2 * PS


def test_oversized_frames_and_extra_frames_never_reach_the_frames(rcluster):
    """ZMQ_MAXMSGSIZE bounds each frame: a data frame one byte over the limit drops its
    sender's connection before the node reads it; a message of many small frames is EINVAL.
    Neither changes the page, and the node keeps serving."""
    root = rcluster.attach(cpu=0, privileged=True)
    m = root.mmap(PS)
    root.write(m.addr, b"kept" * (PS // 4))
    node = root.move_pages([m.addr])[0]
    pfn = root._npfn[(m.addr // PS) - root._base_vpn : (m.addr // PS) - root._base_vpn + 1]
    endpoint = rcluster._call("info")["segments"][node]["data_endpoint"]
    big = P.max_frame_message(PS) + 1
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        header = P.pack({"op": "write_frames", "seq": 1, "pfns": pfn, "offset": 0,
                         "data": big})
        sock.send_multipart([header, b"x" * big])
        assert not sock.poll(2000), "an oversized frame was answered"
        many = [P.encode_request(P.ReadFrames(pfns=pfn), 2)] + [b"x" * 8] * 40
        with Connection(endpoint, peer=f"node {node}'s data service") as conn:
            conn.sock.send_multipart(many)
            with pytest.raises(NumaError) as info:
                conn.wait(2, "read_frames", timeout=10)
            assert info.value.errno == errno.EINVAL
    finally:
        sock.close(0)
    assert root.read(m.addr, PS) == b"kept" * (PS // 4)
    root.close()


def test_a_hung_or_dead_node_poisons_its_pages_as_on_the_mapped_path(monkeypatch):
    """An access to a node whose data service stops answering (SIGSTOP) or goes away
    (SIGKILL) faults again until the coordinator takes the node offline: EIO, never a hang
    and never a ClusterError for a cluster that is still up."""
    monkeypatch.setattr(remote, "DATA_TIMEOUT", 1.0)
    with numaemu.Cluster(small_topology(nodes=3, frames=512), data_path="remote") as c:
        t = c.attach(cpu=0)
        hung, dead, kept = (t.mmap(2 * PS) for _ in range(3))
        for m, node in ((hung, 1), (dead, 2), (kept, 0)):
            t.mbind(m.addr, m.length, MPOL_BIND, [node])
            t.write(m.addr, b"z" * (2 * PS))
        pids = c.processes()["children"][1:]  # coordinator first, then the nodes

        # Hung: each try waits DATA_TIMEOUT; the coordinator's 5 s lease declares the node
        # dead and fences it; the access, still faulting again, then gets EIO.
        os.kill(pids[1], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(NumaError) as info:
                t.read(hung.addr, 8)
            assert info.value.errno == errno.EIO
            assert time.monotonic() - t0 < 5 + 2 * remote.DATA_TIMEOUT + 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[1], signal.SIGCONT)

        # Dead: at once, before the coordinator may have noticed, through every access path.
        view = dead.ndarray(np.int64)
        os.kill(pids[2], signal.SIGKILL)
        t0 = time.monotonic()
        for access in (lambda: t.read(dead.addr, 8), lambda: t.write(dead.addr + PS, b"w"),
                       lambda: view[np.array([0, 300])],
                       lambda: view.__setitem__(np.array([7, 600]), 1)):
            with pytest.raises(NumaError) as info:
                access()
            assert info.value.errno == errno.EIO
        assert time.monotonic() - t0 < 5
        assert t.read(kept.addr, 4) == b"zzzz"
        assert sorted(c.offline_nodes()) == [1, 2]
        t.close()
    assert cluster_is_gone(c.cluster_id)

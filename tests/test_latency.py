"""The latency model in the client: what the virtual clock charges, the per-pair counters,
fault and migration-wait charges, explicit matrices, and ``numaemu bench latency``.

Only virtual time is asserted: wall-clock accuracy of delay injection is a benchmark
(docs/latency.md), not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import cluster_is_gone

import numaemu
from numaemu import MPOL_BIND, MPOL_MF_MOVE_ALL
from numaemu.bench_latency import bench_latency, ratio_errors
from numaemu.latency import FAULT_BASE_NS, FAULT_PAGE_NS, MIGRATION_WAIT_NS, LatencyModel

PS = 4096
N = 1000


def _cost(model: LatencyModel, cpu_node: int, mem_node: int, pages: int, nbytes: int) -> float:
    return pages * model.latency_ns[cpu_node][mem_node] + (
        nbytes / model.bandwidth_gbps[cpu_node][mem_node])


def _delta(after: dict, before: dict, key: str):
    return after[key] - before[key]


def _bound(task, pages_by_node: list[int]):
    """A mapping whose consecutive page runs are bound to the given nodes, faulted in."""
    m = task.mmap(len(pages_by_node) * PS)
    for i, node in enumerate(pages_by_node):
        task.mbind(m.page(i), PS, MPOL_BIND, [node])
    task.write(m.addr, bytes(m.length))
    assert task.move_pages(m.pages) == pages_by_node
    return m


def test_tlb_hit_reads_cost_latency_plus_bytes_over_bandwidth(task):
    model = LatencyModel(task.topology)
    assert task.node == 0
    m = _bound(task, [1, 0, 0, 0])
    for addr, node in ((m.page(0) + 64, 1), (m.page(1) + 64, 0)):
        before = task.stats()
        for _ in range(N):
            task.read(addr, 8)
        after = task.stats()
        want = N * (model.latency_ns[0][node] + 8 / model.bandwidth_gbps[0][node])
        assert _delta(after, before, "vtime_ns") == pytest.approx(want, rel=1e-12, abs=1e-9)
        assert _delta(after, before, "access_ns") == pytest.approx(want, rel=1e-12, abs=1e-9)
        assert _delta(after, before, "faults") == 0
        assert _delta(after, before, "fault_ns") == 0
    # A 3-page read from inside page 0 (remote) to inside page 2 (local): three latencies
    # and each node's share of the bytes.
    before = task.stats()
    assert len(task.read(m.page(0) + 100, 2 * PS - 50)) == 2 * PS - 50
    after = task.stats()
    want = _cost(model, 0, 1, 1, PS - 100) + _cost(model, 0, 0, 2, PS + 50)
    assert _delta(after, before, "vtime_ns") == pytest.approx(want, rel=1e-12)
    assert _delta(after, before, "remote_accesses") == 1
    assert _delta(after, before, "local_accesses") == 2
    assert _delta(after, before, "remote_bytes") == PS - 100
    assert _delta(after, before, "local_bytes") == PS + 50
    task.munmap(m.addr, m.length)


def test_counters_by_node_pair_follow_the_task_across_cpus(cluster):
    task = cluster.attach(cpu=0)
    try:
        model = LatencyModel(task.topology)
        m = _bound(task, [0, 1])
        before = task.stats()
        for _ in range(3):
            task.read(m.page(0), 8)
        for _ in range(5):
            task.read(m.page(1), 16)
        task.write(m.page(1), b"12345678")
        task.sched_setaffinity([2])  # the scheduler moves it to node 1
        assert (task.cpu, task.node) == (2, 1)
        for _ in range(7):
            task.read(m.page(0), 8)
        for _ in range(11):
            task.read(m.page(1), 8)
        task.read(m.page(1) - 4, 8)  # 4 bytes on each node
        after = task.stats()
        pairs = [[a - b for a, b in zip(ra, rb)] for ra, rb in
                 zip(after["accesses_by_pair"], before["accesses_by_pair"])]
        nbytes = [[a - b for a, b in zip(ra, rb)] for ra, rb in
                  zip(after["bytes_by_pair"], before["bytes_by_pair"])]
        assert pairs == [[3, 6], [8, 12]]
        assert nbytes == [[24, 88], [60, 92]]
        assert _delta(after, before, "local_accesses") == 3 + 12
        assert _delta(after, before, "remote_accesses") == 6 + 8
        assert _delta(after, before, "local_bytes") == 24 + 92
        assert _delta(after, before, "remote_bytes") == 88 + 60
        want = sum(_cost(model, i, j, pairs[i][j], nbytes[i][j])
                   for i in (0, 1) for j in (0, 1))
        assert _delta(after, before, "vtime_ns") == pytest.approx(want, rel=1e-12)
    finally:
        task.close()


def test_faults_are_charged_their_modeled_cost(task):
    model = LatencyModel(task.topology)
    m = task.mmap(5 * PS)
    before = task.stats()
    task.write(m.addr, bytes(5 * PS))  # one fault resolves all 5 pages
    mid = task.stats()
    task.read(m.addr + 5 * PS - 8, 8)  # a TLB hit: no fault
    after = task.stats()
    assert _delta(mid, before, "faults") == 1
    assert _delta(mid, before, "fault_ns") == FAULT_BASE_NS + 5 * FAULT_PAGE_NS
    assert LatencyModel.fault_ns(5) == FAULT_BASE_NS + 5 * FAULT_PAGE_NS
    want = FAULT_BASE_NS + 5 * FAULT_PAGE_NS + _cost(model, 0, 0, 5, 5 * PS)
    assert _delta(mid, before, "vtime_ns") == pytest.approx(want, rel=1e-12)
    assert _delta(after, mid, "faults") == 0
    assert _delta(after, mid, "vtime_ns") == pytest.approx(_cost(model, 0, 0, 1, 8))
    one = task.mmap(PS)
    before = task.stats()
    task.read(one.addr, 8)  # a read fault maps the zero page: one page
    after = task.stats()
    assert _delta(after, before, "fault_ns") == FAULT_BASE_NS + FAULT_PAGE_NS
    task.munmap(m.addr, m.length)
    task.munmap(one.addr, one.length)


def test_a_wait_on_a_page_under_migration_is_charged(cluster):
    """Another task moves a shared page while this one reads it: the read faults on the
    migration entry, waits, and is charged MIGRATION_WAIT_NS for it."""
    root = cluster.attach(cpu=1, privileged=True)
    reader = cluster.attach(cpu=2)
    try:
        mine = root.mmap(PS, shared="latency-wait")
        root.write(mine.addr, b"w" * PS)
        theirs = reader.mmap(PS, shared="latency-wait")
        assert reader.read(theirs.addr, 8) == b"w" * 8  # cached: the next read is a hit
        # The copy to node 1 (step 12) takes a second; the shootdown (step 5) is before it.
        root._sync_call("inject_fault", node=1, request="copy_in", count=1, delay=1.0)
        result: list = []
        mover = threading.Thread(target=lambda: result.append(
            root.move_pages([mine.addr], [1], MPOL_MF_MOVE_ALL)))
        before = reader.stats()
        mover.start()
        time.sleep(0.3)
        assert reader.read(theirs.addr, 8) == b"w" * 8
        after = reader.stats()
        mover.join(30)
        assert list(result[0]) == [1]
        waits = _delta(after, before, "migration_waits")
        assert waits == 1
        assert _delta(after, before, "migration_wait_ns") == waits * MIGRATION_WAIT_NS
        assert _delta(after, before, "vtime_ns") == pytest.approx(
            _delta(after, before, "access_ns") + _delta(after, before, "fault_ns")
            + waits * MIGRATION_WAIT_NS, rel=1e-12)
        reader.munmap(theirs.addr, theirs.length)
        root.munmap(mine.addr, mine.length)
        root.shm_unlink("latency-wait")
    finally:
        reader.close()
        root.close()
    assert cluster.check() == []


EXPLICIT = numaemu.Topology([[10, 21], [21, 10]], frames_per_node=256, cpus_per_node=1,
                            latency_ns=[[100, 300], [250, 90]],
                            bandwidth_gbps=[[10, 4], [5, 16]])


def test_explicit_latency_and_bandwidth_matrices_set_the_costs():
    model = LatencyModel(EXPLICIT)
    assert model.latency_ns == [[100, 300], [250, 90]]
    assert model.bandwidth_gbps == [[10, 4], [5, 16]]
    with numaemu.Cluster(EXPLICIT) as cluster:
        for cpu, local, remote in ((0, 0, 1), (1, 1, 0)):
            task = cluster.attach(cpu=cpu)
            m = _bound(task, [local, remote])
            for page, node in ((m.page(0), local), (m.page(1), remote)):
                before = task.stats()
                for _ in range(N):
                    task.read(page, 8)
                after = task.stats()
                want = N * (EXPLICIT.latency_ns[cpu][node] + 8 / EXPLICIT.bandwidth_gbps[cpu][node])
                assert _delta(after, before, "vtime_ns") == pytest.approx(want, rel=1e-12)
            before = task.stats()
            task.read(m.addr, 2 * PS)
            after = task.stats()
            want = _cost(model, cpu, local, 1, PS) + _cost(model, cpu, remote, 1, PS)
            assert _delta(after, before, "vtime_ns") == pytest.approx(want, rel=1e-12)
            task.close()
    assert cluster_is_gone(cluster.cluster_id)
    # The bench reports the same matrix, and its virtual clock agrees.
    result = bench_latency(EXPLICIT, repeat=1, steps=300, pages=8, dilation=5)
    assert result["configured_ns"] == [[100.8, 302.0], [251.6, 90.5]]
    assert result["virtual_ns"] == result["configured_ns"]


def test_ratio_errors_use_the_local_node_or_the_cheapest_column():
    # Row node 0 has memory (column 0); row node 2 has none: its cheapest column is node 1.
    configured = [[100.0, 200.0], [300.0, 150.0]]
    measured = [[10.0, 22.0], [33.0, 15.0]]
    errors = ratio_errors([0, 2], [0, 1], configured, measured)
    assert errors[0] == pytest.approx([0.0, 10.0])
    assert errors[1] == pytest.approx([10.0, 0.0])


def _bench(*args: str, timeout: float = 60) -> dict:
    out = subprocess.run([sys.executable, "-m", "numaemu", "bench", "latency", "--json", *args],
                         capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # exactly one object


def _shape(matrix: list[list[float]]) -> tuple[int, int]:
    assert len({len(row) for row in matrix}) == 1
    return len(matrix), len(matrix[0])


def test_bench_latency_json_on_the_built_in_cluster():
    result = _bench("--repeat", "1", "--steps", "2000")
    model = LatencyModel(numaemu.Topology.default())
    want = [[round(model.latency_ns[i][j] + 8 / model.bandwidth_gbps[i][j], 6)
             for j in (0, 1)] for i in (0, 1)]
    assert result["configured_ns"] == want
    assert result["virtual_ns"] == want
    assert _shape(result["measured_ns"]) == (2, 2)
    assert all(x > 0 for row in result["measured_ns"] for x in row)
    assert result["max_error_pct"] >= 0
    assert result["max_error_pct"] == max(map(max, result["error_pct"]))


def test_bench_latency_json_rows_are_cpu_nodes_and_columns_memory_nodes(tmp_path):
    topo = numaemu.Topology(
        distances=[[10, 16, 21, 32], [16, 10, 21, 21], [21, 21, 10, 16], [32, 21, 16, 10]],
        frames_per_node=256, cpus=[[0, 1], [2, 3], [4, 5], []])
    path = tmp_path / "asym.json"
    path.write_text(json.dumps(topo.to_dict()))
    result = _bench("--topology", str(path), "--repeat", "1", "--steps", "300", "--pages", "16")
    assert result["rows"] == [0, 1, 2]
    assert result["columns"] == [0, 1, 2, 3]
    for key in ("configured_ns", "virtual_ns", "measured_ns", "error_pct"):
        assert _shape(result[key]) == (3, 4)
    assert result["virtual_ns"] == result["configured_ns"]
    assert result["configured_ns"][0][3] == pytest.approx(80 * 3.2 + 8 / (20 / 3.2))

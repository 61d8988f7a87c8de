"""Shared fixtures: real clusters (session-scoped, they cost ~0.5 s each) and hygiene checks."""

from __future__ import annotations

import os
import subprocess

import pytest

import numaemu
from nodes.segment import cluster_segments

pytest_plugins = ["pytester"]  # tests/test_pytest_plugin.py runs users' test files


@pytest.fixture(scope="session", autouse=True)
def run_dir(tmp_path_factory):
    """Keep the tests' clusters apart from any the user runs."""
    path = tmp_path_factory.mktemp("numaemu-run")
    old = os.environ.get("NUMAEMU_RUN_DIR")
    os.environ["NUMAEMU_RUN_DIR"] = str(path)
    yield str(path)
    if old is None:
        os.environ.pop("NUMAEMU_RUN_DIR", None)
    else:
        os.environ["NUMAEMU_RUN_DIR"] = old


def cluster_is_gone(cluster_id: str) -> bool:
    """No segment and no process of this cluster remains (ARCHITECTURE invariant 5)."""
    if cluster_segments(cluster_id):
        return False
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return cluster_id not in out


def small_topology(nodes: int = 2, frames: int = 4096, cpus: int = 2) -> numaemu.Topology:
    return numaemu.Topology.symmetric(nodes=nodes, frames_per_node=frames, cpus_per_node=cpus)


@pytest.fixture(scope="session")
def cluster():
    """A 2-node cluster, 16 MiB per node, CPUs 0-1 on node 0 and 2-3 on node 1."""
    with numaemu.Cluster(small_topology()) as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture(scope="session")
def cluster4():
    """A 4-node cluster with an asymmetric distance matrix and a memory-only node 3."""
    topo = numaemu.Topology(
        distances=[[10, 16, 21, 32], [16, 10, 21, 21], [21, 21, 10, 16], [32, 21, 16, 10]],
        frames_per_node=2048, cpus=[[0, 1], [2, 3], [4, 5], []])
    with numaemu.Cluster(topo) as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture(scope="module")
def fresh_cluster():
    """A 2-node cluster of its own per test module, 64 MiB per node: its next-fit frame
    allocators have not wrapped around, so memory faulted or migrated in one batch gets
    consecutive frames (tests of the paths that depend on frame layout)."""
    with numaemu.Cluster(small_topology(frames=16384)) as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture
def fresh_task(fresh_cluster):
    """A task on CPU 0 (node 0) of ``fresh_cluster``, closed after the test."""
    t = fresh_cluster.attach(cpu=0)
    yield t
    t.close()


@pytest.fixture(autouse=True)
def _invariants_hold(request):
    """After each test on a shared cluster, page tables, page caches, page counts and node
    free maps still agree (ARCHITECTURE.md invariants 1 and 3)."""
    yield
    for name in ("cluster", "cluster4", "weighted_cluster", "fresh_cluster"):
        if name in request.fixturenames:
            assert request.getfixturevalue(name).check() == []


@pytest.fixture
def task(cluster):
    """A task on CPU 0 (node 0), closed after the test."""
    t = cluster.attach(cpu=0)
    yield t
    t.close()


@pytest.fixture
def task4(cluster4):
    t = cluster4.attach(cpu=0)
    yield t
    t.close()


#: A NUMA scanner that runs at once and often, so a test sees several scan periods in
#: seconds (coordinator/numa_balancing.py).
FAST_SCAN = {"kernel.numa_balancing_scan_delay_ms": 0,
             "kernel.numa_balancing_scan_period_min_ms": 100,
             "kernel.numa_balancing_scan_size_mb": 1}


@pytest.fixture(scope="module")
def scanning_machine():
    """A 2-node machine with the fast NUMA scanner, one per test module."""
    with numaemu.Cluster(small_topology(nodes=2, frames=4096)) as c:
        for name, value in FAST_SCAN.items():
            c.sysctl(name, value)
        yield c
    assert cluster_is_gone(c.cluster_id)

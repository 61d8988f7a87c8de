"""A cluster placed on a Ray cluster (numaemu/raylaunch.py), on one machine.

A local Ray cluster of three Ray nodes (``ray.cluster_utils.Cluster``) stands in for three
hosts.  The emulated nodes are spread over them, clients are Ray actors placed next to
their CPU's node or where ``host=`` says, and every client uses the remote data path (as
it must on another host): workloads write, move pages between nodes on different Ray
nodes and read back exact data; a peer without the keys is refused; a killed actor is a
dead node; teardown leaves no actor, no process and no segment.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cluster_is_gone
from test_curve import exchange
from test_lifecycle import wait_until
from test_migration_concurrent import increments_under_moves
from test_remote_data import copy_counters

import numaemu
from numaemu import protocol as P
from numaemu.keys import Keys
from numaemu.raylaunch import NAMESPACE
from numaemu.transport import Connection

pytestmark = pytest.mark.ray

PS = 4096
LABEL = ("numaemu-test", "far")


@pytest.fixture(scope="module")
def ray_nodes():
    """Three Ray nodes on this machine, this process connected as a driver; their ids
    (the head first, the labelled node last)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster as RayCluster

    rc = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    rc.add_node(num_cpus=1)
    rc.add_node(num_cpus=1, labels={LABEL[0]: LABEL[1]})
    rc.wait_for_nodes()
    ray.init(address=rc.address, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        head = [n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"]]
        far = [n["NodeID"] for n in nodes if (n.get("Labels") or {}).get(LABEL[0]) == LABEL[1]]
        rest = [n["NodeID"] for n in nodes if n["NodeID"] not in head + far]
        yield {"address": rc.address, "ids": head + rest + far}
    finally:
        ray.shutdown()
        rc.shutdown()


@pytest.fixture(scope="module")
def rcluster(ray_nodes):
    topo = numaemu.Topology.symmetric(nodes=3, frames_per_node=2048, cpus_per_node=2)
    with numaemu.Cluster(topo, launcher="ray", ray_address=ray_nodes["address"],
                         data_path="remote") as c:
        yield c
    assert cluster_is_gone(c.cluster_id)
    assert not _actors_of(c.cluster_id)


def _actors_of(cluster_id: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(cluster_id)]


def _ray_node(task) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _write_move_read(task, me: int, moves: list[list[int]]):
    """Write a pattern of our own, move every page to each target list in turn, read it
    back after each move; (move statuses, exact every time, our Ray node, data requests)."""
    pages = 8
    m = task.mmap(pages * PS)
    pattern = bytes((me * 37 + i) % 251 for i in range(pages * PS))
    task.write(m.addr, pattern)
    statuses, exact = [], []
    for targets in moves:
        statuses.append(task.move_pages(m.pages, targets * (pages // len(targets))))
        exact.append(task.read(m.addr, len(pattern)) == pattern)
    return statuses, exact, _ray_node(task), task.stats()["data_requests"]


def _linger(task, seconds: float) -> int:
    m = task.mmap(4 * PS)
    task.write(m.addr, b"l" * (4 * PS))
    end, reads = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        task.read(m.addr, 4 * PS)
        reads += 1
    return reads


def test_each_node_runs_on_its_own_ray_node(rcluster, ray_nodes):
    placed = [rcluster.ray["nodes"][str(n)]["node_id"] for n in range(3)]
    assert sorted(placed) == sorted(ray_nodes["ids"])  # STRICT_SPREAD: one per Ray node
    assert sorted(_actors_of(rcluster.cluster_id)) == sorted(
        [f"{rcluster.cluster_id}-coordinator"]
        + [f"{rcluster.cluster_id}-node{n}" for n in range(3)])
    assert rcluster.address.startswith("tcp://") and rcluster.keys


def test_workloads_on_three_ray_nodes_move_pages_and_read_back_exact_data(rcluster):
    placed = [rcluster.ray["nodes"][str(n)]["node_id"] for n in range(3)]
    # Client k runs on CPU 2k (node k) and moves its pages to the two other nodes in turn.
    moves = [[[(k + 1) % 3], [(k + 2) % 3], [(k + 1) % 3, k]] for k in range(3)]
    handles = [rcluster.spawn(_write_move_read, k, moves[k], cpu=2 * k) for k in range(3)]
    for k, h in enumerate(handles):
        statuses, exact, ran_on, requests = h.join(120)
        assert ran_on == placed[k]  # next to its CPU's node
        assert statuses == [t * (8 // len(t)) for t in moves[k]]
        assert exact == [True, True, True]
        assert requests > 0  # through the nodes' data services, not a mapping
    assert rcluster.check() == []


def test_increments_are_exact_while_pages_move_between_ray_nodes(rcluster):
    before = copy_counters(rcluster)
    root = rcluster.attach(cpu=0, privileged=True)
    try:
        increments_under_moves(rcluster, root, "ray-increments", moves_wanted=12)
    finally:
        root.close()
    after = copy_counters(rcluster)
    # Each move copied its 4 pages node to node, through the source's data service: not
    # through the coordinator or a client, and not by mapping the other node's memory.
    assert after["frames_fetched"] - before["frames_fetched"] == 12 * 4
    assert after["frames_copied_mapped"] == before["frames_copied_mapped"]


def test_a_client_runs_on_the_host_it_names(rcluster, ray_nodes):
    far = ray_nodes["ids"][-1]
    by_label = rcluster.spawn(_ray_node, host=f"{LABEL[0]}={LABEL[1]}", cpu=0)
    by_id = rcluster.spawn(_ray_node, host=ray_nodes["ids"][1][:10])
    assert by_label.join(60) == far
    assert by_id.join(60) == ray_nodes["ids"][1]
    with pytest.raises(numaemu.ClusterError, match="no live Ray node"):
        rcluster.spawn(_ray_node, host="no-such-node")


def test_a_peer_without_the_cluster_keys_is_refused(rcluster, tmp_path, monkeypatch):
    monkeypatch.delenv("NUMAEMU_KEYS", raising=False)
    owner = rcluster.attach(cpu=0)
    m = owner.mmap(PS)
    owner.write(m.addr, b"ray secret")
    wrong = Keys.create(str(tmp_path / "other-keys"))
    with pytest.raises(numaemu.ClusterError, match="refused our keys"), \
            Connection(rcluster.address, keys=wrong.directory, connect_timeout=2) as conn:
        conn.call("info", timeout=5)
    with Connection(rcluster.address, keys=rcluster.keys) as conn:
        segments = conn.call("info")["segments"]
    read = P.encode_request(P.ReadFrames(pfns=np.zeros(1, dtype=P.PFN)), 1)
    for seg in segments:
        assert exchange(seg["data_endpoint"], read, None) is None
        assert exchange(seg["data_endpoint"], read, wrong) is None
        assert exchange(seg["data_endpoint"], read, Keys.load(rcluster.keys))["ok"]
    assert owner.read(m.addr, 10) == b"ray secret"
    owner.close()


def test_a_killed_client_actor_is_a_dead_client(rcluster):
    handle = rcluster.spawn(_linger, 60.0, cpu=2)
    pid = handle.pid

    def attached() -> set:
        with Connection(rcluster.address, keys=rcluster.keys) as conn:
            return {t["pid"] for t in conn.call("tasks")["tasks"]}

    assert pid in attached()
    handle.kill()
    with pytest.raises(numaemu.ClusterError, match="actor died"):
        handle.join(10)
    assert wait_until(lambda: pid not in attached(), 15, step=0.2)  # reaped
    assert rcluster.check() == []


def test_a_killed_coordinator_actor_stops_the_cluster(ray_nodes):
    import ray

    c = numaemu.Cluster(numaemu.Topology.symmetric(nodes=2, frames_per_node=256),
                        launcher="ray", ray_address=ray_nodes["address"])
    cid = c.cluster_id
    try:
        task = c.attach(cpu=0)
        ray.kill(ray.get_actor(f"{cid}-coordinator", namespace=NAMESPACE))
        assert wait_until(lambda: c._proc.poll() is not None, 30, step=0.2)
        with pytest.raises(numaemu.ClusterError):
            task.mmap(PS)
    finally:
        c.stop()
    assert cluster_is_gone(cid)
    assert wait_until(lambda: not _actors_of(cid), 10)


def test_a_killed_node_actor_is_a_dead_node_and_teardown_leaves_nothing(ray_nodes):
    import ray

    ids = ray_nodes["ids"]
    # Pinned by the topology: node 0 by label, node 1 by Ray node id.
    topo = numaemu.Topology.symmetric(nodes=2, frames_per_node=512, cpus_per_node=1)
    topo = numaemu.Topology.from_dict({**topo.to_dict(),
                                       "placement": [f"{LABEL[0]}={LABEL[1]}", ids[0]]})
    c = numaemu.Cluster(topo, launcher="ray", ray_address=ray_nodes["address"],
                        data_path="remote")
    cid = c.cluster_id
    try:
        assert c.ray["nodes"]["0"]["node_id"] == ids[-1]
        assert c.ray["nodes"]["1"]["node_id"] == ids[0]
        task = c.attach(cpu=0)
        lost = task.mmap(4 * PS)
        task.mbind(lost.addr, lost.length, numaemu.MPOL_BIND, [1])
        task.write(lost.addr, b"x" * lost.length)
        kept = task.mmap(PS)
        task.write(kept.addr, b"kept")
        ray.kill(ray.get_actor(f"{cid}-node1", namespace=NAMESPACE))
        assert wait_until(lambda: c.offline_nodes() == [1], 30, step=0.2)
        with pytest.raises(numaemu.NumaError) as info:
            task.read(lost.addr, 4)
        assert info.value.errno == errno.EIO
        assert task.read(kept.addr, 4) == b"kept"
        assert wait_until(lambda: "node1 exited" in Path(c.log_path).read_text(), 10)
    finally:
        c.stop()
    assert cluster_is_gone(cid)
    assert not _actors_of(cid)


def test_segments_nobody_maps_are_swept_and_mapped_ones_kept(cluster, tmp_path):
    from nodes.segment import SHM_DIR, cluster_segments
    from numaemu.raylaunch import sweep_orphan_segments

    orphan = os.path.join(SHM_DIR, "numaemu-0rphan00-node0")
    with open(orphan, "wb") as f:
        f.truncate(1 << 16)
    live = cluster_segments(cluster.cluster_id)
    assert live
    old = time.time() - 3600
    for path in [orphan, *live]:
        os.utime(path, (old, old))
    try:
        removed = sweep_orphan_segments()
        assert orphan in removed and not os.path.exists(orphan)
        assert all(os.path.exists(p) for p in live)  # mapped by their nodes
        assert not set(removed) & set(live)
    finally:
        if os.path.exists(orphan):
            os.unlink(orphan)


def test_without_ray_the_launcher_says_how_to_install_it(monkeypatch, capsys):
    from numaemu.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as when not installed
    with pytest.raises(numaemu.ClusterError, match=r"pip install -e '\.\[ray\]'"):
        numaemu.Cluster(launcher="ray")
    assert cli_main(["up", "--ray"]) == 1
    assert "pip install -e '.[ray]'" in capsys.readouterr().err


def test_up_ray_detached_then_down_leaves_nothing_in_the_ray_cluster(ray_nodes):
    from test_cli import numaemu as cli

    up = cli("up", "--ray", ray_nodes["address"], "--detach", "--nodes", "3",
             "--frames-per-node", "256", timeout=120)
    assert up.returncode == 0, up.stderr
    address = up.stdout.strip()
    keys = up.stderr.split("export NUMAEMU_KEYS=")[1].split()[0]
    env = dict(os.environ, NUMAEMU_ADDRESS=address, NUMAEMU_KEYS=keys)
    try:
        with Connection(address, keys=keys) as conn:
            cid = conn.call("info")["cluster_id"]
        assert len(_actors_of(cid)) == 4
        hardware = cli("hardware", env=env)
        assert hardware.returncode == 0 and "available: 3 nodes (0-2)" in hardware.stdout
        # Another process's handle on it spawns clients on its Ray cluster too.
        handle = numaemu.Cluster.connect(address, keys=keys, ray_address=ray_nodes["address"])
        statuses, exact, _, requests = handle.spawn(_write_move_read, 7, [[2], [0]],
                                                    cpu=2).join(60)
        assert statuses == [[2] * 8, [0] * 8] and exact == [True, True]
        handle.stop()
    finally:
        down = cli("down", env=env)
    assert down.returncode == 0, down.stderr
    assert cluster_is_gone(cid)
    assert wait_until(lambda: not _actors_of(cid), 10)


def test_a_vanished_ray_cluster_ends_the_supervisor_and_leaves_nothing(ray_nodes):
    from ray.cluster_utils import Cluster as RayCluster

    doomed = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c = numaemu.Cluster(numaemu.Topology.symmetric(nodes=2, frames_per_node=256),
                            launcher="ray", ray_address=doomed.address)
    except BaseException:
        doomed.shutdown()
        raise
    supervisor = c._proc
    doomed.shutdown()  # every Ray process of it: actors, workers, raylet, GCS
    try:
        assert wait_until(lambda: supervisor.poll() is not None, 30, step=0.2)
    finally:
        c.stop()
    assert cluster_is_gone(c.cluster_id)

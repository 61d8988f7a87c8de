"""tcp:// endpoints, and nodes that join a coordinator by hand (as on another host)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import cluster_is_gone, small_topology
from test_lifecycle import wait_until

import numaemu
from nodes.segment import cluster_segments
from numaemu.rundir import free_port_block


def test_a_cluster_served_over_tcp_works_end_to_end():
    port = free_port_block()
    with numaemu.Cluster(small_topology(frames=256), listen=f"tcp://127.0.0.1:{port}") as c:
        assert c.address == f"tcp://127.0.0.1:{port}"
        t = c.attach(cpu=2)
        m = t.mmap(4 * 4096)
        t.write(m.addr, b"over tcp" * 2048)
        assert t.read(m.addr + 8, 8) == b"over tcp"
        assert t.move_pages(m.pages) == [1, 1, 1, 1]
    assert cluster_is_gone(c.cluster_id)


def test_nodes_started_by_hand_join_a_standalone_coordinator(tmp_path):
    port = free_port_block()
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps(small_topology(frames=128).to_dict()))
    coord = subprocess.Popen([sys.executable, "-m", "coordinator", "--topology", str(topo),
                              "--listen", f"tcp://127.0.0.1:{port}", "--log-level", "WARNING"],
                             stdout=subprocess.PIPE, text=True)
    nodes = []
    ready = {"cluster_id": "none"}
    try:
        ready = json.loads(coord.stdout.readline())
        address, keys = ready["address"], ready["keys"]
        for n in (0, 1):
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "numaemu", "--address", address, "--keys", keys, "node",
                 "--node", str(n), "--log-level", "WARNING"]))
        info = {}

        def registered():
            with numaemu.transport.Connection(address, keys=keys) as conn:
                info.update(conn.call("info"))
            return len(info["segments"]) == 2

        assert wait_until(registered, 30, step=0.2)
        task = numaemu.attach(address, cpu=0, keys=keys)
        m = task.mmap(3 * 4096)
        task.mbind(m.addr, m.length, numaemu.MPOL_INTERLEAVE, [0, 1])
        task.write(m.addr, bytes(range(256)) * 48)
        assert task.read(m.addr + 4096, 4) == bytes([0, 1, 2, 3])
        where = task.move_pages(m.pages)
        assert where in ([0, 1, 0], [1, 0, 1])
        task.close()
        coord.send_signal(signal.SIGTERM)  # tells the nodes to exit before it goes
        assert coord.wait(15) == 0
        for p in nodes:
            assert p.wait(15) == 0
        assert not cluster_segments(ready["cluster_id"])
    finally:
        for p in [coord, *nodes]:
            if p.poll() is None:
                p.kill()
                p.wait()
        for seg in cluster_segments(ready["cluster_id"]):
            os.unlink(seg)


def test_up_waits_for_external_nodes_that_join_by_hand(tmp_path):
    from test_cli import numaemu as cli

    port = free_port_block()
    up = cli("up", "--detach", "--listen", f"tcp://127.0.0.1:{port}", "--nodes", "2",
             "--frames-per-node", "128", "--external-nodes", "1")
    assert up.returncode == 0, up.stderr
    address = up.stdout.strip()
    assert "waits for node(s) 1 to join" in up.stderr
    join = next(line.strip() for line in up.stderr.splitlines() if "node --node 1" in line)
    keys = join.split("--keys ")[1].split()[0]
    env = dict(os.environ, NUMAEMU_ADDRESS=address, NUMAEMU_KEYS=keys)
    info: dict = {}

    def registered() -> list[int]:
        with numaemu.transport.Connection(address, keys=keys) as conn:
            info.update(conn.call("info"))
        return sorted(s["node"] for s in info["segments"])

    node = None
    try:
        assert wait_until(lambda: registered() == [0], 30, step=0.1)
        time.sleep(0.5)
        assert registered() == [0]  # node 1 is not started here: the cluster waits for it
        node = subprocess.Popen([sys.executable, "-m", "numaemu", *join.split()[1:]], env=env)
        assert wait_until(lambda: registered() == [0, 1], 30, step=0.2)
        data = {s["node"]: s["data_endpoint"] for s in info["segments"]}
        assert data[1].startswith("tcp://127.0.0.1:")  # reachable, not 0.0.0.0
        task = numaemu.attach(address, cpu=0, keys=keys, data_path="remote")
        m = task.mmap(2 * 4096)
        task.write(m.addr, b"joined by hand" * 500)
        assert task.move_pages(m.pages, [1, 1]) == [1, 1]
        assert task.read(m.addr, 14 * 500) == b"joined by hand" * 500
        task.close()
    finally:
        down = cli("down", env=env)
        if node is not None:
            try:
                node.wait(15)  # the coordinator told it to exit
            finally:
                if node.poll() is None:
                    node.kill()
                    node.wait()
    assert down.returncode == 0, down.stderr
    assert node.returncode == 0
    cid = info["cluster_id"]
    assert cluster_is_gone(cid)

"""How fast failures are noticed, and how long the coordinator's loop is ever held.

    python benchmarks/failure_detection.py [--rounds 5]

For each round: a fresh 3-node cluster with a task that has pages on every node;
SIGKILL node 1 and time until the coordinator reports it offline (polled through the
public API every 5 ms, so the figure includes one request round trip); SIGSTOP node 2
and time until its lease declares it dead.  Then hostile traffic (hit-and-run
requests, malformed frames, oversized requests) against a healthy cluster, and the
coordinator's own worst event-loop stall (``Cluster.coordinator_stats()``) before and
after, beside the same figure for an idle cluster as the baseline.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

import msgpack
import numpy as np
import zmq

import numaemu
from numaemu import MPOL_BIND
from numaemu import protocol as P
from numaemu.transport import Connection

PS = 4096


def _wait_offline(cluster, node: int, timeout: float = 15.0) -> float:
    start = time.monotonic()
    while node not in cluster.offline_nodes():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"node {node} was not noticed in {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - start


def detection_round() -> tuple[float, float]:
    topo = numaemu.Topology.symmetric(nodes=3, frames_per_node=2048, cpus_per_node=2)
    with numaemu.Cluster(topo) as cluster:
        task = cluster.attach(cpu=0)
        for node in range(3):
            m = task.mmap(8 * PS)
            task.mbind(m.addr, m.length, MPOL_BIND, [node])
            task.write(m.addr, b"x" * m.length)
        children = cluster.processes()["children"]
        os.kill(children[2], signal.SIGKILL)
        killed = _wait_offline(cluster, 1)
        os.kill(children[3], signal.SIGSTOP)
        try:
            hung = _wait_offline(cluster, 2)
        finally:
            try:
                os.kill(children[3], signal.SIGCONT)
            except ProcessLookupError:
                pass
    return killed, hung


def hostile_traffic(cluster) -> None:
    with Connection(cluster.address) as conn:
        endpoints = conn.call("info")["endpoints"]
    ctx = zmq.Context.instance()
    junk = [b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"re": [1], "ok": True}),
            msgpack.packb({"op": "fault", "seq": 1, "pid": 1, "vpns": b"\0" * 7})]
    for _ in range(50):
        for name in ("rpc", "tlb", "nodes"):
            for frames in ([j] for j in junk):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 200)
                sock.connect(endpoints[name])
                sock.send_multipart(frames + [b"extra"])
                sock.close()
    task = cluster.attach(cpu=0)
    m = task.mmap(16 * PS)
    task.write(m.addr, b"y" * m.length)
    over_cap = np.arange(10**5, dtype=P.VPN) + m.addr // PS
    over_size = np.arange(10**7, dtype=P.VPN)
    for _ in range(3):
        try:
            task._sync_call("fault", vpns=over_cap, write=True)
        except numaemu.NumaError:
            pass
        with Connection(cluster.address) as raw:
            try:
                raw.call("fault", pid=task.pid, vpns=over_size, write=True, timeout=10)
            except (numaemu.NumaError, numaemu.ClusterError):
                pass
        try:
            task.read(m.addr, 2**35)
        except numaemu.NumaError:
            pass
    task.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    killed, hung = zip(*(detection_round() for _ in range(args.rounds)))
    print(f"dead node (SIGKILL) noticed in: median {statistics.median(killed) * 1000:.0f} ms, "
          f"max {max(killed) * 1000:.0f} ms over {args.rounds} kills "
          "(includes one numastat round trip of the poll)")
    print(f"hung node (SIGSTOP) declared dead in: median {statistics.median(hung):.2f} s, "
          f"max {max(hung):.2f} s (local-node lease 5 s)")
    with numaemu.Cluster(numaemu.Topology.symmetric(nodes=2, frames_per_node=4096)) as cluster:
        time.sleep(2.0)
        idle = cluster.coordinator_stats()["loop_stall_max_ms"]
        hostile_traffic(cluster)
        stats = cluster.coordinator_stats()
        assert cluster.check() == []
    print(f"worst coordinator loop stall: idle baseline {idle:.1f} ms, after hostile traffic "
          f"{stats['loop_stall_max_ms']:.1f} ms; loop restarts {stats['loop_restarts']}")


if __name__ == "__main__":
    main()

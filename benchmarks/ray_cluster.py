"""What the Ray launcher costs, each figure against the local launcher in the same run.

    python benchmarks/ray_cluster.py [--ray-nodes 3] [--repeat 3] [--json]

On a local Ray cluster of ``--ray-nodes`` Ray nodes (``ray.cluster_utils.Cluster``, the
stand-in for hosts that the tests use), for a 3-node emulated machine:

* start-to-ready of ``Cluster(launcher="ray")`` against ``Cluster()`` (local forks);
* one spawned client, from ``spawn`` to ``join``, as a Ray actor against a forkserver
  process;
* a 4 KiB and a 1 MiB read and write through a node's data service (the remote data path)
  over the Ray cluster's tcp, against the same on a local ipc cluster.

Needs the ``ray`` extra.  The machine is shared: read ratios, and run it more than once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numaemu

PS = 4096


def _noop(task) -> int:
    return task.pid


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _access(cluster: numaemu.Cluster, size: int, repeat: int) -> dict:
    """Best-of-``repeat`` seconds per read and per write of ``size`` bytes on node 1, from
    a task on CPU 0 using the remote data path."""
    task = cluster.attach(cpu=0, data_path="remote")
    try:
        m = task.mmap(size)
        task.mbind(m.addr, m.length, numaemu.MPOL_BIND, [1])
        data = b"r" * size
        task.write(m.addr, data)
        n = max(1, (1 << 22) // size)  # about 4 MiB per timing
        read = _best(lambda: [task.read(m.addr, size) for _ in range(n)], repeat) / n
        write = _best(lambda: [task.write(m.addr, data) for _ in range(n)], repeat) / n
        return {"read_s": read, "write_s": write}
    finally:
        task.close()


def measure(ray_nodes: int, repeat: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    topo = numaemu.Topology.symmetric(nodes=3, frames_per_node=4096, cpus_per_node=2)
    t0 = time.perf_counter()
    rc = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(ray_nodes - 1):
        rc.add_node(num_cpus=1)
    rc.wait_for_nodes()
    ray.init(address=rc.address, log_to_driver=False)
    out: dict = {"ray_cluster_start_s": time.perf_counter() - t0}
    try:
        for launcher in ("local", "ray"):
            starts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                c = numaemu.Cluster(topo, launcher=launcher, ray_address=rc.address)
                starts.append(time.perf_counter() - t0)
                c.stop()
            with numaemu.Cluster(topo, launcher=launcher, ray_address=rc.address) as c:
                spawn = _best(lambda c=c: c.spawn(_noop, cpu=2).join(60), repeat)
                access = {size: _access(c, size, repeat) for size in (PS, 1 << 20)}
            out[launcher] = {"start_s": statistics.median(starts), "spawn_join_s": spawn,
                             "access": access}
    finally:
        ray.shutdown()
        rc.shutdown()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray-nodes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return 1
    r = measure(args.ray_nodes, args.repeat)
    if args.json:
        print(json.dumps(r))
        return 0
    local, onray = r["local"], r["ray"]
    print(f"Ray cluster of {args.ray_nodes} Ray nodes started in {r['ray_cluster_start_s']:.1f} s")
    print(f"{'figure':<28} {'ray launcher':>13} {'local':>10} {'ratio':>7}")
    rows = [("cluster start-to-ready (s)", onray["start_s"], local["start_s"]),
            ("spawn + join a client (s)", onray["spawn_join_s"], local["spawn_join_s"])]
    for size, label in ((PS, "4 KiB"), (1 << 20, "1 MiB")):
        for op in ("read", "write"):
            rows.append((f"remote {label} {op} (ms)", onray["access"][size][f"{op}_s"] * 1e3,
                         local["access"][size][f"{op}_s"] * 1e3))
    for label, a, b in rows:
        print(f"{label:<28} {a:>13.3f} {b:>10.3f} {a / b:>7.2f}")
    print("remote reads and writes: the ray launcher's cluster serves on tcp with CURVE, "
          "the local one on ipc")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

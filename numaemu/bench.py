"""``numaemu bench``: what the emulator costs, against baselines measured in the same run.

* ``startup``: time to start (and stop) a 4-node cluster, next to a Python process that
  imports what the cluster's processes import;
* ``fault``: first-touch fault cost per page, for a lone page and batches of 256 and 4096,
  next to the same first write into fresh anonymous memory;
* ``access``: TLB-hit ``read``/``write`` of 8 bytes and of 1 MiB, each next to plain
  numpy access to the same shared memory;
* ``migrate``: numactl's migspeed, next to a numpy copy between the node segments;
* ``latency``: the idle latency matrix (numaemu/bench_latency.py);
* ``placement``: every placement policy on one misplaced workload (bench_placement.py);
* ``array``: array views against numpy on the same frames (bench_array.py);
* ``scale``: per-page migration and fault costs against batch size (bench_scale.py);
* ``ping``: a request round trip against bare zmq (bench_ping.py);
* ``remote``: the remote data path's 4 KiB and 1 MiB accesses against bare zmq
  (bench_remote.py);
* ``memory``: coordinator bytes per page, client memory after munmap (bench_memory.py);
* ``all``: the quick ones (startup, fault, access, migrate, latency, array, ping).

Every figure is a median over repetitions; ratios are taken per repetition, so a
noisy neighbour slows both sides of a pair.  Output: bench_report.py.  Nothing here is
asserted in tests.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import numpy as np

from .cluster import Cluster
from .topology import Topology


def _median(xs) -> float:
    return float(statistics.median(xs))


def bench_startup(repeat: int) -> dict:
    topo = Topology.symmetric(nodes=4, frames_per_node=16384, cpus_per_node=1)
    starts, stops, py_starts, py_stops = [], [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        cluster = Cluster(topo)
        t1 = time.perf_counter()
        cluster.stop()
        t2 = time.perf_counter()
        starts.append(t1 - t0)
        stops.append(t2 - t1)
        start, stop = _python_start_stop()
        py_starts.append(start)
        py_stops.append(stop)
    return {"nodes": 4, "frames_per_node": 16384, "start_s": _median(starts),
            "stop_s": _median(stops), "python_start_s": _median(py_starts),
            "python_stop_s": _median(py_stops)}


def _python_start_stop() -> tuple[float, float]:
    """Seconds to start a Python process that imports numpy, zmq and msgpack (as every
    process of a cluster does) until it says it is up, and to stop it."""
    code = "import numpy, zmq, msgpack, sys; print('up', flush=True); sys.stdin.read()"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    t1 = time.perf_counter()
    proc.stdin.close()
    proc.wait()
    t2 = time.perf_counter()
    proc.stdout.close()
    return t1 - t0, t2 - t1


def bench_fault(cluster: Cluster, repeat: int, pages: int | None) -> dict:
    task = cluster.attach(cpu=0)
    ps = task.page_size
    out = {}
    try:
        single, single_raw = [], []
        for _ in range(max(50, repeat * 20)):
            m = task.mmap(ps)
            t0 = time.perf_counter()
            task.write(m.addr, b"\1")
            single.append(time.perf_counter() - t0)
            task.munmap(m.addr, m.length)
            single_raw.append(_raw_first_touch(b"\1"))
        out["single_page_us"] = _median(single) * 1e6
        out["single_page_raw_us"] = _median(single_raw) * 1e6
        for batch in (256, pages or 4096):
            per_page, raw = [], []
            data = bytes(batch * ps)
            for _ in range(repeat):
                m = task.mmap(batch * ps)
                t0 = time.perf_counter()
                task.write(m.addr, data)
                per_page.append((time.perf_counter() - t0) / batch)
                task.munmap(m.addr, m.length)
                raw.append(_raw_first_touch(data) / batch)
            out[f"batch_{batch}_us_per_page"] = _median(per_page) * 1e6
            # Baseline: the same first write into fresh anonymous memory of this process,
            # page faults by the real kernel included.
            out[f"batch_{batch}_raw_us_per_page"] = _median(raw) * 1e6
    finally:
        task.close()
    return out


def _raw_first_touch(data: bytes) -> float:
    """Seconds for a first write of ``data`` into a fresh anonymous mapping."""
    import mmap

    region = mmap.mmap(-1, len(data))
    try:
        t0 = time.perf_counter()
        region[:] = data
        return time.perf_counter() - t0
    finally:
        region.close()


def bench_access(cluster: Cluster, repeat: int) -> dict:
    task = cluster.attach(cpu=0)
    ps = task.page_size
    try:
        big = 1 << 20
        m = task.mmap(big + ps)
        task.write(m.addr, bytes(big + ps))  # fault everything in: later accesses hit the TLB
        seg = task._segments[task.node]
        raw = np.frombuffer(seg.map, dtype=np.uint8)
        first = task.move_pages([m.addr])[0]
        assert first == task.node
        # The raw baseline reads the frame that backs m.addr, found through the TLB entry.
        base_off = _frame_offset(task, m.addr)
        eight = b"\x07" * 8
        eight_np = np.frombuffer(eight, dtype=np.uint8)
        n = 20000
        rows = {"read8": [], "write8": [], "read1m": [], "write1m": []}
        base = {"read8": [], "write8": [], "read1m": [], "write1m": []}
        read, write = task.read, task.write
        payload = bytes(range(256)) * (big // 256)
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(n):
                raw[base_off : base_off + 8].tobytes()
            base["read8"].append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for _ in range(n):
                read(m.addr, 8)
            rows["read8"].append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for _ in range(n):
                raw[base_off : base_off + 8] = eight_np
            base["write8"].append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for _ in range(n):
                write(m.addr, eight)
            rows["write8"].append((time.perf_counter() - t0) / n)
            k = 50
            t0 = time.perf_counter()
            for _ in range(k):
                raw[base_off : base_off + big].tobytes()
            base["read1m"].append((time.perf_counter() - t0) / k)
            t0 = time.perf_counter()
            for _ in range(k):
                read(m.addr, big)
            rows["read1m"].append((time.perf_counter() - t0) / k)
            src = np.frombuffer(payload, dtype=np.uint8)
            t0 = time.perf_counter()
            for _ in range(k):
                raw[base_off : base_off + big] = src
            base["write1m"].append((time.perf_counter() - t0) / k)
            t0 = time.perf_counter()
            for _ in range(k):
                write(m.addr, payload)
            rows["write1m"].append((time.perf_counter() - t0) / k)
        out = {}
        for key in rows:
            ours = _median(rows[key])
            ref = _median(base[key])
            ratios = [r / b for r, b in zip(rows[key], base[key])]
            unit = 1e9 if key.endswith("8") else 1e6
            suffix = "ns" if key.endswith("8") else "us"
            out[f"{key}_{suffix}"] = ours * unit
            out[f"{key}_numpy_{suffix}"] = ref * unit
            out[f"{key}_slowdown"] = _median(ratios)
        out["read1m_fraction_of_raw"] = 1 / out["read1m_slowdown"]
        out["write1m_fraction_of_raw"] = 1 / out["write1m_slowdown"]
        return out
    finally:
        task.close()


def _frame_offset(task, addr: int) -> int:
    """Byte offset in its node segment of the frame that backs ``addr`` (via the TLB)."""
    i = (addr >> task._shift) - task._base_vpn
    view = task._rtlb[i]
    seg_view = task._views[task._tnode[i]]
    return _address_of(view) - _address_of(seg_view)


def frame_offsets(task, addrs) -> tuple[int, np.ndarray]:
    """The node and the byte offsets in its segment of the frames that back ``addrs``
    (mapped pages, all on one node), read from the task's TLB."""
    nodes = {task._tnode[(a >> task._shift) - task._base_vpn] for a in addrs}
    if len(nodes) != 1:
        raise RuntimeError(f"the pages are on nodes {sorted(nodes)}, not on one node")
    return nodes.pop(), np.array([_frame_offset(task, a) for a in addrs], dtype=np.int64)


def _address_of(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]


def bench_migrate(pages: int, repeat: int, batch: int | None = None) -> dict:
    """numactl's migspeed idea: fault ``pages`` on node 0, move them with one call, MB/s;
    next to a plain copy of the same bytes between two of the cluster's segments."""
    from .constants import MPOL_BIND, MPOL_MF_MOVE

    topo = Topology.symmetric(nodes=2, frames_per_node=2 * pages + 2048, cpus_per_node=1)
    with Cluster(topo) as cluster:
        task = cluster.attach(cpu=0, privileged=True)
        ps = task.page_size
        if batch:
            task.sysctl("migrate_batch", batch)
        runs, memcpy_runs, single = [], [], []
        for _ in range(repeat):
            m = task.mmap(pages * ps)
            task.mbind(m.addr, m.length, MPOL_BIND, [0])
            task.write(m.addr, bytes(range(256)) * (m.length // 256))
            t0 = time.perf_counter()
            task.mbind(m.addr, m.length, MPOL_BIND, [1], MPOL_MF_MOVE)
            runs.append(time.perf_counter() - t0)
            where = task.move_pages([m.addr, m.page(pages - 1)])
            assert list(where) == [1, 1], f"pages did not move: {where}"
            memcpy_runs.append(_memcpy_between_segments(task, pages))
            task.munmap(m.addr, m.length)
            one = task.mmap(ps)
            task.write(one.addr, b"1")
            for k in range(20):
                t0 = time.perf_counter()
                task.move_pages([one.addr], [(k + 1) % 2], MPOL_MF_MOVE)
                single.append(time.perf_counter() - t0)
            task.munmap(one.addr, ps)
        moved = pages * ps
        seconds = _median(runs)
        gbps = moved / seconds / 1e9
        memcpy = moved / _median(memcpy_runs) / 1e9
        ratios = [(moved / r) / (moved / c) for r, c in zip(runs, memcpy_runs)]
        return {"pages": pages, "bytes": moved, "seconds": seconds, "gb_per_s": gbps,
                "memcpy_gb_per_s": memcpy, "ratio": _median(ratios),
                "memcpy_seconds": _median(memcpy_runs),
                "batch": task.sysctl("migrate_batch"),
                "single_page_move_ms": _median(single) * 1e3}


def _memcpy_between_segments(task, pages: int) -> float:
    """Time one plain copy of ``pages`` frames from node 1's segment into a run of free frames
    of node 0's (nothing reads free frames, and a node zeroes the frames it hands out)."""
    src = task._segments[1].array
    dst = task._segments[0].array
    free = _free_run(task, 0, pages)
    t0 = time.perf_counter()
    np.copyto(dst[free : free + pages], src[:pages])
    return time.perf_counter() - t0


def _free_run(task, node: int, pages: int) -> int:
    """First frame of a run of ``pages`` frames that are free on ``node``."""
    reply = task._sync_call("node_free_map", node=node)
    bits = np.unpackbits(np.frombuffer(reply["bits"], dtype=np.uint8)).astype(np.int64)
    # Free frames in each window of ``pages`` frames, from a running sum: linear time, so
    # that a sweep up to a million frames does not wait on a convolution.
    total = np.concatenate(([0], np.cumsum(bits)))
    starts = np.flatnonzero(total[pages:] - total[:-pages] == pages)
    if len(starts) == 0:
        raise RuntimeError(f"node {node} has no run of {pages} free frames")
    return int(starts[0])


#: What ``numaemu bench all`` runs: everything that takes seconds, not minutes or GiB.
QUICK = ("startup", "fault", "access", "migrate", "latency", "array", "ping")
#: ``numaemu bench migrate --json`` prints exactly these (and "bench"): a contract (API.md).
MIGRATE_JSON = ("pages", "bytes", "seconds", "gb_per_s", "memcpy_gb_per_s", "ratio")
PLOTS = {"placement": "numaemu-placement.png", "scale": "numaemu-scale.png"}


def run_bench(what: str, *, json_out: bool = False, pages: int | None = None,
              repeat: int = 5, batch: int | None = None, topology: Topology | None = None,
              dilation: float | None = None, steps: int | None = None,
              seconds: float | None = None, plot: str | None = None,
              cycles: int | None = None, transport: str = "ipc") -> int:
    """Run benchmark ``what`` (or the quick ones, for "all") and print each as it ends:
    a table, or with ``json_out`` one JSON line per benchmark.  ``pages`` is each one's
    size knob, ``plot`` the PNG of placement and scale (None: the default, "": none),
    ``transport`` the remote bench's ("ipc", or "tcp" with CURVE on both sides)."""
    from .bench_report import TEXT, json_line

    for name in QUICK if what == "all" else (what,):
        figures = _measure(name, all_=what == "all", pages=pages, repeat=repeat, batch=batch,
                           topology=topology, dilation=dilation, steps=steps,
                           seconds=seconds, cycles=cycles, transport=transport,
                           plot=PLOTS.get(name) if plot is None else plot or None)
        if json_out:
            if name == "migrate":
                figures = {k: figures[k] for k in MIGRATE_JSON}
            print(json_line(name, figures), flush=True)
        else:
            print(_text(name, figures, TEXT), end="", flush=True)
    return 0


def _measure(name: str, *, all_: bool, pages, repeat, batch, topology, dilation, steps,
             seconds, cycles, plot, transport="ipc") -> dict:
    if name == "startup":
        return bench_startup(repeat)
    if name in ("fault", "access"):
        topo = Topology.symmetric(nodes=2, frames_per_node=max(16384, 2 * (pages or 0)),
                                  cpus_per_node=1)
        with Cluster(topo) as cluster:
            if name == "fault":
                return bench_fault(cluster, repeat, pages)
            return bench_access(cluster, repeat)
    if name == "migrate":
        from .bench_ping import zmq_round_trip_s

        figures = bench_migrate(pages or 16384, repeat, batch)
        figures["zmq_round_trip_ms"] = zmq_round_trip_s() * 1e3
        return figures
    if name == "latency":
        from .bench_latency import bench_latency

        # In "all", --pages sizes the others: the latency buffers keep their default.
        return bench_latency(topology, repeat=repeat, dilation=dilation,
                             steps=steps or 20000, pages=256 if all_ else pages or 256)
    if name == "placement":
        from .bench_placement import bench_placement
        from .bench_placement import plot as draw

        results = bench_placement(seconds=seconds or 6.0)
        return {"policies": results, "plot": draw(results, plot) if plot else None}
    if name == "array":
        from .bench_array import bench_array

        return bench_array(pages or 2048, repeat)
    if name == "scale":
        from .bench_scale import bench_scale
        from .bench_scale import plot as draw

        figures = bench_scale(pages, repeat)
        figures["plot"] = draw(figures, plot) if plot else None
        return figures
    if name == "ping":
        from .bench_ping import bench_ping

        return bench_ping(repeat, steps or 2000)
    if name == "remote":
        from .bench_remote import bench_remote

        return bench_remote(repeat, steps or 1000, transport)
    if name == "memory":
        from .bench_memory import bench_memory

        return bench_memory(pages or 1 << 20, cycles or 10)
    raise ValueError(f"no benchmark {name!r}")


def _text(name: str, figures: dict, text: dict) -> str:
    if name == "latency":
        from .bench_latency import latency_text

        return latency_text(figures)
    if name == "placement":
        from .bench_placement import placement_text

        plot = f"plot: {figures['plot']}\n" if figures["plot"] else ""
        return placement_text(figures["policies"]) + plot
    if name == "scale":
        from .bench_scale import scale_text

        return scale_text(figures)
    if name == "memory":
        from .bench_memory import memory_text

        return memory_text(figures)
    if name == "remote":
        from .bench_remote import remote_text

        return remote_text(figures)
    return text[name](figures)

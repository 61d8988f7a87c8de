"""``numaemu bench remote``: the remote data path (numaemu/remote.py) against bare zmq.

A task of a 2-node cluster with ``data_path="remote"`` reads and writes a buffer on node 1
through that node's data service; beside it, in the same run, the same sizes go through a
bare DEALER to a ROUTER in a process of its own, over the same transport (``ipc://`` on
this machine):

* ``read4k``: ``task.read`` of one 4 KiB page (one ``read_frames`` round trip), timed one
  by one, next to a small request answered with 4 KiB;
* ``read1m`` / ``write1m``: ``task.read``/``task.write`` of 1 MiB (256 consecutive frames,
  one request), next to a small request answered with 1 MiB / 1 MiB answered with a small
  reply.  Reported as GB/s; the ratio is emulated / bare.

Each figure is the median over the round trips of a run, then over runs; ratios are the
median of per-run ratios.  Targets (issue 10): 4 KiB within 2x, 1 MiB at least 50%.
"""

from __future__ import annotations

import statistics
import time

import zmq

from .bench_ping import EchoServer
from .bench_report import Line, Target, table
from .cluster import Cluster
from .constants import MPOL_BIND
from .keys import Keys
from .topology import Topology

MIB = 1 << 20


def serve_frames(endpoint: str, keys: str | None = None) -> None:
    """A ROUTER answering ``R<size>`` with ``size`` bytes and anything else (a write) with
    ``ok``, until a message says ``stop``; with ``keys``, a CURVE server of those keys (as
    every tcp endpoint of a cluster is).  Prints ``ready ENDPOINT`` once bound."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    auth = None
    if keys is not None:
        curve = Keys.load(keys)
        auth = curve.authenticator(ctx)
        curve.server(sock)
    sock.bind(endpoint)
    blobs: dict[int, bytes] = {}
    print("ready", sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    try:
        while True:
            ident, msg = sock.recv_multipart(copy=False)
            raw = msg.bytes if len(msg) < 64 else b""
            if raw == b"stop":
                sock.send_multipart([ident, b"stop"])
                return
            if raw.startswith(b"R"):
                size = int(raw[1:])
                blob = blobs.setdefault(size, bytes(size))
                sock.send_multipart([ident, blob], copy=size < 65536)
            else:
                sock.send_multipart([ident, b"ok"])
    finally:
        sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()


class FrameServer(EchoServer):
    """``serve_frames`` in a fresh Python process, with a DEALER connected to it."""

    def __init__(self, keys: str | None = None) -> None:
        super().__init__("numaemu.bench_remote:serve_frames", keys)

    def reads(self, n: int, size: int) -> list[float]:
        """Seconds of each of ``n`` requests answered with ``size`` bytes."""
        send, recv, clock = self._sock.send, self._sock.recv, time.perf_counter
        ask = b"R%d" % size
        out = []
        for _ in range(n):
            t0 = clock()
            send(ask)
            recv(copy=False)
            out.append(clock() - t0)
        return out

    def writes(self, n: int, data: bytes) -> list[float]:
        """Seconds of each of ``n`` sends of ``data`` answered with a small reply."""
        send, recv, clock = self._sock.send, self._sock.recv, time.perf_counter
        out = []
        for _ in range(n):
            t0 = clock()
            send(data, copy=False)
            recv()
            out.append(clock() - t0)
        return out


def _timed(n: int, fn) -> list[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def bench_remote(repeat: int = 5, count: int = 1000, transport: str = "ipc") -> dict:
    """The remote data path's 4 KiB and 1 MiB costs next to bare zmq ones, over ``transport``
    ("ipc", or "tcp": loopback, with CURVE on the cluster and the baseline alike)."""
    if repeat < 1 or count < 1:
        raise ValueError("repeat and count must be at least 1")
    if transport not in ("ipc", "tcp"):
        raise ValueError(f"transport must be ipc or tcp, not {transport!r}")
    big = max(1, count // 20)  # 1 MiB transfers per run
    topo = Topology.symmetric(nodes=2, frames_per_node=1024, cpus_per_node=1)
    runs: dict[str, list[float]] = {k: [] for k in ("read4k", "zmq4k", "read1m", "zmq_read1m",
                                                    "write1m", "zmq_write1m")}
    ratios: dict[str, list[float]] = {"read4k": [], "read1m": [], "write1m": []}
    data = bytes(range(256)) * (MIB // 256)
    listen = None
    if transport == "tcp":
        from .rundir import free_port_block

        listen = f"tcp://127.0.0.1:{free_port_block()}"
    with Cluster(topo, data_path="remote", listen=listen) as cluster, \
            FrameServer(cluster.keys) as bare:
        task = cluster.attach(cpu=0, inject=None)
        try:
            m = task.mmap(MIB)
            task.mbind(m.addr, m.length, MPOL_BIND, [1])
            task.write(m.addr, data)  # faults in: the timed accesses are TLB hits
            addr = m.addr
            bare.reads(50, 4096)  # connect and warm up both paths
            bare.reads(3, MIB)
            bare.writes(3, data)
            _timed(50, lambda: task.read(addr, 4096))
            for _ in range(repeat):
                got = {
                    "read4k": _timed(count, lambda: task.read(addr, 4096)),
                    "zmq4k": bare.reads(count, 4096),
                    "read1m": _timed(big, lambda: task.read(addr, MIB)),
                    "zmq_read1m": bare.reads(big, MIB),
                    "write1m": _timed(big, lambda: task.write(addr, data)),
                    "zmq_write1m": bare.writes(big, data),
                }
                med = {k: statistics.median(v) for k, v in got.items()}
                for k, v in med.items():
                    runs[k].append(v)
                ratios["read4k"].append(med["read4k"] / med["zmq4k"])
                ratios["read1m"].append(med["zmq_read1m"] / med["read1m"])
                ratios["write1m"].append(med["zmq_write1m"] / med["write1m"])
            stats = task.stats()
        finally:
            task.close()

    def gbs(key: str) -> float:
        return MIB / statistics.median(runs[key]) / 1e9

    return {"count": count, "repeat": repeat, "transport": transport,
            "read4k_ms": statistics.median(runs["read4k"]) * 1e3,
            "zmq4k_ms": statistics.median(runs["zmq4k"]) * 1e3,
            "read4k_slowdown": statistics.median(ratios["read4k"]),
            "read1m_gb_s": gbs("read1m"), "zmq_read1m_gb_s": gbs("zmq_read1m"),
            "read1m_ratio": statistics.median(ratios["read1m"]),
            "write1m_gb_s": gbs("write1m"), "zmq_write1m_gb_s": gbs("zmq_write1m"),
            "write1m_ratio": statistics.median(ratios["write1m"]),
            "data_requests": stats["data_requests"]}


def remote_text(f: dict) -> str:
    return table(f"[remote] the remote data path over {f['transport']}://, median of "
                 f"{f['count']} (4 KiB) x {f['repeat']}; baseline: bare zmq DEALER/ROUTER "
                 "of the same size", f, [
                     Line("4 KiB read (ms)", "read4k_ms", "zmq4k_ms", "read4k_slowdown",
                          Target("<=", 2.0, "ratio")),
                     Line("1 MiB read (GB/s)", "read1m_gb_s", "zmq_read1m_gb_s", "read1m_ratio",
                          Target(">=", 0.5, "ratio")),
                     Line("1 MiB write (GB/s)", "write1m_gb_s", "zmq_write1m_gb_s",
                          "write1m_ratio", Target(">=", 0.5, "ratio"))])

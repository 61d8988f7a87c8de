"""``numaemu bench ping``: the cost of one request to the coordinator.

Three round trips, timed one by one, in the same run:

* ``ping``: a ``ping`` request on a ``Connection`` (numaemu/transport.py), the path every
  syscall takes (msgpack, schema check, the coordinator's event loop, the reply, the
  client's poller with its disconnect monitor);
* ``syscall``: the cheapest real syscall of a task, ``task.get_mempolicy()``;
* baseline ``zmq``: the same request bytes through a bare DEALER to a ROUTER that echoes
  them (ZeroMQ guide: request-reply through ROUTER and DEALER, the product's pattern), in
  a process of its own, over ``ipc://`` on the same machine.

Each figure is the median of the single round trips of a run, then the median over
runs; the slowdown is the median of the per-run ratios.  Nothing here is asserted in
tests.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

from . import protocol as P
from .cluster import Cluster
from .keys import Keys
from .topology import Topology
from .transport import Connection


def serve_echo(endpoint: str) -> None:
    """A ROUTER that sends every message back to its sender, until one says ``stop``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    try:
        while True:
            frames = sock.recv_multipart()
            sock.send_multipart(frames)
            if frames[-1] == b"stop":
                return
    finally:
        sock.close(0)
        ctx.term()


class EchoServer:
    """A bare ROUTER server (``serve``: ``module:function`` taking its endpoint; by default
    ``serve_echo``) in a fresh Python process (no zmq state inherited from this one), with a
    DEALER connected to it: ``round_trips(n)`` times ``n`` echoes one by one.  The baseline
    server of every benchmark that compares against bare zmq."""

    def __init__(self, serve: str = "numaemu.bench_ping:serve_echo",
                 keys: str | None = None) -> None:
        """``keys``: a cluster's key directory; the server then listens on loopback tcp
        as a CURVE server with those keys, and this side connects as their client: the
        link a tcp cluster's peers use."""
        self._dir = tempfile.mkdtemp(prefix="numaemu-bench-")
        self.endpoint = f"ipc://{self._dir}/bare.sock" if keys is None else \
            "tcp://127.0.0.1:*"
        module, function = serve.split(":")
        extra = "" if keys is None else f", keys={keys!r}"
        code = f"from {module} import {function}; {function}({self.endpoint!r}{extra})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, text=True)
        self._ctx = self._sock = None
        try:
            ready = self._proc.stdout.readline().split()
            if not ready or ready[0] != "ready":
                raise RuntimeError(f"the bare server {serve} exited with {self._proc.wait()}")
            self.endpoint = ready[1] if len(ready) > 1 else self.endpoint
            self._ctx = zmq.Context()
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                Keys.load(keys).client(self._sock)
            self._sock.connect(self.endpoint)
        except BaseException:
            self.close()
            raise

    def round_trips(self, n: int, payload: bytes) -> list[float]:
        """Seconds of each of ``n`` request-reply round trips of ``payload``."""
        send, recv, clock = self._sock.send, self._sock.recv, time.perf_counter
        out = []
        for _ in range(n):
            t0 = clock()
            send(payload)
            recv()
            out.append(clock() - t0)
        return out

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.send(b"stop")
                self._sock.poll(2000)
            finally:
                self._sock.close(0)
                self._ctx.term()
                self._sock = None
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def zmq_round_trip_s(count: int = 500) -> float:
    """Median seconds of a bare DEALER/ROUTER round trip over ipc:// on this machine."""
    with EchoServer() as echo:
        payload = P.encode_request(P.Ping(), 1)
        echo.round_trips(50, payload)  # connect and warm up
        return statistics.median(echo.round_trips(count, payload))


def bench_ping(repeat: int = 5, count: int = 2000) -> dict:
    """Round trips to the coordinator of a 2-node cluster next to bare zmq ones."""
    if repeat < 1 or count < 1:
        raise ValueError("repeat and count must be at least 1")
    payload = P.encode_request(P.Ping(), 1)
    topo = Topology.symmetric(nodes=2, frames_per_node=1024, cpus_per_node=1)
    pings, syscalls, bare, ratios = [], [], [], []
    all_pings, all_bare = [], []
    with EchoServer() as echo, Cluster(topo) as cluster:
        task = cluster.attach(cpu=0)
        conn = Connection(cluster.address, keys=cluster.keys)
        try:
            clock = time.perf_counter
            for _ in range(50):  # connect and warm up both paths
                conn.call("ping")
            echo.round_trips(50, payload)
            for k in range(repeat):
                runs = {}
                # Alternate which goes first, so that a slow drift does not favour one.
                for which in (("ping", "zmq") if k % 2 == 0 else ("zmq", "ping")):
                    if which == "zmq":
                        runs[which] = echo.round_trips(count, payload)
                        continue
                    out = []
                    for _ in range(count):
                        t0 = clock()
                        conn.call("ping")
                        out.append(clock() - t0)
                    runs[which] = out
                out = []
                for _ in range(max(1, count // 4)):
                    t0 = clock()
                    task.get_mempolicy()
                    out.append(clock() - t0)
                p, z = statistics.median(runs["ping"]), statistics.median(runs["zmq"])
                pings.append(p)
                bare.append(z)
                ratios.append(p / z)
                syscalls.append(statistics.median(out))
                all_pings += runs["ping"]
                all_bare += runs["zmq"]
        finally:
            conn.close()
            task.close()
    return {"count": count, "repeat": repeat,
            "ping_ms": statistics.median(pings) * 1e3,
            "zmq_ms": statistics.median(bare) * 1e3,
            "ping_slowdown": statistics.median(ratios),
            "ping_p99_ms": _percentile(all_pings, 99) * 1e3,
            "zmq_p99_ms": _percentile(all_bare, 99) * 1e3,
            "syscall_ms": statistics.median(syscalls) * 1e3,
            "syscall_slowdown": statistics.median(syscalls) / statistics.median(bare)}


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q / 100))]


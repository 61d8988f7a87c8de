"""The latency model: what an access costs, by CPU node and memory node.

``latency_ns[i][j]`` is the load-to-use latency of one page touched from a CPU of
node i on memory of node j; ``bandwidth_gbps[i][j]`` the streaming bandwidth.
Defaults follow the SLIT distances: local 80 ns scaled by distance/10, and a
local 20 GB/s divided by the same ratio.  A topology may give both matrices.

A task charges its virtual clock ``latency(i, j)`` per page an access touches
plus ``bytes / bandwidth(i, j)``; the clock is deterministic and noise-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from .topology import Topology

LOCAL_NS = 80.0
LOCAL_GBPS = 20.0


class LatencyModel:
    """Per-(CPU node, memory node) latency and bandwidth."""

    def __init__(self, topology: Topology) -> None:
        d = topology.distances
        n = topology.num_nodes
        if topology.latency_ns is not None:
            self.latency_ns = [[float(x) for x in row] for row in topology.latency_ns]
        else:
            self.latency_ns = [[LOCAL_NS * d[i][j] / 10 for j in range(n)] for i in range(n)]
        if topology.bandwidth_gbps is not None:
            self.bandwidth_gbps = [[float(x) for x in row] for row in topology.bandwidth_gbps]
        else:
            self.bandwidth_gbps = [[LOCAL_GBPS * 10 / d[i][j] for j in range(n)]
                                   for i in range(n)]

    def cost_ns(self, cpu_node: int, pages: Sequence[int], nbytes: Sequence[int]) -> float:
        """Virtual time of touching ``pages[j]`` pages and ``nbytes[j]`` bytes on each node j."""
        lat = self.latency_ns[cpu_node]
        bw = self.bandwidth_gbps[cpu_node]  # GB/s is bytes per ns
        return sum(p * lat[j] + b / bw[j] for j, (p, b) in enumerate(zip(pages, nbytes)))

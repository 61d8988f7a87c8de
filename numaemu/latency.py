"""The latency model: what an access costs, by CPU node and memory node.

``latency_ns[i][j]`` is the load-to-use latency of one page touched from a CPU of
node i on memory of node j; ``bandwidth_gbps[i][j]`` the streaming bandwidth.
Defaults follow the SLIT distances: local 80 ns scaled by distance/10, and a
local 20 GB/s divided by the same ratio.  A topology may give both matrices.

A task charges its virtual clock ``latency(i, j)`` per page an access touches
plus ``bytes / bandwidth(i, j)``; the clock is deterministic and noise-free.
Faults and waits on pages under migration are charged too, with their own
modeled costs (``FAULT_BASE_NS`` + ``FAULT_PAGE_NS`` per page, ``MIGRATION_WAIT_NS``
per wait): the kernel's anonymous fault costs about a microsecond plus zeroing,
and migrating a page takes some microseconds.

Delay injection (``Pacer``) makes wall-clock time show the model: each access
adds its modeled cost times a dilation factor to a debt, and once the debt
reaches ``CHUNK_NS`` the task spins until an absolute deadline.  Python's own
overhead per access is then absorbed instead of added, as long as the dilated
cost of an access exceeds that overhead (reference/python-ipc-measurements.md
section 8: single busy-waits below ~10 us are not accurate; deadline pacing in
20 us chunks is accurate to < 0.1 % in aggregate).  docs/latency.md has the
measured precision and how the default dilation was chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter_ns

from .topology import Topology

LOCAL_NS = 80.0
LOCAL_GBPS = 20.0
FAULT_BASE_NS = 1000.0
FAULT_PAGE_NS = 250.0
MIGRATION_WAIT_NS = 10000.0
#: Injected delay is paid in chunks of at least this much (a single spin is only accurate
#: to ~0.1-0.3 us, and reading the clock costs ~90 ns).
CHUNK_NS = 20000
#: A task idle for longer than this gets no credit for the time it did not use.  Longer than
#: a scheduler time slice, so that a preempted task's lost time is not charged as latency
#: (measured: 1 ms gave 0.7 % error at dilation 50 beside one busy process, 10 ms 0.04 %).
SLACK_NS = 10_000_000
#: Wall-clock ns injected per modeled ns, unless a cluster or task says otherwise.
DEFAULT_DILATION = 50.0


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

    def row(self, cpu_node: int) -> tuple[list[float], list[float]]:
        """(latency ns, ns per byte) to every memory node from a CPU of ``cpu_node``."""
        return (list(self.latency_ns[cpu_node]),
                [1.0 / bw for bw in self.bandwidth_gbps[cpu_node]])

    @staticmethod
    def fault_ns(pages: int) -> float:
        """Modeled cost of one fault that resolves ``pages`` pages."""
        return FAULT_BASE_NS + FAULT_PAGE_NS * pages

    def cost_ns(self, cpu_node: int, pages: Sequence[int], nbytes: Sequence[int]) -> float:
        """Virtual time of touching ``pages[j]`` pages and ``nbytes[j]`` bytes on each node j."""
        lat = self.latency_ns[cpu_node]
        bw = self.bandwidth_gbps[cpu_node]  # GB/s is bytes per ns
        return sum(p * lat[j] + b / bw[j] for j, (p, b) in enumerate(zip(pages, nbytes)))


class Pacer:
    """Injects modeled delay in real time: debt in ns, paid by spinning to a deadline."""

    def __init__(self, dilation: float) -> None:
        if not dilation > 0:
            raise ValueError("dilation must be positive")
        self.dilation = float(dilation)
        self.debt = 0.0
        self.deadline = 0
        self.injected_ns = 0.0

    def pay(self, cost_ns: float) -> None:
        """Owe ``cost_ns`` modeled ns; spin once the dilated debt reaches a chunk."""
        debt = self.debt + cost_ns * self.dilation
        if debt < CHUNK_NS:
            self.debt = debt
            return
        self.debt = 0.0
        self.injected_ns += debt
        now = perf_counter_ns()
        deadline = self.deadline
        if deadline < now - SLACK_NS:
            deadline = now
        deadline += int(debt)
        self.deadline = deadline
        while perf_counter_ns() < deadline:
            pass

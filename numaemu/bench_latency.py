"""``numaemu bench latency``: an idle latency matrix in the manner of Intel MLC.

For each node with CPUs (rows) and each node with memory (columns), one task on a CPU
of the row node chases pointers through a buffer bound to the column node: every page
of the buffer holds, at one random 8-byte slot, the address of the next element of a
random cycle over the pages, so each dependent ``read`` touches another page and its
address is the value the previous read returned.  Tasks are measured one at a time
while the others stay idle.

Three matrices come out, in ns per access:

* configured: the model's ``latency_ns[i][j] + 8 / bandwidth_gbps[i][j]``;
* virtual: the task's virtual clock per access (``stats()["vtime_ns"]``), equal to the
  configured cost by construction;
* measured: wall-clock per access divided by the dilation, with delay injection on
  (median over the runs; runs go round the cells in turn so that a noisy moment hits
  all cells alike).

The error of a cell is how far its measured remote/local ratio is from the configured
one, in percent; a row whose own node has no memory uses its cheapest column as the
reference.  Nothing here is asserted in tests: wall-clock figures are a benchmark.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from .cluster import Cluster
from .constants import MPOL_BIND
from .latency import DEFAULT_DILATION, LatencyModel
from .task import Task
from .topology import Topology, TopologyError

#: Bytes each step reads: one pointer.
WORD = 8


def bench_latency(topology: Topology | None = None, *, repeat: int = 5,
                  dilation: float | None = None, steps: int = 20000,
                  pages: int = 256) -> dict:
    """Measure the idle latency matrix of ``topology`` (default: the built-in cluster).

    Returns ``configured_ns``, ``virtual_ns``, ``measured_ns`` and ``error_pct``
    ([row][column] lists), ``max_error_pct``, the ``rows`` (nodes with CPUs) and
    ``columns`` (nodes with memory), and the run parameters with the total ``seconds``.
    """
    t_start = time.perf_counter()
    topo = topology if topology is not None else Topology.default()
    dilation = float(DEFAULT_DILATION if dilation is None else dilation)
    if not dilation > 0:
        raise ValueError(f"dilation must be positive, not {dilation}")
    for name, value in (("repeat", repeat), ("steps", steps), ("pages", pages)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    rows, cols = list(topo.nodes_with_cpus), list(topo.nodes_with_memory)
    for j in cols:  # every row's task binds one buffer to every column node
        need = pages * len(rows)
        if topo.frames_per_node[j] < need:
            raise TopologyError(f"node {j} has {topo.frames_per_node[j]} frames; the latency "
                                f"bench needs {need} ({pages} pages x {len(rows)} CPU nodes)")
    model = LatencyModel(topo)
    configured = [[model.latency_ns[i][j] + WORD / model.bandwidth_gbps[i][j] for j in cols]
                  for i in rows]
    cells = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    walls: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    vtimes: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    rng = np.random.default_rng(0)  # the same layout every run: comparable figures
    with Cluster(topo) as cluster:
        tasks = [cluster.attach(cpu=topo.cpus_of(i)[0], inject=dilation) for i in rows]
        try:
            heads = {(r, c): _build_chain(tasks[r], cols[c], pages, rng) for r, c in cells}
            warmup = max(pages, steps // 10)
            for k in range(repeat):
                # Alternate the order so that a slow drift does not favour the first cells.
                for cell in cells if k % 2 == 0 else reversed(cells):
                    wall, vtime, heads[cell] = _walk(tasks[cell[0]], heads[cell], steps,
                                                     warmup)
                    walls[cell].append(wall / steps / dilation)
                    vtimes[cell].append(vtime / steps)
        finally:
            for task in tasks:
                task.close()
    measured = [[statistics.median(walls[r, c]) for c in range(len(cols))]
                for r in range(len(rows))]
    # The virtual clock is a float sum; round away the last-bit noise of adding steps costs.
    virtual = [[round(statistics.median(vtimes[r, c]), 6) for c in range(len(cols))]
               for r in range(len(rows))]
    error = ratio_errors(rows, cols, configured, measured)
    return {
        "configured_ns": [[round(x, 6) for x in row] for row in configured],
        "virtual_ns": virtual,
        "measured_ns": measured,
        "max_error_pct": max(max(row) for row in error),
        "error_pct": error,
        "rows": rows,
        "columns": cols,
        "dilation": dilation,
        "steps": steps,
        "repeat": repeat,
        "pages": pages,
        "seconds": time.perf_counter() - t_start,
    }


def _build_chain(task: Task, node: int, pages: int, rng: np.random.Generator) -> int:
    """Map ``pages`` pages bound to ``node`` holding a random pointer cycle; return its head."""
    ps = task.page_size
    m = task.mmap(pages * ps)
    task.mbind(m.addr, m.length, MPOL_BIND, [node])
    order = rng.permutation(pages)  # the k-th element lives on page order[k] ...
    slots = rng.integers(0, ps // WORD, pages)  # ... at 8-byte slot slots[k]
    addrs = m.addr + order * ps + slots * WORD
    words = np.zeros(m.length // WORD, dtype="<u8")
    words[(addrs - m.addr) // WORD] = np.roll(addrs, -1)  # element k points at element k+1
    task.write(m.addr, words.tobytes())  # one write: one batched fault, every page filled
    where = task.move_pages(m.pages)
    if set(where) != {node}:
        raise RuntimeError(f"the buffer bound to node {node} landed on nodes {set(where)}")
    return int(addrs[0])


def _walk(task: Task, addr: int, steps: int, warmup: int) -> tuple[int, float, int]:
    """Chase ``warmup`` then ``steps`` pointers from ``addr``; return (wall ns of the timed
    steps, their virtual ns, the address reached)."""
    read, from_bytes = task.read, int.from_bytes
    # The warm-up also brings the pacer's deadline up to now: an idle pacer would otherwise
    # lend the timed loop up to SLACK_NS of credit.
    for _ in range(warmup):
        addr = from_bytes(read(addr, WORD), "little")
    v0 = task.stats()["vtime_ns"]
    t0 = time.perf_counter_ns()
    for _ in range(steps):
        addr = from_bytes(read(addr, WORD), "little")
    t1 = time.perf_counter_ns()
    v1 = task.stats()["vtime_ns"]
    return t1 - t0, v1 - v0, addr


def _references(rows: Sequence[int], cols: Sequence[int],
                configured: list[list[float]]) -> list[int]:
    """Column index each row is compared to: its own node, or its cheapest configured one."""
    return [cols.index(i) if i in cols else min(range(len(cols)), key=configured[r].__getitem__)
            for r, i in enumerate(rows)]


def _ratios(values: list[list[float]], refs: list[int]) -> list[list[float]]:
    return [[x / row[ref] for x in row] for row, ref in zip(values, refs)]


def ratio_errors(rows: Sequence[int], cols: Sequence[int], configured: list[list[float]],
                 measured: list[list[float]]) -> list[list[float]]:
    """Per cell, |measured ratio - configured ratio| / configured ratio in percent, where a
    ratio is the cell over its row's reference: the local node, or the cheapest column."""
    refs = _references(rows, cols, configured)
    want, got = _ratios(configured, refs), _ratios(measured, refs)
    return [[abs(g - w) / w * 100 for w, g in zip(wr, gr)] for wr, gr in zip(want, got)]


def _table(title: str, rows: Sequence[int], cols: Sequence[int],
           blocks: Sequence[tuple[str, list[list[float]], str]]) -> list[str]:
    """MLC's matrix layout, several matrices side by side: (heading, values, format)."""
    width = 9
    block_w = width * len(cols) + 4
    lines = [title]
    lines.append(" " * 10 + "".join(f"{h:<{block_w}}" for h, _, _ in blocks).rstrip())
    node_hdr = "".join(f"{c:>{width}}" for c in cols)
    lines.append("Numa node " + ("    ".join([node_hdr] * len(blocks))))
    for r, i in enumerate(rows):
        cells = ["".join(f"{format(v[r][c], fmt):>{width}}" for c in range(len(cols)))
                 for _, v, fmt in blocks]
        lines.append(f"{i:>9} " + "    ".join(cells))
    return lines


def latency_text(result: dict) -> str:
    """The bench result as text: the three matrices in ns, then the ratio errors."""
    rows, cols = result["rows"], result["columns"]
    d = result["dilation"]
    lines = [f"numaemu idle latency: dilation {d:g}, {result['steps']} dependent 8-byte reads "
             f"per cell, median of {result['repeat']} runs, {result['pages']} pages per buffer",
             ""]
    lines += _table("Measuring idle latencies (in ns)...", rows, cols, [
        ("configured", result["configured_ns"], ".2f"),
        ("virtual", result["virtual_ns"], ".2f"),
        (f"measured (wall / {d:g})", result["measured_ns"], ".2f"),
    ])
    refs = _references(rows, cols, result["configured_ns"])
    conf_ratio = _ratios(result["configured_ns"], refs)
    meas_ratio = _ratios(result["measured_ns"], refs)
    lines.append("")
    lines += _table("Latency relative to the local node (measured vs configured)...", rows,
                    cols, [("configured", conf_ratio, ".3f"), ("measured", meas_ratio, ".3f"),
                           ("error %", result["error_pct"], ".2f")])
    lines.append("")
    lines.append(f"max error of a remote/local ratio: {result['max_error_pct']:.2f} %   "
                 f"(bench took {result['seconds']:.1f} s)")
    return "\n".join(lines) + "\n"


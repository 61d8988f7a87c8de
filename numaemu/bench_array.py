"""``numaemu bench array``: array views of emulated memory (numaemu/ndarray.py) against
numpy on the very frames that back them.

One task maps ``pages`` pages bound to its own node (2048 pages: 1M int64 elements) and
fills them.  The baseline is a plain numpy array over the same shared memory: the
frames that back the mapping, found through the task's TLB (a fresh node hands a
first-touch batch out as one contiguous run, so this is one slice of the node's
segment; if it is not, the baseline indexes the segment through a page map computed
beforehand, which costs numpy the same fancy index).  Timed, emulated vs baseline:

* ``gather``: ``a[idx]`` for ``indices`` random indices (1M);
* ``scatter``: ``a[idx] = v``;
* ``update``: ``a[idx] += 1`` (a gather, then a scatter);
* ``asarray``: ``np.asarray(a)``, a bulk read of the whole view (numpy: a copy);
* ``sum``: ``a.sum()``.

Each repetition times both sides back to back (alternating which goes first); figures
are medians, and a slowdown is the median of the per-repetition ratios.  Nothing here
is asserted in tests.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .cluster import Cluster
from .constants import MPOL_BIND
from .topology import Topology

OPS = ("gather", "scatter", "update", "asarray", "sum")


def bench_array(pages: int = 2048, repeat: int = 5, indices: int | None = None) -> dict:
    """Time every op in ``OPS`` on a view of ``pages`` pages and on numpy (see above)."""
    if pages < 1 or repeat < 1:
        raise ValueError("pages and repeat must be at least 1")
    topo = Topology.symmetric(nodes=2, frames_per_node=pages + 4096, cpus_per_node=1)
    with Cluster(topo) as cluster:
        task = cluster.attach(cpu=0, inject=False)
        try:
            m = task.mmap(pages * task.page_size)
            task.mbind(m.addr, m.length, MPOL_BIND, [task.node])
            a = task.ndarray(m, dtype=np.int64)
            n = a.size
            a[:] = np.arange(n, dtype=np.int64)  # first touch: every page faulted in
            view, where = _same_frames(task, m, n)
            rng = np.random.default_rng(0)
            idx = rng.integers(0, n, indices or n, dtype=np.int64)
            vals = rng.integers(0, 1 << 40, len(idx), dtype=np.int64)
            ops = _ops(a, view, where, idx, vals)
            for emulated, baseline in ops.values():  # warm up both sides once
                emulated()
                baseline()
            times = {op: ([], []) for op in OPS}  # (emulated, baseline) seconds
            for k in range(repeat):
                for op, pair in ops.items():
                    for side in ((0, 1) if k % 2 == 0 else (1, 0)):
                        times[op][side].append(_timed(pair[side]))
        finally:
            task.close()
    out: dict = {"pages": pages, "elements": n, "indices": len(idx), "repeat": repeat,
                 "contiguous": where is None}
    for op, (ours, ref) in times.items():
        out[f"{op}_ms"] = statistics.median(ours) * 1e3
        out[f"{op}_numpy_ms"] = statistics.median(ref) * 1e3
        out[f"{op}_slowdown"] = statistics.median(o / r for o, r in zip(ours, ref))
    return out


def _ops(a, view: np.ndarray, where, idx: np.ndarray, vals: np.ndarray) -> dict:
    """(emulated, baseline) callables per op.  The baseline indexes ``view`` with ``idx``,
    or, if ``where`` is not None, with ``where(idx)`` computed here, beforehand."""
    bidx = idx if where is None else where(idx)
    whole = None if where is None else where(np.arange(a.size, dtype=np.int64))

    def scatter():
        a[idx] = vals

    def scatter_numpy():
        view[bidx] = vals

    def update():
        a[idx] += 1

    def update_numpy():
        view[bidx] += 1

    def bulk_numpy():
        return np.array(view) if whole is None else view[whole]

    def sum_numpy():
        return view.sum() if whole is None else view[whole].sum()

    return {"gather": (lambda: a[idx], lambda: view[bidx]),
            "scatter": (scatter, scatter_numpy),
            "update": (update, update_numpy),
            "asarray": (lambda: np.asarray(a), bulk_numpy),
            "sum": (lambda: a.sum(), sum_numpy)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _same_frames(task, m, n: int) -> tuple[np.ndarray, object]:
    """numpy's view of the frames that back mapping ``m`` (``n`` int64 elements), and
    None; or, if they are not one run, the whole segment and a function mapping element
    indices of ``m`` to element indices of the segment."""
    from .bench import frame_offsets

    node, offsets = frame_offsets(task, m.pages)
    seg = np.frombuffer(task._segments[node].map, dtype=np.int64)
    first = offsets[0] // 8
    if np.array_equal(offsets, offsets[0] + np.arange(len(offsets)) * task.page_size):
        view = seg[first : first + n]
        assert np.array_equal(view[:: max(1, n // 4096)], m.ndarray()[:: max(1, n // 4096)])
        return view, None
    starts, per_page = offsets // 8, task.page_size // 8

    def where(i: np.ndarray) -> np.ndarray:
        return starts[i // per_page] + i % per_page

    return seg, where

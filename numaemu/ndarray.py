"""Emulated memory as numpy arrays: ``task.ndarray(mapping, dtype)``.

A ``TaskArray`` is a view of part of a task's address space with a dtype and a shape.
Indexing it (an int, a slice, an integer or boolean index array) reads through the
access path and returns numpy values; assigning to it writes through it; ``a[idx] += 1``
is a read then a write, with numpy's semantics for repeated indices.  Whole-view reads
(``np.asarray(a)``, ``a.sum()``) are one bulk ``task.read``.

Every element goes through the TLB, vectorised: the task keeps its TLB as numpy arrays
too (frame and node per page), so a gather translates all its pages at once, reads each
node's elements with one fancy index into that node's segment, and faults what is
missing in one batch (and again, the same way, if a migration took a page meanwhile).
It holds the task's access lock while it touches frames, like any access, so a migration
waits for it (TLB shootdown) and it never sees a freed frame.  Accounting is per element,
exactly as the same accesses made one by one with ``task.read``/``task.write``: one
access and ``itemsize`` bytes charged to the node of each element's page.

Elements must not straddle pages: the view's address must be aligned to the itemsize,
and the page size a multiple of it.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from .errors import NumaError
from .task import ZERO_PFN


class TaskArray:
    """A typed view of emulated memory (see the module docstring)."""

    def __init__(self, task, addr: int, nbytes: int, dtype: Any = np.int64,
                 shape: tuple[int, ...] | int | None = None) -> None:
        self.task = task
        self.dtype = np.dtype(dtype)
        size = self.dtype.itemsize
        if task.page_size % size or addr % size:
            raise NumaError(errno.EINVAL, f"{self.dtype} elements would straddle pages at "
                                          f"{addr:#x}")
        count = nbytes // size
        if shape is None:
            shape = (count,)
        shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
        if any(n < 0 for n in shape) or int(np.prod(shape)) * size > nbytes:
            raise NumaError(errno.EINVAL, f"shape {shape} of {self.dtype} does not fit in "
                                          f"{nbytes} bytes")
        self.addr, self.shape = addr, shape
        self.size = int(np.prod(shape))
        self._per_page = task.page_size // size
        self._segs: dict[int, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TaskArray(addr={self.addr:#x}, shape={self.shape}, dtype={self.dtype})"

    # -- numpy interop -----------------------------------------------------------------
    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.frombuffer(self.task.read(self.addr, self.nbytes), dtype=self.dtype)
        out = out.reshape(self.shape).copy()
        return out if dtype is None else out.astype(dtype)

    def sum(self, *args, **kwargs):
        return np.asarray(self).sum(*args, **kwargs)

    # -- indexing ------------------------------------------------------------------------
    def _flat(self, key) -> tuple[np.ndarray, tuple[int, ...] | None]:
        """Element indices of ``key`` and the result's shape (None: a scalar)."""
        if len(self.shape) == 1 and not isinstance(key, tuple):
            n = self.shape[0]
            if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
                k = int(key)
                if not -n <= k < n:
                    raise IndexError(f"index {k} is out of bounds for size {n}")
                return np.array([k % n], dtype=np.int64), None
            if isinstance(key, slice):
                idx = np.arange(*key.indices(n), dtype=np.int64)
                return idx, idx.shape
            arr = np.asarray(key)
            if arr.dtype == bool:
                if arr.shape != (n,):
                    raise IndexError(f"boolean index of shape {arr.shape} for size {n}")
                idx = np.flatnonzero(arr)
                return idx, idx.shape
            if arr.dtype.kind in "iu":
                idx = arr.astype(np.int64).ravel()
                if len(idx) and (idx.min() < -n or idx.max() >= n):
                    raise IndexError(f"index out of bounds for size {n}")
                return np.where(idx < 0, idx + n, idx), arr.shape
            raise IndexError(f"cannot index with {type(key).__name__}")
        picked = np.arange(self.size, dtype=np.int64).reshape(self.shape)[key]
        if np.ndim(picked) == 0:
            return np.array([picked], dtype=np.int64), None
        return np.asarray(picked).ravel(), np.shape(picked)

    def __getitem__(self, key):
        idx, shape = self._flat(key)
        out = self._gather(idx)
        return out[0] if shape is None else out.reshape(shape)

    def __setitem__(self, key, value) -> None:
        idx, shape = self._flat(key)
        values = np.broadcast_to(np.asarray(value, dtype=self.dtype),
                                 () if shape is None else shape).ravel()
        self._scatter(idx, values)

    # -- the access path, vectorised --------------------------------------------------------
    def _seg(self, node: int) -> np.ndarray:
        """Node ``node``'s frames as one array of this dtype."""
        arr = self._segs.get(node)
        if arr is None:
            view = self.task._views[node]
            arr = np.frombuffer(view, dtype=self.dtype, count=len(view) // self.dtype.itemsize)
            self._segs[node] = arr
        return arr

    def _where(self, idx: np.ndarray):
        byte = self.addr + idx * self.dtype.itemsize
        task = self.task
        slot = (byte >> task._shift) - task._base_vpn
        within = (byte & (task.page_size - 1)) // self.dtype.itemsize
        return slot, within

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        task = self.task
        slot, within = self._where(idx)
        out = np.empty(len(idx), dtype=self.dtype)
        while True:
            with task._access_lock:
                pfn, node = _lookup(task, slot)
                missing = pfn == -1
                if not missing.any():
                    zero = pfn == ZERO_PFN
                    out[zero] = 0
                    for nd in np.unique(node[~zero]).tolist():
                        sel = (node == nd) & ~zero
                        out[sel] = self._seg(nd)[pfn[sel] * self._per_page + within[sel]]
                    cost = _account(task, node, self.dtype.itemsize)
                    break
            task._fault(np.unique(slot[missing])[: task.MAX_FAULT].tolist(), write=False)
        if task._pacer is not None:
            task._pacer.pay(cost)
        return out

    def _scatter(self, idx: np.ndarray, values: np.ndarray) -> None:
        task = self.task
        slot, within = self._where(idx)
        while True:
            with task._access_lock:
                pfn, node = _lookup(task, slot)
                writable = _writable(task, slot)
                missing = (pfn < 0) | ~writable
                if not missing.any():
                    for nd in np.unique(node).tolist():
                        sel = node == nd
                        self._seg(nd)[pfn[sel] * self._per_page + within[sel]] = values[sel]
                    cost = _account(task, node, self.dtype.itemsize)
                    break
            task._fault(np.unique(slot[missing])[: task.MAX_FAULT].tolist(), write=True)
        if task._pacer is not None:
            task._pacer.pay(cost)


def _lookup(task, slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame and node of each TLB slot (-1: no translation); caller holds the access lock."""
    npfn = task._npfn
    inside = (slot >= 0) & (slot < len(npfn))
    pfn = np.full(len(slot), -1, dtype=np.int64)
    node = np.zeros(len(slot), dtype=np.int64)
    pfn[inside] = npfn[slot[inside]]
    node[inside] = task._nnode[slot[inside]]
    return pfn, node


def _writable(task, slot: np.ndarray) -> np.ndarray:
    nwrite = task._nwrite
    inside = (slot >= 0) & (slot < len(nwrite))
    out = np.zeros(len(slot), dtype=bool)
    out[inside] = nwrite[slot[inside]]
    return out


def _account(task, node: np.ndarray, itemsize: int) -> float:
    """One access and ``itemsize`` bytes per element, on its page's node, as ``task.read``
    would charge them one by one; returns the injected delay owed (caller holds the lock)."""
    counts = np.bincount(node, minlength=len(task._pages_by_node))
    cost = 0.0
    lat, per_byte = task._lat_row, task._byte_row
    for nd in np.flatnonzero(counts).tolist():
        c = int(counts[nd])
        task._pages_by_node[nd] += c
        task._bytes_by_node[nd] += c * itemsize
        cost += c * (lat[nd] + itemsize * per_byte[nd])
    return cost

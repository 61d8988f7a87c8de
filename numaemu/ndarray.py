"""Emulated memory as numpy arrays: ``task.ndarray(mapping, dtype)``.

A ``TaskArray`` is a view of part of a task's address space with a dtype and a shape.
Indexing it (an int, a slice, an integer or boolean index array) reads through the
access path and returns numpy values; assigning to it writes through it; ``a[idx] += 1``
is a read then a write, with numpy's semantics for repeated indices.  Whole-view reads
(``np.asarray(a)``, ``a.sum()``) are one bulk ``task.read``.

Every element goes through the TLB, vectorised: the task keeps its TLB as numpy arrays
too (frame and node per page).  Two ways, under the task's access lock like any access
(a migration waits for it: TLB shootdown, and it never sees a freed frame):

* *direct*: when the view's pages are consecutive frames of one node, all translated
  (writable, for a write), the view *is* a slice of that node's segment, and numpy
  indexes it as it would any array.  Whether that holds is found once per TLB
  generation (``Task._tlb_gen``, bumped by every install and invalidation), so an access
  costs one comparison more than numpy's own indexing;
* *by page*: otherwise each element's page is looked up in the TLB arrays, each node's
  elements are read with one fancy index into that node's segment, and what is missing
  is faulted in one batch (again, the same way, if a migration took a page meanwhile).

Accounting is per element, exactly as the same accesses made one by one with
``task.read``/``task.write``: one access and ``itemsize`` bytes charged to the node of
each element's page.

Elements must not straddle pages: the view's address must be aligned to the itemsize,
and the page size a multiple of it.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import numpy as np

from . import arrayops
from .errors import NodeUnreachable, NumaError
from .task import UNREACHABLE_PAUSE, ZERO_PFN


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
        # Where the elements are: element e is element (first + e) % per_page of TLB slot
        # slot0 + (first + e) // per_page (the itemsize divides the page size: a power of 2).
        self._per_page = task.page_size // size
        self._page_shift = self._per_page.bit_length() - 1
        self._first = (addr & (task.page_size - 1)) // size
        self._slot0 = (addr >> task._shift) - task._base_vpn
        self._pages = ((self._first + self.size - 1) >> self._page_shift) + 1 if self.size else 0
        self._segs: dict[int, np.ndarray] = {}
        self._direct_views: list[tuple] = [(-1, None, -1), (-1, None, -1)]  # see _direct

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
    def __getitem__(self, key):
        if type(key) is int and len(self.shape) == 1:  # one element: task.read's hot path
            return np.frombuffer(self.task.read(self._address(key), self.dtype.itemsize),
                                 dtype=self.dtype)[0]
        key = _plain(key)
        task = self.task
        lock = task._access_lock
        lock.acquire()
        try:
            view, node = self._direct(write=False)
            if view is not None:
                out = view[key]
                if isinstance(out, np.ndarray) and np.may_share_memory(out, view):
                    out = out.copy()  # a slice is a view of the frames: copy it out now
                cost = _charge(task, node, np.size(out), self.dtype.itemsize)
        finally:
            lock.release()
        if view is not None:
            if task._pacer is not None:
                task._pacer.pay(cost)
            return out
        idx, shape = self._flat(key)
        out = self._gather(idx)
        return out[0] if shape is None else out.reshape(shape)

    def __setitem__(self, key, value) -> None:
        values = np.asarray(value, dtype=self.dtype)  # (it may read emulated memory too)
        if type(key) is int and len(self.shape) == 1 and not values.ndim:
            self.task.write(self._address(key), values.tobytes())  # one element
            return
        key = _plain(key)
        task = self.task
        lock = task._access_lock
        lock.acquire()
        try:
            view, node = self._direct(write=True)
            if view is not None:
                view[key] = values
                cost = _charge(task, node, _selected(view, key), self.dtype.itemsize)
        finally:
            lock.release()
        if view is not None:
            if task._pacer is not None:
                task._pacer.pay(cost)
            return
        idx, shape = self._flat(key)
        if values.ndim:
            values = np.broadcast_to(values, () if shape is None else shape).ravel()
        self._scatter(idx, values)

    def _address(self, k: int) -> int:
        """Address of element ``k`` of a 1-D view (numpy's bounds and negative indices)."""
        n = self.shape[0]
        if not -n <= k < n:
            raise IndexError(f"index {k} is out of bounds for size {n}")
        return self.addr + (k % n) * self.dtype.itemsize

    def _flat(self, key) -> tuple[np.ndarray, tuple[int, ...] | None]:
        """Element indices of ``key`` (made plain) and the result's shape (None: a
        scalar), as numpy would select them."""
        if len(self.shape) == 1 and not isinstance(key, tuple):
            n = self.shape[0]
            if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
                k = int(key)
                if not -n <= k < n:
                    raise IndexError(f"index {k} is out of bounds for size {n}")
                return np.array([k % n], dtype=np.int64), None
            if isinstance(key, slice):
                idx = np.arange(*key.indices(n), dtype=np.int64)
                return idx, idx.shape
            if isinstance(key, np.ndarray) and key.ndim:
                if key.dtype == bool:
                    if key.shape != (n,):
                        raise IndexError(f"boolean index of shape {key.shape} for size {n}")
                    idx = np.flatnonzero(key)
                    return idx, idx.shape
                if key.dtype.kind in "iu":
                    idx = np.asarray(key, dtype=np.int64).ravel()
                    low = idx.min() if len(idx) else 0
                    if low < -n or (len(idx) and idx.max() >= n):
                        raise IndexError(f"index out of bounds for size {n}")
                    if low < 0:
                        idx = np.where(idx < 0, idx + n, idx)
                    return idx, key.shape
        # Anything else (several dimensions, None, Ellipsis, a 0-d index): ask numpy.
        picked = np.arange(self.size, dtype=np.int64).reshape(self.shape)[key]
        if np.ndim(picked) == 0:
            return np.array([picked], dtype=np.int64), None
        return np.asarray(picked).ravel(), np.shape(picked)

    # -- the access path, vectorised --------------------------------------------------------
    def _seg(self, node: int) -> np.ndarray:
        """Node ``node``'s frames as one array of this dtype."""
        arr = self._segs.get(node)
        if arr is None:
            view = self.task._views[node]
            arr = np.frombuffer(view, dtype=self.dtype, count=len(view) // self.dtype.itemsize)
            self._segs[node] = arr
        return arr

    def _direct(self, write: bool) -> tuple[np.ndarray | None, int]:
        """(the view as an array over its node's segment, that node) when its pages are
        consecutive frames of one node, all translated (writable, for a write); else
        (None, -1).  Lock held; found once per TLB generation."""
        task = self.task
        gen, view, node = self._direct_views[write]
        if gen == task._tlb_gen:
            return view, node
        view, node = None, -1
        s0, k = self._slot0, self._pages
        if k and s0 >= 0 and s0 + k <= len(task._npfn) and (
                not write or np.count_nonzero(task._nwrite[s0 : s0 + k]) == k):
            nd, first = task._placement(s0, s0 + k)
            if first >= 0 and nd not in task._links:  # (not mapped here: by page)
                start = first * self._per_page + self._first
                view = self._seg(nd)[start : start + self.size].reshape(self.shape)
                node = nd
        self._direct_views[write] = (task._tlb_gen, view, node)
        return view, node

    def _where(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The page of the view (0, 1, ...) of each element of ``idx``, and the element's
        place in that page."""
        q = idx + self._first if self._first else idx
        return q >> self._page_shift, q & (self._per_page - 1)

    def _tlb(self, table: np.ndarray, none) -> np.ndarray:
        """``table`` (a TLB array: frame, node or writable) for the view's pages, ``none``
        for pages past the end of the TLB; lock held."""
        s0, k = self._slot0, self._pages
        part = table[s0 : s0 + k]
        if len(part) == k:
            return part
        out = np.full(k, none, dtype=table.dtype)
        out[: len(part)] = part
        return out

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        task = self.task
        page, within = self._where(idx)
        out = np.empty(len(idx), dtype=self.dtype)
        if not len(idx):
            return out
        gone = None
        while True:
            with task._access_lock:
                frames = self._tlb(task._npfn, -1)
                pfn = frames.take(page)
                faults = zero = None
                # Any page without a frame?  (Asked of the view's pages first when there are
                # fewer of them than elements.)
                if (len(frames) > len(idx) or frames.min() < 0) and pfn.min() < 0:
                    missing = pfn == -1
                    if missing.any():
                        faults = arrayops.unique(page[missing])[: task.MAX_FAULT] + self._slot0
                    else:  # only the zero page: read any frame, then zeros
                        zero = pfn == ZERO_PFN
                        pfn[zero] = 0
                if faults is None:
                    node = self._tlb(task._nnode, 0).take(page)
                    pfn *= self._per_page
                    pfn += within
                    try:
                        per_node = self._by_node(node, pfn, out)
                    except NodeUnreachable as exc:  # fault that node's pages in again
                        gone = task._forget_node(exc, gone)
                        continue
                    if zero is not None:
                        out[zero] = 0
                    cost = sum(_charge(task, nd, count, self.dtype.itemsize)
                               for nd, count in per_node)
                    break
            if gone is not None:
                time.sleep(UNREACHABLE_PAUSE)
            task._fault(faults.tolist(), write=False)
        if task._pacer is not None:
            task._pacer.pay(cost)
        return out

    def _scatter(self, idx: np.ndarray, values: np.ndarray) -> None:
        task = self.task
        page, within = self._where(idx)
        if not len(idx):
            return
        gone = None
        while True:
            with task._access_lock:
                writable = self._tlb(task._nwrite, False)
                if not (len(writable) <= len(idx) and writable.all()):
                    writable = writable.take(page)  # (checked by page when it is cheaper)
                if writable.all():
                    pfn = self._tlb(task._npfn, -1).take(page)
                    node = self._tlb(task._nnode, 0).take(page)
                    pfn *= self._per_page
                    pfn += within
                    try:
                        per_node = self._by_node(node, pfn, values, store=True)
                    except NodeUnreachable as exc:  # fault that node's pages in again
                        gone = task._forget_node(exc, gone)
                        continue
                    cost = sum(_charge(task, nd, count, self.dtype.itemsize)
                               for nd, count in per_node)
                    break
                faults = arrayops.unique(page[~writable])[: task.MAX_FAULT] + self._slot0
            if gone is not None:
                time.sleep(UNREACHABLE_PAUSE)
            task._fault(faults.tolist(), write=True)
        if task._pacer is not None:
            task._pacer.pay(cost)

    def _by_node(self, node: np.ndarray, elem: np.ndarray, data: np.ndarray,
                 store: bool = False) -> list[tuple[int, int]]:
        """Read the segment elements ``elem`` of each element's node into ``data`` (or, with
        ``store``, write ``data`` there): one fancy index per node.  Returns (node, number
        of elements) for each node."""
        counts = np.bincount(node)
        nodes = np.flatnonzero(counts).tolist()
        if self.task._links:
            return self._by_node_remote(node, elem, data, store, nodes, counts)
        if len(nodes) == 1:  # the usual case
            seg = self._seg(nodes[0])
            if store:
                seg[elem] = data
            else:
                seg.take(elem, out=data)
            return [(nodes[0], len(node))]
        for nd in nodes:
            at = np.flatnonzero(node == nd)
            if store:
                self._seg(nd)[elem.take(at)] = data if data.ndim == 0 else data.take(at)
            else:
                data[at] = self._seg(nd).take(elem.take(at))
        return [(nd, int(counts[nd])) for nd in nodes]


    def _by_node_remote(self, node: np.ndarray, elem: np.ndarray, data: np.ndarray,
                        store: bool, nodes: list[int], counts: np.ndarray) -> list[tuple]:
        """``_by_node`` for a task that reaches some nodes through their data service
        (numaemu/remote.py): one request per such node, all sent before any reply is
        awaited; the lock is held throughout, as for any access."""
        from . import remote

        size = self.dtype.itemsize
        waits = []
        for nd in nodes:
            at = None if len(nodes) == 1 else np.flatnonzero(node == nd)
            e = elem if at is None else elem.take(at)
            if nd not in self.task._links:
                if store:
                    self._seg(nd)[e] = data if data.ndim == 0 or at is None else data.take(at)
                elif at is None:
                    self._seg(nd).take(e, out=data)
                else:
                    data[at] = self._seg(nd).take(e)
                continue
            values = None
            if store:
                values = np.broadcast_to(data, (len(e),)) if data.ndim == 0 else \
                    (data if at is None else data.take(at))
                values = np.ascontiguousarray(values, dtype=self.dtype).view(np.uint8)
                values = values.reshape(len(e), size)
            waits.append((remote.elements(self.task, nd, e, size, values), at))
        for finish, at in waits:
            got = finish()
            if not store:
                items = np.frombuffer(got, dtype=self.dtype)
                if at is None:
                    data[:] = items
                else:
                    data[at] = items
        return [(nd, int(counts[nd])) for nd in nodes]


def _plain(key):
    """``key`` with anything array-like made an ndarray now: converting it may read emulated
    memory (a ``TaskArray`` as an index), which must not happen under the access lock."""
    if isinstance(key, tuple):
        return tuple(_plain(k) for k in key)
    if key is None or key is Ellipsis or isinstance(key, (int, np.integer, np.bool_, slice,
                                                          np.ndarray)):
        return key
    return np.asarray(key)


def _selected(view: np.ndarray, key) -> int:
    """How many elements ``view[key]`` selects (repeated indices count each time)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and view.ndim == 1:
        return 1
    if isinstance(key, np.ndarray) and view.ndim == 1:
        if key.dtype == bool:
            return int(np.count_nonzero(key))
        if key.dtype.kind in "iu":
            return key.size
    if isinstance(key, slice) and view.ndim == 1:
        return len(range(*key.indices(len(view))))
    # Anything else: the same selection from a one-byte array of the view's shape.
    return np.broadcast_to(np.int8(0), view.shape)[key].size


def _charge(task, node: int, count: int, itemsize: int) -> float:
    """One access and ``itemsize`` bytes for each of ``count`` elements on ``node``, as
    ``task.read`` would charge them one by one; returns the delay owed (lock held)."""
    task._pages_by_node[node] += count
    task._bytes_by_node[node] += count * itemsize
    return count * (task._lat_row[node] + itemsize * task._byte_row[node])

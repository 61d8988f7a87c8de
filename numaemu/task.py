"""A client task: one emulated process, with its own TLB and direct access to frames.

Access path (ARCHITECTURE.md "The access path"):

* ``read``/``write`` look the page up in the TLB, a plain list indexed by
  ``vpn - base`` holding a memoryview of the frame (``None`` = not cached), and
  copy straight from/to the node's shared memory under the *access lock*;
* an access of several pages finds where their frames are from the TLB's numpy
  mirror (``_layout``): consecutive frames of one node are copied as one slice, others
  with one ``b"".join`` (reads) or one numpy row copy per node (writes); the answer
  holds for that range until the TLB changes (``_tlb_gen``);
* on a miss, the access releases the lock, sends one ``fault`` for every
  missing page of the access, installs the translations and retries;
* the shootdown thread (``_Shootdown``) serves the coordinator's
  ``invalidate`` messages: it takes the access lock (so no access to those
  frames is in flight), drops the entries and acknowledges.

The access never holds the lock while waiting for the coordinator, who may be
waiting for this very client's acknowledgement.  A fault reply can race with
an invalidation that arrived on the other socket: invalidations seen while a
fault is in flight are logged and their pages are not installed from that
reply (they fault again).

The hot path is built as closures with local bindings (``_build_access``):
a method with ``self.`` lookups and ``with lock:`` costs about twice as much
(reference/spike-access-shootdown-migration.md section 1).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import zmq

from . import argcheck, arrayops
from . import protocol as P
from .constants import MAX_REQUEST_PAGES, TASK_SIZE, MoveFlag
from .errors import ClusterError, NodeUnreachable, NumaError
from .keys import Keys
from .latency import MIGRATION_WAIT_NS, LatencyModel, Pacer
from .profile import profile_array
from .topology import Topology
from .transport import Connection, context

log = logging.getLogger("numaemu.client")

HEARTBEAT = 1.0
STOP_POLL_MS = 50


#: How long an access that finds the shootdown thread waiting for the access lock sleeps
#: (GIL released) so that the shootdown gets it first.
URGENT_YIELD_S = 0.00005
#: How long an access keeps faulting again after a node's data service went unreachable,
#: until the coordinator poisons the node's pages (EIO): a node on another host is declared
#: dead after a 1.5 s lease, a hung local one after 5 s.  Under the coordinator's client
#: lease (10 s), since the shootdown it may be waiting for needs this access to end.
UNREACHABLE_RETRY = 5.0
#: The pause between those retries (the access lock is free meanwhile).
UNREACHABLE_PAUSE = 0.05
#: ``Task._npfn`` of a slot that maps the shared zero page (no frame: reads are zeros).
ZERO_PFN = -2
#: A TLB list entry of a page on a node the task reaches through the node's data service
#: (numaemu/remote.py): a translation, but no memory to view.
REMOTE: Any = object()


def byte_view(data) -> memoryview:
    """``data`` (any bytes-like object) as a flat view of bytes: what a write copies from."""
    try:
        src = memoryview(data)
    except (TypeError, ValueError, BufferError):
        raise NumaError(errno.EINVAL, "write needs a bytes-like object") from None
    if src.ndim != 1 or src.format != "B":
        try:
            src = src.cast("B")
        except TypeError:  # not C-contiguous: copy it
            src = memoryview(src.tobytes())
    return src


class AccessLock:
    """The task's access lock: a mutex made of a one-token ``queue.SimpleQueue``.

    ``acquire`` takes the token (waiting with the GIL released while another thread holds
    it, as ``threading.Lock`` does) and ``release`` puts it back.  Why not a
    ``threading.Lock``: on CPython 3.11 its ``acquire`` parses its optional arguments on
    every call, and an acquire/release pair costs about 65 ns against 30 ns for the
    queue's ``get``/``put`` -- a tenth of an 8-byte TLB hit.  The hot path binds
    ``take``/``give`` (``give`` wants the token: ``give(True)``).
    """

    __slots__ = ("_token", "take", "give", "_urgent")

    def __init__(self) -> None:
        self._token: queue.SimpleQueue = queue.SimpleQueue()
        self._token.put(True)
        self.take, self.give = self._token.get, self._token.put
        self._urgent = 0  # threads waiting in acquire_urgent (the shootdown thread)

    def acquire(self) -> None:
        """Take the lock, after any urgent taker that is waiting for it.

        Neither a lock nor this queue is fair: a thread that releases and re-takes at once
        usually wins, because the woken waiter needs the GIL first.  An access that holds the
        lock across a wait (a remote access waits for a node) and loops would starve the
        shootdown thread until the coordinator fences the task (10 s), so the shootdown takes
        the lock with ``acquire_urgent`` and every other taker here lets it go first.
        """
        while self._urgent:
            time.sleep(URGENT_YIELD_S)  # let the shootdown thread take the token
        self._token.get()

    def acquire_urgent(self) -> None:
        """Take the lock ahead of the other takers of ``acquire`` (the shootdown thread)."""
        self._urgent += 1
        try:
            self._token.get()
        finally:
            self._urgent -= 1

    def release(self) -> None:
        if self._token.qsize():  # a second token would let two holders in
            raise RuntimeError("release of an access lock that is not held")
        self._token.put(True)

    def locked(self) -> bool:
        return not self._token.qsize()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self._token.put(True)


class MoveResult(list):
    """move_pages statuses (a list: node or negative errno per page), plus
    ``not_migrated``: the call's positive return value (pages not migrated)."""

    def __init__(self, statuses: list[int], not_migrated: int = 0) -> None:
        super().__init__(statuses)
        self.not_migrated = not_migrated


class Mapping:
    """A mapped range of a task's address space (what ``mmap`` returns)."""

    def __init__(self, task: Task, addr: int, length: int) -> None:
        self.task = task
        self.addr = addr
        self.length = length

    def page(self, i: int) -> int:
        """Address of page ``i`` of the mapping."""
        return self.addr + i * self.task.page_size

    @property
    def pages(self) -> list[int]:
        """Addresses of every page of the mapping."""
        return list(range(self.addr, self.addr + self.length, self.task.page_size))

    def ndarray(self, dtype: Any = np.int64, offset: int = 0,
                shape: tuple[int, ...] | int | None = None):
        """This mapping as a numpy-like array (``Task.ndarray``)."""
        return self.task.ndarray(self, dtype, offset, shape)

    def __repr__(self) -> str:
        return f"Mapping(addr={self.addr:#x}, length={self.length})"


class Task:
    """An emulated process attached to a cluster (see ``numaemu.attach``).

    ``read(addr, n) -> bytes`` and ``write(addr, data)`` are installed per
    instance as closures (the fast path); the methods of the same name below
    document them.
    """

    def __init__(self, address: str, *, cpu: int | None = None, privileged: bool = False,
                 command: str | None = None, uid: int | None = None,
                 inject: float | None | bool = True, keys: str | Keys | None = None,
                 cpuset: str | None = None, data_path: str | None = None) -> None:
        from .remote import data_path_setting

        self.address = address
        #: "auto" (map what can be mapped, else the node's data service), "local" or
        #: "remote" (numaemu/remote.py); None: $NUMAEMU_DATA_PATH, else "auto"
        self.data_path = data_path_setting(data_path)
        self._keys_dir = keys
        self._conn = Connection(address, keys=keys)
        self._keys = self._conn.keys
        self._req_lock = threading.Lock()
        self._closed = False
        try:
            reply = self._conn.call(
                "attach", os_pid=os.getpid(), host=socket.gethostname(),
                uid=os.getuid() if uid is None else uid,
                cpu=cpu, privileged=privileged, cpuset=cpuset,
                command=command or os.path.basename(sys.argv[0] or "python"))
        except BaseException:
            self._conn.close()
            raise
        self.pid: int = reply["pid"]
        self.cpu: int = reply["cpu"]
        self.node: int = reply["node"]
        self.page_size: int = reply["page_size"]
        self.privileged = privileged
        self.topology = Topology.from_dict(reply["topology"])
        self._latency = LatencyModel(self.topology)
        self._shift = self.page_size.bit_length() - 1
        self._base_vpn = reply["mmap_base"] // self.page_size
        self._access_lock = AccessLock()
        self._rtlb: list[memoryview | None] = []
        self._wtlb: list[memoryview | None] = []
        self._tnode: list[int] = []
        # The same TLB as numpy arrays, for vectorised access (numaemu/ndarray.py): frame
        # per slot (-1 none, ZERO_PFN the zero page), node, writable; kept in step with the
        # lists under the access lock, and never shorter than them.
        self._npfn = np.full(0, -1, dtype=np.int64)
        self._nnode = np.zeros(0, dtype=np.int64)
        self._nwrite = np.zeros(0, dtype=bool)
        # Bumped (under the access lock) whenever a translation is installed or dropped:
        # what was found in the TLB at one generation holds until the next.
        self._tlb_gen = 0
        self._layouts: list[tuple] = [((), None), ((), None)]  # see _layout
        self._zero = memoryview(bytes(self.page_size))
        nn = self.topology.num_nodes
        self._pages_by_node = [0] * nn  # since the last fold, at the current CPU node
        self._bytes_by_node = [0] * nn
        self._eights_by_node = [0] * nn  # 8-byte reads: one page and 8 bytes each
        self._pair_pages = [[0] * nn for _ in range(nn)]  # [cpu node][memory node]
        self._pair_bytes = [[0] * nn for _ in range(nn)]
        self._totals = {"local_accesses": 0, "remote_accesses": 0, "local_bytes": 0,
                        "remote_bytes": 0, "vtime_ns": 0.0, "access_ns": 0.0,
                        "fault_ns": 0.0, "migration_wait_ns": 0.0, "faults": 0,
                        "migration_waits": 0, "invalidations": 0, "injected_ns": 0.0,
                        "data_requests": 0, "data_ns": 0.0}
        # Delay injection: True = the cluster's setting, None/False = off, or a dilation.
        self._pacer: Pacer | None = None
        if inject is True:
            inject = reply.get("inject_dilation")
        if inject:
            self._pacer = Pacer(float(inject))
        self._paybox = [self._pacer.pay if self._pacer is not None else None]
        self._lat_row: list[float] = []
        self._byte_row: list[float] = []
        self._set_latency_row()
        self._fault_pending = False
        self._inval_log: list[np.ndarray] = []
        self._segments: dict[int, Any] = {}
        self._views: dict[int, memoryview] = {}
        self._links: dict[int, Connection] = {}  # nodes reached through their data service
        try:
            self._map_segments(reply["segments"])
            self._shootdown = _Shootdown(self, reply["endpoints"]["tlb"])
            self._shootdown.start_and_wait()
        except BaseException:
            self._teardown(detach=True)
            raise
        self._build_access()
        from . import log as numaemu_log

        numaemu_log.setup_forwarding(reply.get("log_endpoint", ""), role="client",
                                     extra=f"task {self.pid} cpu {self.cpu}", keys=self._keys)
        log.info("task %d attached to %s on cpu %d (node %d)", self.pid, address, self.cpu,
                 self.node)

    # -- setup -----------------------------------------------------------------
    def _map_segments(self, segments: list[dict]) -> None:
        from nodes.segment import Segment

        from .remote import connect

        for seg in segments:
            if self.data_path == "remote":
                self._links[seg["node"]] = connect(seg["node"], seg.get("data_endpoint", ""),
                                                   self._keys_dir)
                continue
            try:
                s = Segment(seg["path"], seg["frames"], self.page_size, create=False)
            except (OSError, ValueError) as exc:
                if self.data_path == "auto":  # another host: through the node's data service
                    log.info("node %d's memory is not mapped here (%s): remote data path",
                             seg["node"], exc)
                    self._links[seg["node"]] = connect(
                        seg["node"], seg.get("data_endpoint", ""), self._keys_dir)
                    continue
                raise ClusterError(
                    f"cannot map node {seg['node']}'s memory at {seg['path']} ({exc}); "
                    "clients must run on the host of the nodes they access") from None
            self._segments[seg["node"]] = s
            self._views[seg["node"]] = memoryview(s.map)

    def _set_latency_row(self) -> None:
        """The latency model's row of the task's current node, in the cells the closures
        read (updated in place)."""
        lat, per_byte = self._latency.row(self.node)
        self._lat_row[:] = lat
        self._byte_row[:] = per_byte

    def _build_access(self) -> None:
        """Build the read/write closures (the hot path)."""
        rtlb, wtlb, tnode = self._rtlb, self._wtlb, self._tnode
        take, give = self._access_lock.take, self._access_lock.give
        base, shift, ps = self._base_vpn, self._shift, self.page_size
        mask = ps - 1
        pages, nbytes, eights = self._pages_by_node, self._bytes_by_node, self._eights_by_node
        slow_read, slow_write = self._slow_read, self._slow_write
        # Mutable cells, updated in place: a caller that kept ``read = task.read`` still sees
        # a CPU move (the latency row) and a change of delay injection.
        lat, per_byte, paybox = self._lat_row, self._byte_row, self._paybox
        unpack8 = struct.Struct("8s").unpack_from

        def read(addr: int, n: int) -> bytes:
            try:  # (free unless raised) anything but integers: the slow path says EINVAL
                if n == 8 and type(n) is int:  # the usual size: unpack8 checks the bounds
                    i = (addr >> shift) - base
                    if i >= 0:
                        take()
                        try:
                            out = unpack8(rtlb[i], addr & mask)[0]  # struct.error: crosses
                            nd = tnode[i]                            # the end of the page
                            eights[nd] += 1
                            if paybox[0] is None:
                                return out
                        except (TypeError, IndexError, struct.error):
                            out = None
                        finally:
                            give(True)
                        if out is not None:
                            pay = paybox[0]
                            if pay is not None:
                                pay(lat[nd] + 8 * per_byte[nd])
                            return out
                    return slow_read(addr, n)
                off = addr & mask
                if n > 0 and off + n <= ps and n is not True:
                    i = (addr >> shift) - base
                    if i >= 0:
                        take()
                        try:
                            # No translation: rtlb[i] is None (TypeError) or past the end.
                            out = rtlb[i][off : off + n].tobytes()
                            nd = tnode[i]
                            pages[nd] += 1
                            nbytes[nd] += n
                            if paybox[0] is None:
                                return out
                        except (TypeError, IndexError):
                            out = None
                        finally:
                            give(True)
                        if out is not None:
                            pay = paybox[0]
                            if pay is not None:  # outside the lock: shootdowns go on
                                pay(lat[nd] + n * per_byte[nd])
                            return out
            except TypeError:
                pass
            return slow_read(addr, n)

        def write(addr: int, data) -> None:
            t = type(data)
            if t is bytes or t is bytearray:
                n = len(data)
                try:  # (free unless raised) an address that is no integer: see read
                    off = addr & mask
                    if n > 0 and off + n <= ps:
                        i = (addr >> shift) - base
                        if i >= 0:
                            take()
                            try:
                                wtlb[i][off : off + n] = data  # None: TypeError, see read
                                nd = tnode[i]
                                pages[nd] += 1
                                nbytes[nd] += n
                                if paybox[0] is None:
                                    return
                            except (TypeError, IndexError):
                                nd = -1
                            finally:
                                give(True)
                            if nd >= 0:
                                pay = paybox[0]
                                if pay is not None:
                                    pay(lat[nd] + n * per_byte[nd])
                                return
                except TypeError:
                    pass
            slow_write(addr, data)

        self.read = read
        self.write = write
        if self._links:  # some nodes are reached through their data service
            from . import remote

            self.read = lambda addr, n: remote.read(self, addr, n)
            self.write = lambda addr, data: remote.write(self, addr, data)

    #: Pages one fault request of a vectorised access asks for at most.
    MAX_FAULT = MAX_REQUEST_PAGES

    def ndarray(self, mapping: Mapping, dtype: Any = np.int64, offset: int = 0,
                shape: tuple[int, ...] | int | None = None):
        """A view of ``mapping`` from ``offset`` as an array of ``dtype`` (``shape``: all of
        it as 1-D by default): ``a[idx]`` gathers and ``a[idx] = v`` scatters through the
        access path, vectorised, with exact per-element accounting (numaemu/ndarray.py)."""
        from .ndarray import TaskArray

        if not isinstance(mapping, Mapping) or mapping.task is not self:
            raise NumaError(errno.EINVAL, "ndarray needs a Mapping of this task")
        offset = argcheck.integer("offset", offset)
        if not 0 <= offset <= mapping.length:
            raise NumaError(errno.EINVAL, f"offset {offset} is outside the mapping")
        return TaskArray(self, mapping.addr + offset, mapping.length - offset, dtype, shape)

    def inject_delays(self, dilation: float | None) -> None:
        """Busy-wait each access's modeled cost times ``dilation`` (None: stop injecting),
        so that wall-clock timings show the model's ratios over Python's own overhead."""
        dilation = argcheck.dilation(dilation)
        with self._access_lock:
            self._pacer = Pacer(dilation) if dilation else None
            self._paybox[0] = self._pacer.pay if self._pacer is not None else None

    # -- the access path (documented forms; instances use the closures above) -------
    def read(self, addr: int, n: int) -> bytes:  # noqa: F811 (replaced per instance)
        """Read ``n`` bytes at virtual address ``addr`` (faults missing pages in)."""
        raise NotImplementedError

    def write(self, addr: int, data: bytes) -> None:  # noqa: F811
        """Write ``data`` (any bytes-like object) at virtual address ``addr``."""
        raise NotImplementedError

    def _span(self, addr: Any, n: Any) -> tuple[int, int, int, int, int]:
        """Check an access of ``n`` bytes at ``addr``; return (n, first and last+1 TLB index,
        the access's first byte in its first page and its end in its last) as plain ints."""
        if type(addr) is not int or type(n) is not int:
            addr, n = argcheck.integer("address", addr), argcheck.integer("length", n)
        if n < 0:
            raise NumaError(errno.EINVAL, f"negative length {n}")
        i0 = (addr >> self._shift) - self._base_vpn
        if addr < 0 or i0 < 0:
            raise NumaError(errno.EFAULT, f"address {addr:#x} is not mapped (SIGSEGV)")
        if addr + n > TASK_SIZE:
            raise NumaError(errno.EFAULT, f"{n} bytes at {addr:#x} go past the end of the "
                                          "address space (SIGSEGV)")
        i1 = ((addr + max(n, 1) - 1) >> self._shift) - self._base_vpn + 1
        mask = self.page_size - 1
        return n, i0, i1, addr & mask, ((addr + n - 1) & mask) + 1

    def _translated_access(self, i0: int, i1: int, write: bool, attempt) -> Any:
        """Run an access of TLB slots ``[i0, i1)`` (a ``write`` needs writable slots):
        ``attempt()`` runs under the access lock and returns ``(value, cost)``, or None when a
        slot lacks its translation; those are then faulted in with the lock released (rule
        1 of docs/design.md: the coordinator may be waiting for this client's shootdown
        ack) and the attempt repeats.  Pays the injected delay; returns the value.  The
        mapped, remote (numaemu/remote.py) and array paths all go through here."""
        lock = self._access_lock
        gone = None
        while True:
            lock.acquire()
            try:
                try:
                    done = attempt()
                except NodeUnreachable as exc:
                    gone = self._forget_node(exc, gone)
                    done = None
                if done is None:
                    missing = self._missing((self._wtlb if write else self._rtlb)[i0:i1],
                                            i0, i1)
            finally:
                lock.release()
            if done is not None:
                break
            if gone is not None:
                time.sleep(UNREACHABLE_PAUSE)
            self._fault(missing, write=write)
        value, cost = done
        if self._pacer is not None:
            self._pacer.pay(cost)
        return value

    def _forget_node(self, exc: NodeUnreachable, since: float | None) -> float:
        """An access found node ``exc.node``'s data service gone (lock held): drop every
        translation into that node, so that the access faults its pages in again.  The
        coordinator answers such a fault with EIO once it has taken the node offline (a
        poisoned page, as on the mapped path), or with the same translation while it still
        believes in the node: the access then retries, and after ``UNREACHABLE_RETRY``
        seconds of that gives up with ``exc``.  Returns when the retries began."""
        now = time.monotonic()
        if since is None:
            since = now
            log.info("task %d: node %d's data service is unreachable (%s); faulting again",
                     self.pid, exc.node, exc)
        elif now - since > UNREACHABLE_RETRY:
            raise exc
        hit = np.flatnonzero((self._nnode == exc.node) & (self._npfn != -1))
        self._clear(hit + self._base_vpn)
        return since

    def _translated(self, i0: int, i1: int, write: bool) -> bool:
        """Whether every slot of ``[i0, i1)`` has a translation (writable, for a write), by
        the numpy TLB; lock held."""
        k = i1 - i0
        if write:
            ok = self._nwrite[i0:i1]
            return len(ok) == k and np.count_nonzero(ok) == k
        pfns = self._npfn[i0:i1]
        return len(pfns) == k and not np.count_nonzero(pfns == -1)

    @staticmethod
    def _missing(ents: list, i0: int, i1: int) -> list[int]:
        """TLB indices of ``[i0, i1)`` without a translation (``ents`` is the TLB's slice),
        at most MAX_REQUEST_PAGES of them: one fault request."""
        missing = [i0 + k for k, e in enumerate(ents) if e is None][:MAX_REQUEST_PAGES]
        first = i0 + len(ents)
        missing += range(first, min(i1, first + MAX_REQUEST_PAGES - len(missing)))
        return missing

    def _account(self, i0: int, i1: int, first_off: int, last_end: int,
                 node: int = -1) -> float:
        """Charge an access of TLB slots ``[i0, i1)``, from byte ``first_off`` of the first
        page to byte ``last_end`` of the last, to the nodes its pages live on (``node``: all
        of them, when the caller knows); lock held.  Returns the delay owed when injecting."""
        ps = self.page_size
        if i1 - i0 == 1:
            node = self._tnode[i0]
        if node >= 0:
            first = last = node
            per_node = [(node, i1 - i0)]
        else:
            nodes = self._nnode[i0:i1]
            first, last = int(nodes[0]), int(nodes[-1])
            counts = np.bincount(nodes)
            per_node = [(nd, int(counts[nd])) for nd in np.flatnonzero(counts).tolist()]
        cost = 0.0
        lat, per_byte = self._lat_row, self._byte_row
        for nd, c in per_node:
            b = c * ps - (first_off if nd == first else 0) - (ps - last_end if nd == last else 0)
            self._pages_by_node[nd] += c
            self._bytes_by_node[nd] += b
            cost += c * lat[nd] + b * per_byte[nd]
        return cost

    def _layout(self, i0: int, i1: int, write: bool) -> tuple[int, int] | None:
        """``_placement`` of TLB slots ``[i0, i1)`` (two or more), or None when one of them
        has no translation (for a write: no writable one); lock held.  The last answer for
        each kind of access holds until the TLB changes (``_tlb_gen``): a loop over the
        same buffer pays for the checks once."""
        key = (self._tlb_gen, i0, i1)
        memo = self._layouts[write]
        if memo[0] == key:
            return memo[1]
        if not self._translated(i0, i1, write):
            return None
        layout = self._placement(i0, i1)
        self._layouts[write] = (key, layout)
        return layout

    def _placement(self, i0: int, i1: int) -> tuple[int, int]:
        """Where the pages of TLB slots ``[i0, i1)`` live, so that a copy can take them in
        one piece: (their node, or -1 when they are on several; their first frame when
        they are consecutive frames of that node, else -1).  Lock held; meaningful for
        slots with translations only (the caller checks that)."""
        nodes = self._nnode[i0:i1]
        node = int(nodes[0])
        if np.count_nonzero(nodes != node):
            return -1, -1
        pfns = self._npfn[i0:i1]
        first = int(pfns[0])
        if first < 0 or int(pfns[-1]) - first != i1 - i0 - 1 or \
                np.count_nonzero(pfns[1:] - pfns[:-1] != 1):
            return node, -1
        return node, first

    def _slow_read(self, addr: int, n: int) -> bytes:
        n, i0, i1, off, end = self._span(addr, n)
        if n == 0:
            return b""
        ps = self.page_size

        def attempt():
            if i1 - i0 == 1:
                if i0 < len(self._rtlb) and self._rtlb[i0] is not None:
                    return self._rtlb[i0][off:end].tobytes(), self._account(i0, i1, off, end)
                return None
            layout = self._layout(i0, i1, write=False)
            if layout is None:
                return None
            node, first = layout
            if first >= 0:  # consecutive frames: one slice
                start = first * ps + off
                out = self._views[node][start : start + n].tobytes()
            else:  # still one copy into the result, page by page in C
                ents = self._rtlb[i0:i1]
                ents[0] = ents[0][off:]
                ents[-1] = ents[-1][:end]
                out = b"".join(ents)
            return out, self._account(i0, i1, off, end, node)

        return self._translated_access(i0, i1, False, attempt)

    def _slow_write(self, addr: int, data) -> None:
        src = byte_view(data)
        n, i0, i1, off, end = self._span(addr, len(src))
        if n == 0:
            return

        def attempt():
            if i1 - i0 == 1:
                if i0 < len(self._wtlb) and self._wtlb[i0] is not None:
                    self._wtlb[i0][off:end] = src
                    return None, self._account(i0, i1, off, end)
                return None
            layout = self._layout(i0, i1, write=True)
            if layout is None:
                return None
            self._store(i0, i1, off, end, src, *layout)
            return None, self._account(i0, i1, off, end, layout[0])

        self._translated_access(i0, i1, True, attempt)

    def _store(self, i0: int, i1: int, off: int, end: int, src: memoryview, node: int,
               first: int) -> None:
        """Copy ``src`` into the frames of TLB slots ``[i0, i1)`` (two or more, all
        writable, laid out as ``_placement`` says), from byte ``off`` of the first page to
        byte ``end`` of the last; lock held.

        Consecutive frames take one slice copy; otherwise the pages in between are whole,
        and one numpy row copy per node moves them (about as fast), in page order as a loop
        would store them."""
        ps = self.page_size
        if first >= 0:
            start = first * ps + off
            self._views[node][start : start + len(src)] = src
            return
        wtlb = self._wtlb
        head = ps - off
        wtlb[i0][off:] = src[:head]
        if i1 - i0 > 2:
            body = np.frombuffer(src, dtype=np.uint8, count=(i1 - i0 - 2) * ps,
                                 offset=head).reshape(-1, ps)
            pfns, nodes = self._npfn[i0 + 1 : i1 - 1], self._nnode[i0 + 1 : i1 - 1]
            if node >= 0:
                self._segments[node].array[pfns] = body
            else:
                for nd in arrayops.values(nodes):
                    sel = nodes == nd
                    self._segments[nd].array[pfns[sel]] = body[sel]
        wtlb[i1 - 1][:end] = src[len(src) - end :]

    def _fault(self, indices: list[int], write: bool) -> None:
        """One fault request for all missing pages of an access; install the replies."""
        vpns = np.asarray(indices, dtype=np.int64) + self._base_vpn
        with self._req_lock:
            with self._access_lock:
                self._fault_pending = True
            try:
                reply = self._call("fault", vpns=vpns.astype(P.VPN), write=write)
            except BaseException:
                with self._access_lock:
                    self._fault_pending = False
                    self._inval_log.clear()
                raise
            got = np.frombuffer(reply["vpns"], dtype=P.VPN).astype(np.int64) - self._base_vpn
            nodes = np.frombuffer(reply["nodes"], dtype=P.NODE).tolist()
            pfns = np.frombuffer(reply["pfns"], dtype=P.PFN).tolist()
            prot = np.frombuffer(reply["prot"], dtype=P.PROT).tolist()
            with self._access_lock:
                self._fault_pending = False
                stale = set()
                for invalidated in self._inval_log:
                    stale.update((invalidated.astype(np.int64) - self._base_vpn).tolist())
                self._inval_log.clear()
                self._install(got.tolist(), nodes, pfns, prot, stale)
            waits = reply.get("waits", 0)
            t = self._totals
            t["faults"] += 1
            t["fault_ns"] += self._latency.fault_ns(len(got))
            t["migration_waits"] += waits
            t["migration_wait_ns"] += waits * MIGRATION_WAIT_NS

    def _install(self, idx: list[int], nodes, pfns, prot, stale: set) -> None:
        """Fill TLB entries (caller holds the access lock)."""
        self._tlb_gen += 1
        rtlb, wtlb, tnode = self._rtlb, self._wtlb, self._tnode
        need = max(idx) + 1 if idx else 0
        if need > len(rtlb):
            grow = need - len(rtlb)
            rtlb.extend([None] * grow)
            wtlb.extend([None] * grow)
            tnode.extend([self.node] * grow)
        if need > len(self._npfn):
            size = max(need, 2 * len(self._npfn))
            self._npfn = np.concatenate((self._npfn, np.full(size - len(self._npfn), -1)))
            self._nnode = np.concatenate((self._nnode,
                                          np.zeros(size - len(self._nnode), dtype=np.int64)))
            self._nwrite = np.concatenate((self._nwrite,
                                           np.zeros(size - len(self._nwrite), dtype=bool)))
        if idx:
            at = np.asarray(idx, dtype=np.int64)
            pr = np.asarray(prot, dtype=np.int64)
            keep = ~arrayops.isin(at, list(stale)) if stale else np.ones(len(at), dtype=bool)
            zero = (pr & P.PROT_ZERO) != 0
            self._npfn[at[keep]] = np.where(zero, ZERO_PFN, np.asarray(pfns))[keep]
            self._nnode[at[keep]] = np.where(zero, self.node, np.asarray(nodes))[keep]
            self._nwrite[at[keep]] = ((pr & P.PROT_WRITE) != 0)[keep] & ~zero[keep]
        ps = self.page_size
        views = self._views
        for i, nd, pfn, pr in zip(idx, nodes, pfns, prot):
            if i in stale:
                continue
            if pr & P.PROT_ZERO:
                rtlb[i] = self._zero
                wtlb[i] = None
                tnode[i] = self.node
                continue
            view = views.get(nd)
            mv = REMOTE if view is None else view[pfn * ps : (pfn + 1) * ps]
            rtlb[i] = mv
            wtlb[i] = mv if pr & P.PROT_WRITE else None
            tnode[i] = nd

    def _invalidate(self, vpns: np.ndarray, write_only: bool) -> None:
        """Called by the shootdown thread: drop entries once no access is in flight."""
        lock = self._access_lock
        lock.acquire_urgent()
        try:
            if self._fault_pending:
                self._inval_log.append(vpns)
            self._clear(vpns, write_only)
            self._totals["invalidations"] += 1
        finally:
            lock.release()

    def _clear(self, vpns: np.ndarray, write_only: bool = False) -> None:
        """Drop the TLB entries of ``vpns`` (sorted), one slice assignment per run of
        consecutive pages; the caller holds the access lock."""
        if len(vpns) == 0:
            return
        self._tlb_gen += 1
        idx = vpns.astype(np.int64) - self._base_vpn
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(idx)])).tolist()
        rtlb, wtlb = self._rtlb, self._wtlb
        size = len(rtlb)
        for a, b in zip(starts, ends):
            lo, hi = max(0, int(idx[a])), min(size, int(idx[b - 1]) + 1)
            if lo < hi:
                wtlb[lo:hi] = [None] * (hi - lo)
                self._nwrite[lo:hi] = False
                if not write_only:
                    rtlb[lo:hi] = [None] * (hi - lo)
                    self._npfn[lo:hi] = -1

    def _drop_vpns(self, vpns: np.ndarray | None) -> None:
        """Drop our translations of ``vpns`` (None: all of them)."""
        with self._access_lock:
            if vpns is None:
                vpns = np.arange(len(self._rtlb), dtype=np.int64) + self._base_vpn
            self._clear(arrayops.unique(vpns.astype(np.int64)))

    def _trim_tlb(self) -> None:
        """Shrink the TLB lists past their last translation (after munmap): they are sized
        by what is mapped, and the coordinator reuses freed address ranges."""
        with self._access_lock:
            rtlb, wtlb, tnode = self._rtlb, self._wtlb, self._tnode
            end = len(rtlb)
            while end and rtlb[end - 1] is None and wtlb[end - 1] is None:
                end -= 1
            del rtlb[end:], wtlb[end:], tnode[end:]
            self._tlb_gen += 1
            self._npfn, self._nnode, self._nwrite = (self._npfn[:end].copy(),
                                                     self._nnode[:end].copy(),
                                                     self._nwrite[:end].copy())

    def _drop_range(self, addr: int, length: int) -> None:
        """Drop our translations of ``[addr, addr + length)``."""
        with self._access_lock:
            # Clamped to the TLB first: the range may be far larger than anything mapped.
            i0 = max(0, (addr >> self._shift) - self._base_vpn)
            i1 = min(len(self._rtlb),
                     ((addr + length + self.page_size - 1) >> self._shift) - self._base_vpn)
            if i0 < i1:
                self._clear(np.arange(i0, i1, dtype=np.int64) + self._base_vpn)

    def _call(self, op: str, **fields) -> dict:
        if self._closed:
            raise ClusterError(f"task {self.pid} is closed")
        return self._conn.call(op, pid=self.pid, **fields)

    def _sync_call(self, op: str, **fields) -> dict:
        with self._req_lock:
            return self._call(op, **fields)

    # -- memory management -------------------------------------------------------
    def mmap(self, length: int, shared: str | None = None, file: str | os.PathLike | None = None,
             populate: bool = False) -> Mapping:
        """Map ``length`` bytes: private anonymous, a named shared object, or a real file."""
        length = argcheck.length("length", length, too_big=errno.ENOMEM)
        if shared is not None:
            shared = argcheck.shm_name(shared)
        path = argcheck.file_path(file) if file is not None else None
        reply = self._sync_call("mmap", length=length, shared=shared, file=path,
                                populate=argcheck.flag("populate", populate))
        return Mapping(self, reply["addr"], reply["length"])

    def munmap(self, addr: int, length: int) -> None:
        """Unmap ``[addr, addr+length)``; splits mappings it covers partly."""
        addr, length = argcheck.address("addr", addr), argcheck.length("length", length)
        with self._req_lock:
            self._drop_range(addr, length)
            self._call("munmap", addr=addr, length=length)
            self._trim_tlb()

    def msync(self, addr: int, length: int) -> int:
        """Write dirty pages of file-backed mappings in the range back to their files."""
        addr, length = argcheck.address("addr", addr), argcheck.length("length", length)
        return self._sync_call("msync", addr=addr, length=length)["written"]

    def shm_unlink(self, name: str) -> None:
        """Remove a named shared object; its pages go when the last mapping does."""
        self._sync_call("shm_unlink", name=argcheck.shm_name(name))

    # -- memory policy ---------------------------------------------------------------
    def set_mempolicy(self, mode: int, nodes: Iterable[int] | None = (), flags: int = 0) -> None:
        """The task policy for pages allocated from now on (``mode | flags``)."""
        mode, flags = argcheck.signed("mode", mode), argcheck.signed("flags", flags)
        self._sync_call("set_mempolicy", mode=mode, nodes=argcheck.nodemask(nodes),
                        flags=flags)

    def get_mempolicy(self, addr: int | None = None, flags: int = 0) -> tuple[int, set[int]]:
        """(mode or node, nodes) as get_mempolicy(2) reports them."""
        addr = None if addr is None else argcheck.address("addr", addr)
        reply = self._sync_call("get_mempolicy", addr=addr,
                                flags=argcheck.signed("flags", flags))
        return reply["mode"], set(reply["nodes"])

    def mbind(self, addr: int, length: int, mode: int, nodes: Iterable[int] | None = (),
              flags: int = 0) -> None:
        """Set the policy of ``[addr, addr+length)``."""
        addr, length = argcheck.address("addr", addr), argcheck.length("length", length)
        mode, flags = argcheck.signed("mode", mode), argcheck.signed("flags", flags)
        node_list = argcheck.nodemask(nodes)
        move = bool(flags & (MoveFlag.MOVE | MoveFlag.MOVE_ALL))
        with self._req_lock:
            if move and length > 0:
                self._drop_range(addr, length)  # see move_pages
            self._call("mbind", addr=addr, length=length, mode=mode, nodes=node_list,
                       flags=flags, flushed=move)

    def move_pages(self, pages: Iterable[int], nodes: Iterable[int] | None = None,
                   flags: int = 0, pid: int | None = None) -> MoveResult:
        """Per page: its node, or a negative errno (query mode when ``nodes`` is None).

        With ``nodes``, each page moves to its node; the result's ``not_migrated`` is the
        number of pages that could not be moved (move_pages(2)'s positive return)."""
        flags, pid = argcheck.signed("flags", flags), argcheck.optional_pid(pid)
        arr = argcheck.addresses(pages)
        node_list = None
        if nodes is not None:
            node_list = argcheck.target_nodes(nodes)
            if len(node_list) != len(arr):
                raise NumaError(errno.EINVAL, "nodes must give one node per page")
        mine = pid is None or pid == self.pid
        statuses: list[int] = []
        not_migrated = 0
        step = MAX_REQUEST_PAGES  # a request's worth at a time, as the kernel works in chunks
        for lo in range(0, max(len(arr), 1), step):
            chunk = arr[lo : lo + step]
            nodes_chunk = None if node_list is None else node_list[lo : lo + step]
            if not_migrated:  # an earlier chunk failed: the call stops; report the rest as is
                nodes_chunk = None
            with self._req_lock:
                if mine and nodes_chunk is not None:
                    # The local TLB flush: drop our own translations of these pages now, so
                    # the migration need not wait for our shootdown thread (we send nothing
                    # else until the reply, so nothing can bring them back meanwhile).
                    self._drop_vpns(chunk // self.page_size)
                reply = self._call("move_pages", target=pid, pages=chunk.astype(P.VPN),
                                   nodes=nodes_chunk, flags=flags,
                                   flushed=mine and nodes_chunk is not None)
            statuses += np.frombuffer(reply["status"], dtype=P.STATUS).tolist()
            if nodes_chunk is None and node_list is not None:
                not_migrated += len(chunk)
            else:
                not_migrated += reply.get("not_migrated", 0)
        return MoveResult(statuses, not_migrated)

    def migrate_pages(self, pid: int | None, old_nodes: Iterable[int],
                      new_nodes: Iterable[int]) -> int:
        """Move task ``pid``'s pages on ``old_nodes`` to ``new_nodes`` (relative placement);
        return the number of pages that could not be moved."""
        pid = argcheck.optional_pid(pid)
        old = argcheck.nodemask(old_nodes)
        # The kernel copies old_nodes first: if it cannot be read, that is the error.
        new = argcheck.nodemask(new_nodes) if old is not argcheck.UNREADABLE_NODES else []
        mine = pid is None or pid == self.pid
        with self._req_lock:
            if mine:
                self._drop_vpns(None)  # every translation: see move_pages
            reply = self._call("migrate_pages", target=pid, old_nodes=old, new_nodes=new,
                               flushed=mine)
        return reply["not_migrated"]

    def sysctl(self, name: str, value: int | None = None) -> int:
        """Read (or, privileged, set) a cluster tunable such as ``migrate_batch``."""
        name = argcheck.text("tunable", name, P.MAX_TEXT)
        value = None if value is None else argcheck.signed("value", value)
        return self._sync_call("sysctl", name=name, value=value)["value"]

    @contextmanager
    def pin(self, addr: int, length: int):
        """Hold references on the pages of the range (get_user_pages): they cannot migrate
        until the block ends."""
        addr, length = argcheck.address("addr", addr), argcheck.length("length", length)
        pin = self._sync_call("pin", addr=addr, length=length)["pin"]
        try:
            yield
        finally:
            if not self._closed:
                self._sync_call("unpin", pin=pin)

    def numa_maps(self, pid: int | None = None) -> str:
        """The task's ``/proc/<pid>/numa_maps`` text."""
        return self._conn_call_pid("numa_maps", argcheck.optional_pid(pid))["text"]

    def access_profile(self, pid: int | None = None, reset: bool = False) -> np.ndarray:
        """What NUMA hinting faults recorded (``Cluster.access_profile``), of task ``pid``
        or of every task this one may read (a privileged task: all)."""
        with self._req_lock:
            if self._closed:
                raise ClusterError(f"task {self.pid} is closed")
            reply = self._conn.call("access_profile", pid=argcheck.optional_pid(pid),
                                    reset=bool(reset))
        return profile_array(reply)

    def cluster_tasks(self) -> list[dict]:
        """Every task attached to the cluster: pid, cpu, cpuset, command, NUMA state."""
        with self._req_lock:
            return self._conn.call("tasks")["tasks"]

    def _conn_call_pid(self, op: str, pid: int | None) -> dict:
        with self._req_lock:
            if self._closed:
                raise ClusterError(f"task {self.pid} is closed")
            return self._conn.call(op, pid=self.pid if pid is None else pid)

    def sched_setaffinity(self, cpus: Iterable[int] | int) -> None:
        """Restrict the task to ``cpus``; the scheduler moves it if its CPU is not among them."""
        reply = self._sync_call("sched_setaffinity", cpus=argcheck.cpu_list(cpus))
        self._moved_to(reply["cpu"])

    def _moved_to(self, cpu: int) -> None:
        """The task runs on ``cpu`` now (its own sched_setaffinity, or the coordinator's
        ``resched`` when a cpuset moved it): later accesses are charged from its node."""
        if cpu not in self.topology.cpus:
            log.warning("task %d: told to run on unknown CPU %r", self.pid, cpu)
            return
        with self._access_lock:
            self._fold_stats()
            self.cpu, self.node = cpu, self.topology.node_of_cpu(cpu)
            self._set_latency_row()

    # -- statistics ----------------------------------------------------------------
    def _fold_stats(self) -> None:
        """Charge the counters since the last fold at the current CPU node (lock held)."""
        t = self._totals
        pages, nbytes, eights = self._pages_by_node, self._bytes_by_node, self._eights_by_node
        for j, count in enumerate(eights):
            pages[j] += count
            nbytes[j] += 8 * count
            eights[j] = 0
        t["access_ns"] += self._latency.cost_ns(self.node, pages, nbytes)
        row_pages, row_bytes = self._pair_pages[self.node], self._pair_bytes[self.node]
        for j in range(len(pages)):
            row_pages[j] += pages[j]
            row_bytes[j] += nbytes[j]
            pages[j] = 0
            nbytes[j] = 0

    def stats(self) -> dict:
        """What the task's accesses cost in the latency model.

        ``local_accesses``/``remote_accesses`` count pages touched by accesses (an access
        spanning k pages counts k), ``*_bytes`` the bytes; ``accesses_by_pair`` and
        ``bytes_by_pair`` split them by [CPU node][memory node].  ``vtime_ns`` is the
        virtual clock: ``access_ns`` + ``fault_ns`` + ``migration_wait_ns``.  ``faults``
        counts fault requests, ``migration_waits`` faults that waited on a page under
        migration, ``injected_ns`` the real time spent in delay injection.  A task that
        reaches nodes through their data service (numaemu/remote.py) is charged the same;
        ``data_requests`` counts its requests to data services and ``data_ns`` the real time
        they took (the network, not the model).
        """
        with self._access_lock:
            self._fold_stats()
            out = dict(self._totals)
            pp = [list(row) for row in self._pair_pages]
            pb = [list(row) for row in self._pair_bytes]
            if self._pacer is not None:
                out["injected_ns"] = self._pacer.injected_ns
        out["local_accesses"] = sum(pp[i][i] for i in range(len(pp)))
        out["remote_accesses"] = sum(map(sum, pp)) - out["local_accesses"]
        out["local_bytes"] = sum(pb[i][i] for i in range(len(pb)))
        out["remote_bytes"] = sum(map(sum, pb)) - out["local_bytes"]
        out["vtime_ns"] = out["access_ns"] + out["fault_ns"] + out["migration_wait_ns"]
        out["accesses_by_pair"] = pp
        out["bytes_by_pair"] = pb
        return out

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Detach from the cluster; the task's memory is freed."""
        if self._closed:
            return
        self._teardown(detach=True)

    def _teardown(self, detach: bool) -> None:
        # No access may touch the frames once they can be freed: clear the TLB first.
        with self._access_lock:
            self._rtlb.clear()
            self._wtlb.clear()
            self._npfn[:] = -1
            self._nwrite[:] = False
            self._tlb_gen += 1
        shootdown = getattr(self, "_shootdown", None)
        if shootdown is not None:
            shootdown.stop()
        if detach and not self._closed:
            with suppress(ClusterError, NumaError), self._req_lock:
                self._conn.call("detach", pid=self.pid, timeout=10)
        self._closed = True
        self._conn.close()
        with self._access_lock:
            self._rtlb.clear()
            self._wtlb.clear()
            self._npfn[:] = -1
            self._nwrite[:] = False
            self._tlb_gen += 1
        for view in self._views.values():
            view.release()
        self._views.clear()
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        for link in self._links.values():
            link.close()
        self._links.clear()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with suppress(Exception):
                self._teardown(detach=False)

    def __repr__(self) -> str:
        return f"Task(pid={self.pid}, cpu={self.cpu}, node={self.node})"


class _Shootdown(threading.Thread):
    """The task's shootdown thread (the emulated IPI handler), with its own socket."""

    def __init__(self, task: Task, endpoint: str) -> None:
        super().__init__(name=f"numaemu-shootdown-{task.pid}", daemon=True)
        self.task = task
        self.endpoint = endpoint
        self._halt = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def start_and_wait(self) -> None:
        # A busy client acks in ~0.5 ms instead of ~5.6 ms with a short switch interval.
        if sys.getswitchinterval() > 1e-4:
            sys.setswitchinterval(1e-4)
        self.start()
        if not self._ready.wait(10) or self.error is not None:
            self.stop()
            raise ClusterError(f"shootdown channel to {self.endpoint} failed: {self.error}")

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(3)

    def run(self) -> None:
        sock = context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.task._keys is not None:
                self.task._keys.client(sock)
            sock.connect(self.endpoint)
            sock.send(P.encode_request(P.TlbHello(pid=self.task.pid), 1))
            if not sock.poll(10000):
                raise ClusterError("no answer to tlb_hello")
            reply = P.unpack(sock.recv())
            if not reply.get("ok"):
                raise ClusterError(reply.get("error"))
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            sock.close(0)
            return
        self._ready.set()
        heartbeat = P.encode_request(P.Heartbeat(pid=self.task.pid), 0)
        next_beat = time.monotonic() + HEARTBEAT
        try:
            while not self._halt.is_set():
                # Short polls so that close() is prompt; heartbeats once a second.
                if sock.poll(STOP_POLL_MS):
                    raw = sock.recv()
                    try:
                        obj = P.unpack(raw)
                        req = P.decode_request(obj)
                        if req.op == "resched":
                            self.task._moved_to(req.cpu)
                            continue
                        if req.op != "invalidate":
                            raise P.ProtocolError(f"unexpected {req.op}")
                        self.task._invalidate(req.vpns, req.write_only)
                        sock.send(P.ok_reply(obj.get("seq")))
                    except P.ProtocolError as exc:
                        log.warning("task %d: bad shootdown message: %s", self.task.pid, exc)
                elif time.monotonic() >= next_beat:
                    sock.send(heartbeat, zmq.NOBLOCK)
                    next_beat = time.monotonic() + HEARTBEAT
        except zmq.ZMQError:
            pass
        finally:
            sock.close(0)


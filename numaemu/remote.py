"""The remote data path: a task's accesses to nodes whose memory it does not map.

A client on another host cannot map a node's segment; with ``data_path="remote"``
(``Cluster(..., data_path=...)``, ``numaemu.attach(..., data_path=...)`` or
``NUMAEMU_DATA_PATH=remote``) a client on the nodes' host does not either, so that every
test can exercise this path on one machine.  Such a task reads and writes those nodes'
frames through each node's *data service* (the ROUTER bound by nodes/node.py, serving
``read_frames``/``write_frames``/``read_elements``/``write_elements``), in the ZeroMQ
guide's request-reply through ROUTER and DEALER: one DEALER per node (a
``transport.Connection``), used only under the task's access lock, so one thread at a time.

What changes against the mapped path, and what does not:

* the TLB caches translations ``(node, frame)`` (the task's numpy TLB: ``_npfn``,
  ``_nnode``, ``_nwrite``), not memory; faults, migration waits and accounting are the
  mapped path's (``Task._fault``, ``Task._account``: the same counters);
* an access sends at most one request per node it touches: the node's frames of the access,
  in access order, as one packed frame list, and their bytes (``offset``/``length`` trim
  the first and last page, so a partial write leaves the rest of its frames alone: a
  read-modify-write of whole pages would lose another client's write to the same page).
  The bytes travel as a data frame beside the request's or reply's msgpack header
  (numaemu/protocol.py): a big write is handed to zmq without a copy, and a read is copied
  once, from zmq's buffer into the result.
  Only an access of more than ``P.MAX_FRAME_DATA`` (16 MiB) to one node takes more
  messages.  All requests are sent, then all replies awaited;
* the TLB shootdown is unchanged: the access holds the access lock from its TLB lookup
  until every reply is in, and the shootdown thread takes that lock before it drops
  translations and acknowledges, so an acknowledgement still means no access to those
  frames is in flight (docs/design.md, "The client access path and TLB shootdown");
* waits are bounded (``DATA_TIMEOUT``, under the coordinator's client lease: a
  shootdown may be waiting for this access), and a node that went away or refuses is a
  ``ClusterError`` or ``NumaError``, never a hang.

The real time spent on the wire is counted apart from the model: ``data_requests`` and
``data_ns`` in ``Task.stats()``.
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager

import numpy as np

from . import protocol as P
from .errors import ClusterError, NodeUnreachable, NumaError
from .keys import Keys
from .task import ZERO_PFN, byte_view
from .transport import Connection

#: How long an access waits for a node's data service.  The access lock is held meanwhile and
#: a shootdown may be waiting for it: this stays under the coordinator's client lease (10 s).
DATA_TIMEOUT = 5.0
#: How long a first connection to a data service may take.
DATA_CONNECT_TIMEOUT = 5.0

DATA_PATHS = ("auto", "local", "remote")

def data_path_setting(data_path: str | None) -> str:
    """``data_path`` (None: $NUMAEMU_DATA_PATH, else ``auto``), checked."""
    if data_path is None:
        data_path = os.environ.get("NUMAEMU_DATA_PATH") or "auto"
    if data_path not in DATA_PATHS:
        raise NumaError(errno.EINVAL, f"data_path must be one of {', '.join(DATA_PATHS)}, "
                                      f"not {data_path!r}")
    return data_path


@contextmanager
def _serving(node: int):
    """Name the node whose data service failed: a ``ClusterError`` of its connection
    becomes ``NodeUnreachable(node)``, which the access path answers by faulting again
    (``Task._translated_access``)."""
    try:
        yield
    except NodeUnreachable:
        raise
    except ClusterError as exc:
        raise NodeUnreachable(node, str(exc)) from None


def connect(node: int, endpoint: str, keys: str | Keys | None) -> Connection:
    """A connection to node ``node``'s data service."""
    if not endpoint:
        raise ClusterError(f"node {node} has no data endpoint")
    return Connection(endpoint, keys=keys, connect_timeout=DATA_CONNECT_TIMEOUT,
                      peer=f"node {node}'s data service")


def read(task, addr: int, n: int) -> bytes:
    """``task.read`` of a task with remote nodes."""
    n, i0, i1, off, end = task._span(addr, n)
    if n == 0:
        return b""

    if i1 - i0 == 1:  # the common case, without the numpy work of many pages
        def attempt():
            npfn = task._npfn
            if i0 >= len(npfn) or npfn[i0] == -1:
                return None
            return page(task, i0, off, end, None), task._account(i0, i1, off, end)
    else:
        def attempt():
            if not task._translated(i0, i1, write=False):
                return None
            return transfer(task, i0, i1, off, end, None), task._account(i0, i1, off, end)

    return task._translated_access(i0, i1, False, attempt)


def write(task, addr: int, data) -> None:
    """``task.write`` of a task with remote nodes."""
    src = byte_view(data)
    n, i0, i1, off, end = task._span(addr, len(src))
    if n == 0:
        return

    if i1 - i0 == 1:
        def attempt():
            nwrite = task._nwrite
            if i0 >= len(nwrite) or not nwrite[i0]:
                return None
            page(task, i0, off, end, src)
            return None, task._account(i0, i1, off, end)
    else:
        def attempt():
            if not task._translated(i0, i1, write=True):
                return None
            transfer(task, i0, i1, off, end, src)
            return None, task._account(i0, i1, off, end)

    task._translated_access(i0, i1, True, attempt)


def page(task, i: int, off: int, end: int, src: memoryview | None):
    """``transfer`` of bytes ``[off, end)`` of the page of TLB slot ``i`` (translated; lock
    held): one request, built without the pieces' numpy work (a 4 KiB access costs a round
    trip and little more)."""
    node = int(task._nnode[i])
    conn = task._links.get(node)
    if conn is None:  # a node this task maps
        return transfer(task, i, i + 1, off, end, src)
    pfns = task._npfn[i : i + 1]
    if src is None:
        if pfns[0] == ZERO_PFN:  # the zero page: no frame, zeros
            return bytes(end - off)
        req = P.ReadFrames(pfns=pfns, offset=off, length=end - off)
    else:
        req = P.WriteFrames(pfns=pfns, data=src, offset=off)
    started = time.perf_counter()
    with _serving(node):
        reply = conn.wait(conn.send(req), req.op, timeout=DATA_TIMEOUT)
    t = task._totals
    t["data_requests"] += 1
    t["data_ns"] += (time.perf_counter() - started) * 1e9
    if src is None:
        return bytes(_data(reply, end - off, conn))  # the one copy, out of zmq's buffer
    return None


def _data(reply: dict, length: int, conn: Connection) -> memoryview:
    """A read reply's data frame (zmq's buffer, not copied), checked against the ``length``
    asked for."""
    data = reply.get("data")
    if data is None or len(data) != length:
        raise ClusterError(f"{conn.peer} answered a read of {length} bytes with "
                           f"{'none' if data is None else len(data)}")
    return data


def _parts(task, i0: int, i1: int, off: int, end: int, skip_zero: bool):
    """The pieces of an access of TLB slots ``[i0, i1)`` (from byte ``off`` of the first page
    to byte ``end`` of the last), one per node (more past ``P.MAX_FRAME_DATA``): (node,
    page indices within the access, their frames, offset in the first page, length)."""
    ps, k = task.page_size, i1 - i0
    nodes, pfns = task._nnode[i0:i1], task._npfn[i0:i1]
    step = P.frames_per_message(ps)
    for nd in _values(nodes):
        sel = np.arange(k) if nodes[0] == nodes[-1] and not np.count_nonzero(nodes != nd) \
            else np.flatnonzero(nodes == nd)
        if skip_zero:  # the zero page: no frame, zeros
            sel = sel[pfns[sel] != ZERO_PFN]
        for lo in range(0, len(sel), step):
            c = sel[lo : lo + step]
            head = off if c[0] == 0 else 0
            length = len(c) * ps - head - (ps - end if c[-1] == k - 1 else 0)
            yield nd, c, pfns[c], head, length


def _values(nodes: np.ndarray) -> list[int]:
    first = int(nodes[0])
    if not np.count_nonzero(nodes != first):
        return [first]
    return np.flatnonzero(np.bincount(nodes)).tolist()


def transfer(task, i0: int, i1: int, off: int, end: int, src: memoryview | None):
    """Copy the bytes of an access (all pages translated; lock held) from the frames
    (``src`` None: returns them) or into them (``src``): one request per remote node, all
    sent before any reply is awaited; mapped nodes of the task are copied in place."""
    from nodes.segment import load_frames, store_frames

    ps, k = task.page_size, i1 - i0
    n = k * ps - off - (ps - end)
    links, segments = task._links, task._segments
    started = time.perf_counter()
    pending = []
    placed = []  # (page indices, offset in the first page, bytes): read pieces to assemble
    padded = None  # a write's data laid out page by page, for pieces that are not one run
    for nd, c, pfns, head, length in _parts(task, i0, i1, off, end, skip_zero=src is None):
        run = int(c[-1]) - int(c[0]) == len(c) - 1
        if src is None:
            conn = links.get(nd)
            if conn is None:
                placed.append((c, head, load_frames(segments[nd].array, pfns, head, length)))
            else:
                req = P.ReadFrames(pfns=pfns, offset=head, length=length)
                with _serving(nd):
                    pending.append((nd, conn, conn.send(req), req.op, c, head, length))
            continue
        if run:
            start = int(c[0]) * ps + head - off
            data = src[start : start + length]
        else:
            if padded is None:
                padded = np.empty(k * ps, dtype=np.uint8)
                padded[off : off + n] = src
            data = memoryview(padded.reshape(k, ps)[c].reshape(-1)[head : head + length])
        conn = links.get(nd)
        if conn is None:
            store_frames(segments[nd].array, pfns, head, data)
        else:
            req = P.WriteFrames(pfns=pfns, data=data, offset=head)
            with _serving(nd):
                pending.append((nd, conn, conn.send(req), req.op, c, head, length))
    for nd, conn, seq, op, c, head, length in pending:
        with _serving(nd):
            reply = conn.wait(seq, op, timeout=DATA_TIMEOUT)
        if src is None:  # zmq's buffer: copied once, into the result
            placed.append((c, head, _data(reply, length, conn)))
    if pending:
        t = task._totals
        t["data_requests"] += len(pending)
        t["data_ns"] += (time.perf_counter() - started) * 1e9
    if src is not None:
        return None
    if len(placed) == 1 and len(placed[0][0]) == k:  # one piece: the whole access
        return bytes(placed[0][2])
    buf = np.zeros(k * ps, dtype=np.uint8)  # zero pages stay zeros
    for c, head, data in placed:
        piece = np.frombuffer(data, dtype=np.uint8)
        if int(c[-1]) - int(c[0]) == len(c) - 1:
            start = int(c[0]) * ps + head
            buf[start : start + len(piece)] = piece
        else:
            rows = np.empty(len(c) * ps, dtype=np.uint8)
            rows[head : head + len(piece)] = piece  # (the rest is outside the access)
            buf.reshape(k, ps)[c] = rows.reshape(-1, ps)
    return buf[off : off + n].tobytes()


def elements(task, node: int, elem: np.ndarray, itemsize: int, data: np.ndarray | None = None):
    """Send an array gather (``data`` None) or scatter of items at positions ``elem`` of
    node ``node``'s memory (as items of ``itemsize`` bytes); lock held.  Returns a function
    that waits for the replies and, for a gather, returns the items' bytes (a bytes-like
    object): the caller sends to every node before it waits."""
    conn = task._links[node]
    step = P.elements_per_message(itemsize)
    pending = []
    started = time.perf_counter()
    for lo in range(0, max(len(elem), 1), step):
        part = elem[lo : lo + step]
        if data is None:
            req = P.ReadElements(elements=part.astype(P.PFN, copy=False), itemsize=itemsize)
        else:
            values = np.ascontiguousarray(data[lo : lo + step])
            req = P.WriteElements(elements=part.astype(P.PFN, copy=False), itemsize=itemsize,
                                  data=memoryview(values).cast("B"))
        with _serving(node):
            pending.append(conn.send(req))

    def finish() -> bytes | None:
        with _serving(node):
            out = [conn.wait(seq, "read_elements" if data is None else "write_elements",
                             timeout=DATA_TIMEOUT) for seq in pending]
        t = task._totals
        t["data_requests"] += len(pending)
        t["data_ns"] += (time.perf_counter() - started) * 1e9
        if data is None:  # one message: zmq's buffer, for the caller to copy where it goes
            return out[0]["data"] if len(out) == 1 else b"".join(r["data"] for r in out)
        return None

    return finish

"""Property-based fuzzing of argument values: the public Task API and the raw wire protocol.

(a) Every public ``Task`` method gets arbitrary values (integers of any size, floats,
    None, text, bytes, lists, nested junk, and values near the real mapping so that
    calls also get deep).  The only exception allowed is ``NumaError`` with an errno that
    call can give; a failed call changes nothing (numa_maps, policies, page placement, a
    data pattern); the cluster's invariants hold after every call.
(b) A raw DEALER sends the coordinator's rpc socket arbitrary msgpack: known ops with
    random field values, unknown ops, non-map payloads, random bytes, multi-frame
    messages.  A request gets an ok or an errno reply (never the generic "coordinator
    error"), the coordinator keeps answering ``ping``, and an observer task's state and
    the invariants are unchanged.
(c) A raw DEALER sends a node's data endpoint arbitrary multipart messages: a header
    (data ops with random fields, other ops, junk) with or without a data frame, whose
    length the header may state wrongly, and extra frames.  Each gets at most one reply,
    ok or EINVAL/EPERM (never the generic "node error"); the node keeps answering
    ``ping``; and its memory changes only under a write that was answered ok.

They run on clusters of their own (module scope): a call that succeeds by chance (a
mapping, a pin, a shared object, a write into a free frame) must not leak into the
session's ``cluster``.
"""

from __future__ import annotations

import errno
import os

import msgpack
import numpy as np
import pytest
import zmq
from conftest import cluster_is_gone, small_topology
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import numaemu
from coordinator.syscalls import Syscalls
from nodes.node import DATA_OPS
from numaemu import MAX_NUMNODES, MPOL_BIND, MPOL_INTERLEAVE, NumaError
from numaemu import protocol as P
from numaemu.constants import TASK_SIZE

PS = numaemu.PAGE_SIZE
MMAP_BASE = 0x7F0000000000  # a fresh task's first mapping starts here (coordinator.mm)
PAGES = 4

#: Bounded so that the file runs in a few seconds; NUMAEMU_FUZZ_EXAMPLES=2000 digs deeper.
FUZZ = settings(max_examples=int(os.environ.get("NUMAEMU_FUZZ_EXAMPLES", 100)), deadline=None,
                database=None,  # no .hypothesis/ directory in the work tree
                suppress_health_check=[HealthCheck.function_scoped_fixture,  # the autouse check
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def cluster():
    """This module's own 2-node cluster (named like conftest's, so that its per-test
    invariant check applies here too)."""
    with numaemu.Cluster(small_topology()) as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


# -- values ----------------------------------------------------------------------------------

EDGES = [0, 1, -1, 2, 3, PS - 1, PS, MAX_NUMNODES - 1, MAX_NUMNODES, 2**31, 2**32, 2**62,
         2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 2**70, -(2**70),
         TASK_SIZE, MMAP_BASE]
ints = st.one_of(st.integers(), st.sampled_from(EDGES), st.integers(-4, 8))
#: Addresses in and around the first mapping of a fresh task.
near = st.integers(MMAP_BASE - 2 * PS, MMAP_BASE + (PAGES + 2) * PS)
addrs = st.one_of(near, near.map(lambda a: a & ~(PS - 1)), ints)
leaves = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=12),
                   st.binary(max_size=12), st.complex_numbers())
junk = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.tuples(kids, kids), st.frozensets(st.integers(-3, 3)),
    st.dictionaries(st.text(max_size=4), kids, max_size=3)), max_leaves=8)
node_lists = st.one_of(st.lists(st.integers(0, 1), max_size=3),
                       st.lists(st.one_of(st.integers(-2, 4), ints), max_size=5),
                       st.just([0] * (MAX_NUMNODES + 1)), junk)
modes = st.one_of(st.integers(0, 6), st.integers(0, 6), st.integers(-1, 8), ints)
names = st.one_of(st.text(max_size=20), st.text(max_size=300),
                  st.sampled_from(["", ".", "..", "a/b", "a\0b", "x" * 255, "x" * 256,
                                   "\u00e9" * 128, "\ud800"]))


def mostly(typed, other, times: int = 4):
    """``typed`` ``times`` as often as ``other`` (``one_of`` alone favours its first)."""
    return st.sampled_from([typed] * times + [other]).flatmap(lambda strategy: strategy)


def values(*typed):
    """A value that is mostly of the argument's own kind (so that calls get past their
    first check), sometimes anything at all."""
    return mostly(st.one_of(*typed), junk)


def _paths(tmp: str):
    # Only paths inside an empty scratch directory: no existing file may get mapped and
    # written back.  Relative text would resolve against the test's cwd, so none is drawn.
    def inside(name: str) -> str:
        return os.path.join(tmp, name.lstrip("/").replace("..", "__"))

    return st.one_of(
        st.none(), ints, junk.filter(lambda v: not isinstance(v, (str, bytes))),
        names.map(inside), names.map(lambda n: os.fsencode(inside(n.replace("\ud800", "")))))


def call_strategies(tmp: str) -> dict:
    """method name -> strategy of (args, kwargs)."""
    args = st.tuples
    kw = st.fixed_dictionaries
    return {
        "mmap": st.tuples(args(values(ints)), kw({}, optional={
            "shared": values(names), "file": _paths(tmp), "populate": values(st.booleans())})),
        "munmap": st.tuples(args(values(addrs), values(ints)), kw({})),
        "msync": st.tuples(args(values(addrs), values(ints)), kw({})),
        "read": st.tuples(args(values(addrs), values(st.integers(-2, 3 * PS), ints)), kw({})),
        "write": st.tuples(args(values(addrs), values(st.binary(max_size=2 * PS))), kw({})),
        "mbind": st.tuples(args(values(addrs), values(ints), values(modes)),
                           kw({}, optional={"nodes": node_lists,
                                            "flags": values(st.integers(-1, 8), ints)})),
        "set_mempolicy": st.tuples(args(values(modes)), kw({}, optional={
            "nodes": node_lists, "flags": values(ints)})),
        "get_mempolicy": st.tuples(args(), kw({}, optional={
            "addr": values(addrs), "flags": values(st.integers(-1, 8), ints)})),
        "move_pages": st.tuples(args(values(st.lists(addrs, max_size=6))), kw({}, optional={
            "nodes": values(st.lists(st.one_of(st.integers(-1, 3), ints), max_size=6)),
            "flags": values(st.integers(-1, 8)), "pid": values(ints)})),
        "migrate_pages": st.tuples(args(values(st.none(), ints), node_lists, node_lists),
                                   kw({})),
        "pin": st.tuples(args(values(addrs), values(ints)), kw({})),
        "sched_setaffinity": st.tuples(args(values(st.integers(-1, 5), node_lists)), kw({})),
        "shm_unlink": st.tuples(args(values(names)), kw({})),
        "numa_maps": st.tuples(args(), kw({}, optional={"pid": values(ints)})),
        "sysctl": st.tuples(args(values(names, st.just("migrate_batch"))),
                            kw({}, optional={"value": values(ints)})),
        "inject_delays": st.tuples(args(values(st.none(), st.floats(), ints)), kw({})),
    }


#: What each call may fail with: its Linux errnos, never EIO from a coordinator error.
ERRNOS = {
    "mmap": {errno.EINVAL, errno.ENOMEM, errno.ENAMETOOLONG, errno.ENOENT, errno.ENODEV,
             errno.EACCES, errno.ENOTDIR},
    "munmap": {errno.EINVAL},
    "msync": {errno.EINVAL, errno.ENOMEM},
    "read": {errno.EINVAL, errno.EFAULT},
    "write": {errno.EINVAL, errno.EFAULT},
    "mbind": {errno.EINVAL, errno.EFAULT, errno.EPERM, errno.EIO},
    "set_mempolicy": {errno.EINVAL, errno.EFAULT},
    "get_mempolicy": {errno.EINVAL, errno.EFAULT},
    "move_pages": {errno.EINVAL, errno.EFAULT, errno.EPERM, errno.ESRCH, errno.ENODEV,
                   errno.EACCES},
    "migrate_pages": {errno.EINVAL, errno.EFAULT, errno.EPERM, errno.ESRCH},
    "pin": {errno.EINVAL, errno.EFAULT},
    "sched_setaffinity": {errno.EINVAL, errno.EFAULT},
    "shm_unlink": {errno.EINVAL, errno.ENOENT, errno.ENAMETOOLONG},
    "numa_maps": {errno.EINVAL, errno.ESRCH},
    "sysctl": {errno.EINVAL, errno.ENOENT, errno.EPERM},
    "inject_delays": {errno.EINVAL},
}
#: Calls that change nothing even when they succeed.
READ_ONLY = {"read", "get_mempolicy", "numa_maps"}


# -- (a) the public Task API --------------------------------------------------------------------


class Scene:
    """A task with a task policy, an mbind policy, pages on both nodes and a data pattern."""

    def __init__(self, cluster) -> None:
        self.task = t = cluster.attach(cpu=0)
        t.set_mempolicy(MPOL_INTERLEAVE, [0, 1])
        self.m = t.mmap(PAGES * PS)
        assert self.m.addr == MMAP_BASE
        t.mbind(self.m.page(2), PS, MPOL_BIND, [1])
        self.pattern = bytes(range(256)) * (PS // 256) + b"tail"
        t.write(self.m.addr, self.pattern)
        self.dirty = False

    def snapshot(self):
        t = self.task
        return (t.numa_maps(), t.get_mempolicy(), t.move_pages(self.m.pages),
                t.read(self.m.addr, len(self.pattern)))

    def close(self) -> None:
        self.task.close()


def _invoke(task, name: str, args: tuple, kwargs: dict):
    if name == "pin":
        with task.pin(*args, **kwargs):
            return None
    return getattr(task, name)(*args, **kwargs)


@pytest.fixture(scope="module")
def scenes(cluster):
    """The current scene, replaced by a fresh one after a call that changed it."""
    holder = {"scene": Scene(cluster)}
    yield holder
    holder["scene"].close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz-files"))


@FUZZ
@given(data=st.data())
def test_task_api_raises_only_numa_error_and_failures_change_nothing(cluster, scenes, scratch,
                                                                     data):
    scene = scenes["scene"]
    if scene.dirty:
        scene.close()
        scene = scenes["scene"] = Scene(cluster)
    strategies = call_strategies(scratch)
    name = data.draw(st.sampled_from(sorted(strategies)), label="method")
    args, kwargs = data.draw(strategies[name], label="arguments")
    before = scene.snapshot()
    try:
        _invoke(scene.task, name, args, kwargs)
    except NumaError as exc:
        event(f"{name}: {exc.errname}")
        assert exc.errno in ERRNOS[name], f"{name}: {exc!r}"
        assert "coordinator error" not in str(exc), exc
        assert scene.snapshot() == before, f"a failed {name} changed the task"
    else:
        event(f"{name}: ok")
        scene.dirty = name not in READ_ONLY or scene.snapshot() != before
    assert cluster.check() == []


# -- (b) the wire protocol ------------------------------------------------------------------------

#: Ops left out: ``shutdown`` stops the cluster, ``attach``/``detach`` add and remove tasks,
#: ``inject_fault`` arms node failures for later requests: all of them legitimately.
SKIPPED_OPS = {"shutdown", "attach", "detach", "inject_fault"}
WIRE_INT = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from(
    [e for e in EDGES if -(2**63) <= e < 2**64]), st.integers(-4, 8))
wire_leaves = st.one_of(st.none(), st.booleans(), WIRE_INT, st.floats(), st.text(max_size=12),
                        st.binary(max_size=16))
wire_junk = st.recursive(wire_leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=8)
vpn_arrays = st.lists(st.one_of(near, near.map(lambda a: a // PS), WIRE_INT.filter(
    lambda v: v >= 0)), max_size=8).map(lambda xs: np.array(xs, dtype="<u8").tobytes())


def _wire_fields(op: str, pids) -> st.SearchStrategy:
    """Random values for ``op``'s fields: mostly of the field's kind, sometimes anything;
    some fields left out, an extra one now and then."""
    near_kind = {
        "pid": pids, "target": st.one_of(st.none(), pids),
        "mode": st.one_of(st.integers(0, 6), st.integers(0, 6), WIRE_INT),
        "flags": st.one_of(st.integers(0, 7), WIRE_INT), "node": st.integers(-1, 3),
        "addr": st.one_of(near, WIRE_INT), "length": WIRE_INT,
        "vpns": vpn_arrays, "pages": vpn_arrays,
        "nodes": st.one_of(st.lists(WIRE_INT, max_size=5), st.just([0] * 1025), wire_junk),
        "cpus": st.one_of(st.lists(WIRE_INT, max_size=5), st.just([0] * 1025)),
        "shared": st.one_of(st.none(), names.filter(lambda n: "\ud800" not in n)),
        "name": names.filter(lambda n: "\ud800" not in n),
        # relative text only (EINVAL before anything is opened): an absolute path could
        # name an existing file, which must never get mapped and written back
        "file": st.one_of(st.none(), st.text(max_size=20).filter(
            lambda p: not p.startswith("/"))),
        "write": st.booleans(), "flushed": st.booleans(), "populate": st.booleans(),
    }
    near_kind["old_nodes"] = near_kind["new_nodes"] = near_kind["nodes"]
    fields = {}
    for name, _kind, _field in P.REQUESTS[op]._fields:
        typed = near_kind.get(name, WIRE_INT)
        fields[name] = mostly(typed, wire_junk, times=8)
    envelope = {"op": st.just(op), "seq": st.one_of(WIRE_INT, WIRE_INT, wire_junk)}
    every_field = st.fixed_dictionaries({**envelope, **fields}, optional={"extra": wire_junk})
    some_fields = st.fixed_dictionaries(envelope, optional=fields)
    return mostly(every_field, some_fields)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _messages(pids):
    syscalls = sorted(set(Syscalls(None, None).handlers) - SKIPPED_OPS)
    others = sorted(set(P.REQUESTS) - set(syscalls) - SKIPPED_OPS)  # node and tlb ops
    ops = mostly(st.sampled_from(syscalls), st.sampled_from(others))
    requests = ops.flatmap(lambda op: _wire_fields(op, pids)).map(
        lambda body: ("request", [_pack(body)]))
    unknown = st.fixed_dictionaries({"op": st.one_of(st.text(max_size=12), wire_junk),
                                     "seq": WIRE_INT}).map(lambda b: ("request", [_pack(b)]))
    not_maps = wire_junk.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: ("junk", [_pack(v)]))
    raw = st.binary(max_size=64).map(lambda b: ("junk", [b]))
    multi = st.lists(st.one_of(st.binary(max_size=16), requests.map(lambda r: r[1][0])),
                     min_size=2, max_size=3).map(lambda frames: ("junk", frames))
    return mostly(requests, st.one_of(unknown, not_maps, raw, multi), times=3)


class RawClient:
    """A bare DEALER on the rpc socket."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.ping_seq = 10**9

    def exchange(self, frames: list[bytes], want: int, timeout: float = 10.0) -> list[dict]:
        """Send ``frames``, then a ping; return the replies other than the pong, once the
        pong and at least ``want`` of them came (each request runs on its own, so a slow
        one, e.g. ``check``, may answer after the ping)."""
        self.sock.send_multipart(frames)
        self.ping_seq += 1
        self.sock.send(_pack({"op": "ping", "seq": self.ping_seq}))
        replies, pong = [], False
        while not pong or len(replies) < want:
            assert self.sock.poll(timeout * 1000), (
                "no pong: the coordinator stopped answering" if not pong else
                f"no reply to {frames!r:.200}")
            reply = msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)
            if reply == {"re": self.ping_seq, "ok": True}:
                pong = True
            else:
                replies.append(reply)
        return replies

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture(scope="module")
def wire(cluster):
    """An observer task whose state must not change, a victim task whose pid raw requests
    act as (its state may change: a raw mmap can succeed), and the raw client."""
    observer = cluster.attach(cpu=2)
    victim = cluster.attach(cpu=0)
    raw = RawClient(cluster.address)
    m = observer.mmap(PAGES * PS)
    observer.write(m.addr, b"observed" * 64)
    vm = victim.mmap(PAGES * PS)
    victim.write(vm.addr, b"victim")
    assert observer.pid != victim.pid

    def observe():
        return (observer.numa_maps(), observer.get_mempolicy(), observer.move_pages(m.pages),
                observer.read(m.addr, 512))

    yield {"observer": observer, "victim": victim, "raw": raw, "observe": observe,
           "before": observe()}
    raw.close()
    victim.close()
    observer.close()


@FUZZ
@given(data=st.data())
def test_wire_messages_get_errno_replies_and_change_nothing(cluster, wire, data):
    observer = wire["observer"]
    pids = mostly(st.just(wire["victim"].pid), WIRE_INT, times=2).filter(
        lambda p: p != observer.pid)
    kind, frames = data.draw(_messages(pids), label="message")
    replies = wire["raw"].exchange(frames, want=1 if kind == "request" else 0)
    for reply in replies:
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        if reply["ok"]:
            event(f"{kind}: ok")
        else:
            assert isinstance(reply.get("errno"), int) and reply["errno"] > 0, reply
            assert "coordinator error" not in reply.get("error", ""), reply
            event(f"{kind}: {errno.errorcode.get(reply['errno'], reply['errno'])}")
    assert wire["observe"]() == wire["before"]
    assert cluster.check() == []


# -- (c) a node's data endpoint ---------------------------------------------------------------

DATA_FRAMES = 64  # node frames of the data-endpoint cluster: a snapshot is 256 KiB
WRITES = {"write_frames", "write_elements"}
pfn_values = st.one_of(st.integers(0, DATA_FRAMES - 1), st.integers(0, DATA_FRAMES - 1),
                       st.integers(-2, DATA_FRAMES + 2), st.integers(-(2**63), 2**63 - 1))
#: Page or item positions as packed <i8 (mostly valid), sometimes with a partial item.
positions = mostly(st.lists(pfn_values, max_size=4).map(
    lambda xs: np.array(xs, dtype="<i8").tobytes()), st.binary(max_size=20))
itemsizes = st.one_of(st.sampled_from([1, 2, 4, 8, 16, PS]), WIRE_INT)


@st.composite
def _sane_data_request(draw):
    """A data request that a node would serve: (op, header map, data frame or None)."""
    op = draw(st.sampled_from(sorted(DATA_OPS)))
    header = {"op": op, "seq": draw(st.integers(1, 10**6))}
    k = draw(st.integers(1, 3))
    header["pfns" if op.endswith("frames") else "elements"] = np.array(
        draw(st.lists(st.integers(0, DATA_FRAMES - 1), min_size=k, max_size=k)),
        dtype="<i8").tobytes()
    data = None
    if op == "read_frames":
        header["offset"] = draw(st.integers(0, PS - 1))
    elif op == "write_frames":
        offset = draw(st.integers(0, PS - 1))
        header["offset"] = offset
        data = draw(st.binary(min_size=max(0, (k - 1) * PS - offset + 1),
                              max_size=k * PS - offset))
    elif op.endswith("elements"):
        itemsize = draw(st.sampled_from([1, 8, 64]))
        header["itemsize"] = itemsize
        if op == "write_elements":
            data = draw(st.binary(min_size=k * itemsize, max_size=k * itemsize))
    if data is not None:
        header["data"] = len(data)
    return op, header, data


@st.composite
def _data_messages(draw):
    """(op, frames): a data-endpoint message: a sane request, maybe broken in one place,
    or anything at all."""
    op, header, data = draw(_sane_data_request())
    how = draw(st.sampled_from(["as is", "as is", "field", "length", "no data", "data",
                                "extra", "junk", "other op", "reply"]))
    if how == "field":  # one field gets a random value, or goes
        name = draw(st.sampled_from(sorted(set(header) - {"op", "seq"})))
        if draw(st.booleans()):
            del header[name]
        else:
            header[name] = draw(st.one_of(positions, itemsizes, WIRE_INT, wire_junk))
    elif how == "length":  # the header states another length
        header["data"] = draw(st.one_of(WIRE_INT, wire_junk).filter(
            lambda v: v != len(data or b"")))
    elif how == "no data":
        data = None
    elif how == "data":  # a data frame, of any length (a read takes none)
        data = draw(st.binary(max_size=3 * PS))
        if draw(st.booleans()):
            header["data"] = len(data)
    elif how == "other op":
        op = header["op"] = draw(st.sampled_from(
            ["alloc", "free", "copy_in", "inject", "exit", "node_stats", "nope"]))
    elif how == "reply":
        header["re"] = 1  # dropped
    first = _pack(header)
    if how == "junk":
        first = draw(st.one_of(st.binary(max_size=32), wire_junk.map(_pack)))
    frames = [first] + ([data] if data is not None else [])
    if how == "extra":
        frames += draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))
    return f"{op} {how}", frames


@pytest.fixture(scope="module")
def data_endpoint():
    """Node 0's data endpoint on a small cluster of this test's own, and a raw DEALER."""
    with numaemu.Cluster(small_topology(frames=DATA_FRAMES)) as c:
        endpoint = c._call("info")["segments"][0]["data_endpoint"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            yield c, sock
        finally:
            sock.close(0)
    assert cluster_is_gone(c.cluster_id)


def _node_memory(sock) -> bytes:
    sock.send(P.encode_request(P.ReadFrames(pfns=np.arange(DATA_FRAMES, dtype=P.PFN)), 1))
    assert sock.poll(10000), "the node stopped serving"
    reply, data = P.unpack_message(sock.recv_multipart())
    assert reply["ok"] and data is not None and len(data) == DATA_FRAMES * PS
    return bytes(data)


@FUZZ
@given(message=_data_messages())
def test_data_endpoint_messages_get_errno_replies_and_change_nothing(data_endpoint, message):
    cluster, sock = data_endpoint
    what, frames = message
    op = what.split()[0]
    before = _node_memory(sock)
    sock.send_multipart(frames)
    sock.send(_pack({"op": "ping", "seq": 10**9}))  # answered after the message's reply
    replies = []
    while True:
        assert sock.poll(10000), "no pong: the node stopped serving"
        reply, data = P.unpack_message(sock.recv_multipart())
        if reply == {"re": 10**9, "ok": True}:
            break
        replies.append((reply, data))
    assert len(replies) <= 1, replies
    changed = False
    for reply, data in replies:
        assert isinstance(reply.get("ok"), bool), reply
        if reply["ok"]:
            event(f"{what}: ok")
            changed = op in WRITES
            if op in ("read_frames", "read_elements"):
                assert data is not None
        else:
            assert reply.get("errno") in (errno.EINVAL, errno.EPERM), reply
            assert "node error" not in reply.get("error", ""), reply
            event(f"{what}: {errno.errorcode[reply['errno']]}")
    if not replies:
        event(f"{what}: dropped")
    if not changed:
        assert _node_memory(sock) == before, "a refused message changed the node's memory"
    assert cluster.check() == []

"""Identity is bound to the connection, not taken from the request (coordinator/creds.py).

A second client process names other tasks' pids on every request that carries one and
is refused (EPERM, or EACCES for numa_maps), and the victim's data, numa_maps and the
cluster's invariants stay as they were.  Attaches must describe their own process,
privileged operations need privilege, a stranger cannot take over a task's shootdown
channel or register a node, and a node's data endpoint serves frame contents only.

The module runs its own cluster in a run directory that other users can reach, so that
one test can talk to it from a process of another real uid (``nobody``).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import time

import numpy as np
import pytest
import zmq
from conftest import cluster_is_gone, small_topology

import numaemu
from coordinator import creds
from numaemu import MPOL_BIND, MPOL_MF_MOVE, MPOL_MF_MOVE_ALL, NumaError
from numaemu import protocol as P
from numaemu.transport import Connection

PS = numaemu.PAGE_SIZE
SECRET = b"the victim's secret" * 8
IS_ROOT = os.getuid() == 0
#: Another owner's uid for emulated tasks (only root may pick one; others test as themselves).
STRANGER = os.getuid() + 1 if IS_ROOT else None
NOBODY = 65534


@pytest.fixture(scope="module")
def cluster():
    """A 2-node cluster whose run directory is reachable by other users (see module doc)."""
    base = tempfile.mkdtemp(prefix="numaemu-identity-")
    old = os.environ.get("NUMAEMU_RUN_DIR")
    os.environ["NUMAEMU_RUN_DIR"] = base
    try:
        c = numaemu.Cluster(small_topology(frames=1024))
    finally:
        if old is None:
            os.environ.pop("NUMAEMU_RUN_DIR", None)
        else:
            os.environ["NUMAEMU_RUN_DIR"] = old
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture(scope="module")
def info(cluster):
    return cluster._call("info")


@pytest.fixture(scope="module")
def victim(cluster):
    """A privileged task holding a secret: its pid would open every door if it could be
    borrowed."""
    t = cluster.attach(cpu=0, privileged=True)
    m = t.mmap(2 * PS)
    t.write(m.addr, SECRET)
    t.write(m.page(1), SECRET[::-1])
    t.mmap(PS, shared="victim-shm")
    yield t, m
    t.close()


def snapshot(cluster, victim) -> tuple:
    """Everything a forged request could have changed or would have to change."""
    task, m = victim
    tasks = sorted((t["pid"], t["os_pid"], t["privileged"])
                   for t in cluster._call("tasks")["tasks"])
    return (task.read(m.addr, m.length), task.numa_maps(), list(task.move_pages(m.pages)),
            task.get_mempolicy(), task.sysctl("migrate_batch"), tasks, cluster.free_frames())


def forged_requests(pid: int, addr: int) -> dict[str, dict]:
    """A request of every op that names its caller by pid, all naming ``pid``."""
    page = np.array([addr], dtype=P.VPN)
    return {
        "fault (read)": dict(op="fault", pid=pid, vpns=page // PS, write=False),
        "fault (write)": dict(op="fault", pid=pid, vpns=page // PS, write=True),
        "move_pages (query)": dict(op="move_pages", pid=pid, target=None, pages=page),
        "move_pages": dict(op="move_pages", pid=pid, target=None, pages=page, nodes=[1],
                           flags=int(MPOL_MF_MOVE)),
        "move_pages (move_all)": dict(op="move_pages", pid=pid, target=None, pages=page,
                                      nodes=[1], flags=int(MPOL_MF_MOVE_ALL)),
        "migrate_pages": dict(op="migrate_pages", pid=pid, target=None, old_nodes=[0],
                              new_nodes=[1]),
        "mbind": dict(op="mbind", pid=pid, addr=addr, length=PS, mode=int(MPOL_BIND),
                      nodes=[1], flags=int(MPOL_MF_MOVE)),
        "mmap": dict(op="mmap", pid=pid, length=PS),
        "munmap": dict(op="munmap", pid=pid, addr=addr, length=PS),
        "pin": dict(op="pin", pid=pid, addr=addr, length=PS),
        "unpin": dict(op="unpin", pid=pid, pin=1),
        "set_mempolicy": dict(op="set_mempolicy", pid=pid, mode=int(MPOL_BIND), nodes=[1]),
        "get_mempolicy": dict(op="get_mempolicy", pid=pid),
        "msync": dict(op="msync", pid=pid, addr=addr, length=PS),
        "shm_unlink": dict(op="shm_unlink", pid=pid, name="victim-shm"),
        "sched_setaffinity": dict(op="sched_setaffinity", pid=pid, cpus=[3]),
        "sysctl (set)": dict(op="sysctl", pid=pid, name="migrate_batch", value=1),
        "inject_fault": dict(op="inject_fault", pid=pid, node=0, request="alloc", count=1),
        "node_free_map": dict(op="node_free_map", pid=pid, node=0),
        "detach": dict(op="detach", pid=pid),  # last: had it worked, nothing else would
    }


def _errno_of(conn: Connection, op: str, **fields) -> int:
    try:
        conn.call(op, timeout=10, **fields)
    except NumaError as exc:
        return exc.errno
    return 0


def _impersonate(task, pid: int, addr: int, endpoints: dict) -> dict[str, int]:
    """In another client process: every forged request, on the task's own connection and
    on a bare one, then a stranger's hello and heartbeat on the victim's shootdown channel."""
    out = {}
    with Connection(task.address) as bare:
        for via, conn in (("task", task._conn), ("bare", bare)):
            for name, req in forged_requests(pid, addr).items():
                out[f"{name} via {via}"] = _errno_of(conn, **req)
        out["numa_maps via task"] = _errno_of(task._conn, "numa_maps", pid=pid)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoints["tlb"])
        for seq, req in enumerate((P.TlbHello(pid=pid), P.Heartbeat(pid=pid)), 1):
            sock.send(P.encode_request(req, seq))
            assert sock.poll(10000), f"no answer to a stranger's {req.op}"
            reply = P.unpack(sock.recv())
            out[f"{req.op} via tlb"] = 0 if reply["ok"] else reply["errno"]
    finally:
        sock.close(0)
    return out


def test_another_process_cannot_act_as_another_task(cluster, info, victim):
    task, m = victim
    before = snapshot(cluster, victim)
    attacker = cluster.spawn(_impersonate, task.pid, m.addr, info["endpoints"], cpu=2,
                             uid=STRANGER)
    results = attacker.join(60)
    expected = {name: errno.EPERM for name in results}
    # numa_maps names its target: the attacker is refused as another owner (EACCES); as
    # the same owner (tests not run as root) it may read it, as on Linux.
    expected["numa_maps via task"] = errno.EACCES if STRANGER is not None else 0
    assert results == expected
    assert snapshot(cluster, victim) == before
    assert task.read(m.addr, len(SECRET)) == SECRET
    assert cluster.check() == []


def test_the_victim_keeps_working_after_the_attempts(cluster, victim):
    """Its pid, connection and shootdown thread are still its own: another task moves the
    victim's cached page, which needs the victim's acknowledgement."""
    task, m = victim
    assert task.read(m.addr, len(SECRET)) == SECRET  # cached in its TLB
    with cluster.attach(cpu=2, privileged=True) as mover:
        assert list(mover.move_pages(m.pages, [1, 1], MPOL_MF_MOVE, pid=task.pid)) == [1, 1]
        assert list(mover.move_pages(m.pages, [0, 0], MPOL_MF_MOVE, pid=task.pid)) == [0, 0]
    assert task.read(m.addr, len(SECRET)) == SECRET
    assert task.read(m.page(1), len(SECRET)) == SECRET[::-1]


def test_attach_must_describe_the_calling_process(cluster):
    host = socket.gethostname()
    pids = sorted(t["pid"] for t in cluster._call("tasks")["tasks"])
    with Connection(cluster.address) as conn:
        assert _errno_of(conn, "attach", os_pid=1, host=host, uid=os.getuid()) == errno.EPERM
        assert _errno_of(conn, "attach", os_pid=os.getpid() + 100000, host=host,
                         uid=os.getuid()) == errno.EPERM
        assert _errno_of(conn, "attach", os_pid=os.getpid(), host="elsewhere",
                         uid=os.getuid()) == errno.EPERM
    assert sorted(t["pid"] for t in cluster._call("tasks")["tasks"]) == pids


def test_root_may_emulate_other_owners(cluster):
    if not IS_ROOT:
        pytest.skip("only root may attach tasks of another uid")
    with cluster.attach(cpu=1, uid=STRANGER) as t:
        m = t.mmap(PS)
        t.write(m.addr, b"mine")
        assert t.read(m.addr, 4) == b"mine"


def test_unprivileged_inject_fault_and_shutdown_are_eperm(cluster):
    with cluster.attach(cpu=1) as t:
        with pytest.raises(NumaError) as e:
            t._sync_call("inject_fault", node=0, request="alloc", count=1000)
        assert e.value.errno == errno.EPERM
        with pytest.raises(NumaError) as e:
            t._conn.call("shutdown")  # the connection's task speaks for it: unprivileged
        assert e.value.errno == errno.EPERM
        with pytest.raises(NumaError) as e:
            t.sysctl("migrate_batch", 1)
        assert e.value.errno == errno.EPERM
        m = t.mmap(64 * PS, populate=True)  # allocations work: nothing was injected
        t.write(m.addr, b"still serving")
        assert t.read(m.addr, 13) == b"still serving"
    assert cluster.check() == []


def test_a_routing_id_is_never_served_to_another_process(cluster):
    """A client may choose its routing id; once a connection used one, a process that
    takes it over later is not served as that connection (nor as its task)."""
    ident = b"numaemu-identity-" + os.urandom(4)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    try:
        sock.connect(cluster.address)
        sock.send(P.encode_request(P.Attach(os_pid=os.getpid(), host=socket.gethostname(),
                                            uid=os.getuid(), cpu=3), 1))
        assert sock.poll(10000)
        reply = P.unpack(sock.recv())
        assert reply["ok"], reply
        pid = reply["pid"]
    finally:
        sock.close(0)
    time.sleep(0.2)  # the coordinator sees the connection go
    thief = cluster.spawn(_reuse_routing_id, cluster.address, ident, pid)
    assert thief.join(30) == "no reply"


def _reuse_routing_id(task, address: str, ident: bytes, pid: int) -> str:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    try:
        sock.connect(address)
        sock.send(P.encode_request(P.Mmap(pid=pid, length=PS), 1))
        if not sock.poll(1500):
            return "no reply"
        return repr(P.unpack(sock.recv()))
    finally:
        sock.close(0)


def test_register_needs_the_registering_process(cluster, info):
    reg = dict(node=0, path="/dev/shm/not-a-node", frames=1024, page_size=PS,
               host=socket.gethostname())
    replies = _exchange(info["endpoints"]["nodes"], [
        P.Register(os_pid=1, **reg),  # another process's pid
        P.Register(os_pid=os.getpid(), **reg),  # its own: then node 0 is simply taken
    ])
    assert [r["errno"] for r in replies] == [errno.EPERM, errno.EEXIST]
    assert cluster.check() == []


def test_node_data_endpoint_serves_frame_contents_only(cluster, info, victim):
    task, _ = victim
    seg = next(s for s in info["segments"] if s["node"] == 0)
    def free_map():
        reply = task._sync_call("node_free_map", node=0)
        return reply["bits"], reply["nr_free"]

    before = free_map()
    refused = [P.Alloc(count=8), P.Free(pfns=np.arange(4, dtype=P.PFN)),
               P.Inject(request="read_frames", count=100), P.FreeMap(),
               P.CopyIn(src_node=1, src_path="/dev/shm/x", src_endpoint="ipc:///x",
                        src_pfns=np.arange(2, dtype=P.PFN), dst_pfns=np.arange(2, dtype=P.PFN)),
               P.Account(stats={"numa_hit": 5}),
               P.Exit()]
    replies = _exchange(seg["data_endpoint"], refused + [
        P.Ping(), P.ReadFrames(pfns=np.arange(2, dtype=P.PFN))])
    assert [r.get("errno") for r in replies[:len(refused)]] == [errno.EPERM] * len(refused)
    ping, read = replies[len(refused):]
    assert ping["ok"] and read["ok"] and len(read["data"]) == 2 * PS
    assert free_map() == before
    assert cluster.check() == []


def _exchange(endpoint: str, requests: list) -> list[dict]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        replies = []
        for seq, req in enumerate(requests, 1):
            sock.send(P.encode_request(req, seq))
            assert sock.poll(10000), f"no reply to {req.op}"
            reply, data = P.unpack_message(sock.recv_multipart())
            if data is not None:  # frame contents come as a data frame beside the header
                reply["data"] = bytes(data)
            replies.append(reply)
        return replies
    finally:
        sock.close(0)


# -- a peer of another real uid -----------------------------------------------------------------


def _as_nobody(endpoints: dict, victim_pid: int, out) -> None:
    """In a clean process: drop to ``nobody`` (before any connection: SO_PEERCRED is taken
    at connect), then try what another real user might."""
    import numaemu.transport  # noqa: F401  (nothing may be imported from /root once nobody)

    results = {}
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        me, host = os.getpid(), socket.gethostname()
        with Connection(endpoints["rpc"]) as bare:
            results["bare numa_maps"] = _errno_of(bare, "numa_maps", pid=victim_pid)
            results["bare shutdown"] = _errno_of(bare, "shutdown")
            results["attach as root"] = _errno_of(bare, "attach", os_pid=me, host=host, uid=0)
            results["attach privileged"] = _errno_of(bare, "attach", os_pid=me, host=host,
                                                     uid=NOBODY, privileged=True)
        with Connection(endpoints["rpc"]) as conn:
            pid = conn.call("attach", os_pid=me, host=host, uid=NOBODY)["pid"]
            results["own numa_maps"] = _errno_of(conn, "numa_maps", pid=pid)
            results["numa_maps"] = _errno_of(conn, "numa_maps", pid=victim_pid)
            results["inject_fault"] = _errno_of(conn, "inject_fault", pid=pid, node=0,
                                                request="alloc")
            results["detach"] = _errno_of(conn, "detach", pid=pid)
        replies = _exchange(endpoints["nodes"], [P.Register(
            node=0, path="/dev/shm/x", frames=1, page_size=PS, host=host, os_pid=me)])
        results["register"] = replies[0].get("errno", 0)
    except BaseException as exc:
        results["error"] = repr(exc)
    out.send(results)


def test_a_peer_of_another_real_uid_gets_only_its_own(cluster, info, victim):
    if not IS_ROOT:
        pytest.skip("needs root to run a process as nobody")
    for path in (os.path.dirname(cluster.run_dir), cluster.run_dir):
        os.chmod(path, 0o711)
    for name in ("rpc", "nodes"):
        os.chmod(info["endpoints"][name].removeprefix("ipc://"), 0o666)
    before = snapshot(cluster, victim)
    from numaemu.cluster import _client_context

    ctx = _client_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_as_nobody, args=(info["endpoints"], victim[0].pid, sender))
    proc.start()
    sender.close()
    try:
        assert receiver.poll(60), "the nobody process did not report"
        results = receiver.recv()
    finally:
        proc.join(10)
    assert results == {
        "bare numa_maps": errno.EACCES, "bare shutdown": errno.EPERM,
        "attach as root": errno.EPERM, "attach privileged": errno.EPERM,
        "own numa_maps": 0, "numa_maps": errno.EACCES, "inject_fault": errno.EPERM,
        "detach": 0, "register": errno.EPERM}
    assert snapshot(cluster, victim) == before
    assert cluster.check() == []


# -- shutdown by a privileged caller ---------------------------------------------------------


def test_a_privileged_task_may_shut_the_cluster_down():
    with numaemu.Cluster(small_topology(nodes=1, frames=64, cpus=1)) as c:
        root = c.attach(cpu=0, privileged=True)
        root._conn.call("shutdown")
        deadline = time.monotonic() + 15
        while c._proc.poll() is None:
            assert time.monotonic() < deadline, "the cluster did not stop"
            time.sleep(0.1)
    assert cluster_is_gone(c.cluster_id)


# -- the credential rules, for peers the tests cannot be -----------------------------------------


def test_peer_address_parsing():
    cred = creds.parse_peer_address("ipc", "localhost:1000:100:4242")
    assert (cred.uid, cred.gid, cred.pid, cred.verified) == (1000, 100, 4242, True)
    assert creds.parse_peer_address("ipc", "a:b:c").verified is False
    assert creds.parse_peer_address("ipc", None) == creds.UNKNOWN
    tcp = creds.parse_peer_address("tcp", "::1")
    assert (tcp.uid, tcp.verified, tcp.trusted) == (None, False, True)


@pytest.mark.parametrize(("address", "claim", "err"), [
    ("h:1000:1000:42", dict(os_pid=42, uid=1000), None),
    ("h:1000:1000:42", dict(os_pid=43, uid=1000), errno.EPERM),
    ("h:1000:1000:42", dict(os_pid=42, uid=0), errno.EPERM),
    ("h:1000:1000:42", dict(os_pid=42, uid=1000, privileged=True), errno.EPERM),
    ("h:0:0:42", dict(os_pid=42, uid=1234, privileged=True), None),
    ("garbled", dict(os_pid=42, uid=1000), errno.EPERM),
], ids=["own", "other pid", "other uid", "privileged non-owner", "root", "no credentials"])
def test_attach_rules_over_ipc(monkeypatch, address, claim, err):
    monkeypatch.setattr(creds, "owner_uid", lambda: 4321)
    caller = creds.Caller(b"id", creds.parse_peer_address("ipc", address))
    req = P.Attach(host="h", **claim)
    if err is None:
        creds.check_attach(req, caller, "h")
    else:
        with pytest.raises(NumaError) as e:
            creds.check_attach(req, caller, "h")
        assert e.value.errno == err


def test_tcp_attaches_are_believed_until_curve():
    caller = creds.Caller(b"id", creds.parse_peer_address("tcp", "10.0.0.7"))
    creds.check_attach(P.Attach(os_pid=1, host="far", uid=0, privileged=True), caller, "h")

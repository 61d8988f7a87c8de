"""tcp clusters serve only peers holding their CURVE keys (numaemu/keys.py).

A cluster served on tcp by a real supervisor; a stranger in this process tries every
endpoint without keys and with keys of another cluster, and can neither attach, nor
register a node, nor take shootdowns, nor read a task's memory through a node's data
endpoint.  The same requests with the right keys succeed, so each refusal is the keys'.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import zmq
from conftest import cluster_is_gone, small_topology

import numaemu
from numaemu import protocol as P
from numaemu.cli import main as cli_main
from numaemu.keys import KEYS_ENV, Keys
from numaemu.rundir import free_port_block
from numaemu.transport import Connection

FRAMES = 256
SECRET = b"the victim's secret page content"


@pytest.fixture(scope="module")
def tcp_cluster():
    port = free_port_block()
    with numaemu.Cluster(small_topology(frames=FRAMES), listen=f"tcp://127.0.0.1:{port}") as c:
        yield c
    assert cluster_is_gone(c.cluster_id)


@pytest.fixture
def no_env_keys(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)


def exchange(endpoint: str, payload: bytes, keys: Keys | None, timeout_ms: int = 500):
    """One request from a fresh DEALER (a CURVE client when ``keys`` is given); the reply,
    or None when nothing comes back."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            keys.client(sock)
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(timeout_ms):
            return None
        reply, data = P.unpack_message(sock.recv_multipart())
        if data is not None:  # frame contents come as a data frame beside the header
            reply["data"] = bytes(data)
        return reply
    finally:
        sock.close(0)


def test_the_keys_are_the_owners_alone(tcp_cluster):
    keys = tcp_cluster.keys
    assert keys and stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    for name in ("cluster.key_secret", "client.key_secret"):
        assert stat.S_IMODE(os.stat(os.path.join(keys, name)).st_mode) == 0o600


def test_a_peer_without_the_keys_is_served_nothing(tcp_cluster, tmp_path, no_env_keys):
    victim = tcp_cluster.attach(cpu=0)
    m = victim.mmap(4096)
    victim.write(m.addr, SECRET)
    right = Keys.load(tcp_cluster.keys)
    wrong = Keys.create(str(tmp_path / "other-keys"))
    with Connection(tcp_cluster.address, keys=tcp_cluster.keys) as conn:
        info = conn.call("info")
        tasks_before = conn.call("tasks")["tasks"]
    endpoints = info["endpoints"]
    data = {s["node"]: s["data_endpoint"] for s in info["segments"]}

    # Our own library refuses to try without keys, and says where they are.
    with pytest.raises(numaemu.ClusterError, match=KEYS_ENV):
        numaemu.attach(tcp_cluster.address, cpu=0)
    # With another cluster's keys the handshake is refused before any handler runs.
    with pytest.raises(numaemu.ClusterError, match="refused"):
        numaemu.attach(tcp_cluster.address, cpu=0, keys=wrong.directory)

    attach = P.encode_request(P.Attach(os_pid=os.getpid(), host="elsewhere", uid=0,
                                       privileged=True), 1)
    hello = P.encode_request(P.TlbHello(pid=victim.pid), 1)
    register = P.encode_request(P.Register(node=0, path="/x", frames=FRAMES, page_size=4096,
                                           host="elsewhere", os_pid=1), 1)
    read_all = P.encode_request(P.ReadFrames(pfns=np.arange(FRAMES, dtype=P.PFN)), 1)
    for keys in (None, wrong):  # no CURVE at all, and the wrong credential
        assert exchange(endpoints["rpc"], attach, keys) is None
        assert exchange(endpoints["tlb"], hello, keys) is None
        assert exchange(endpoints["nodes"], register, keys) is None
        assert exchange(data[0], read_all, keys) is None
    # The right credential is served: the refusals above were the keys' doing.
    reply = exchange(data[0], read_all, right, timeout_ms=5000)
    assert reply is not None and SECRET in reply["data"]
    with Connection(tcp_cluster.address, keys=tcp_cluster.keys) as conn:
        assert conn.call("tasks")["tasks"] == tasks_before
    assert victim.read(m.addr, len(SECRET)) == SECRET
    victim.close()
    assert tcp_cluster.check() == []


def test_the_cli_takes_the_keys_from_the_flag(tcp_cluster, capsys, no_env_keys, monkeypatch):
    address = tcp_cluster.address
    assert cli_main(["--address", address, "hardware"]) == 1
    assert KEYS_ENV in capsys.readouterr().err
    assert cli_main(["--address", address, "--keys", tcp_cluster.keys, "hardware"]) == 0
    assert "available: 2 nodes" in capsys.readouterr().out
    monkeypatch.delenv(KEYS_ENV, raising=False)  # the flag set it for this process


def test_nodes_fetch_from_each_other_over_curve(no_env_keys):
    """On tcp with the remote path forced, a node copies a migrating page from the other's
    data service as a CURVE client holding the cluster's credential; the task on the remote
    path reaches both data services the same way."""
    port = free_port_block()
    with numaemu.Cluster(small_topology(frames=FRAMES), listen=f"tcp://127.0.0.1:{port}",
                         data_path="remote") as c:
        t = c.attach(cpu=0)
        m = t.mmap(4 * 4096)
        t.write(m.addr, SECRET * 512)
        assert t.move_pages(m.pages) == [0] * 4
        assert t.move_pages(m.pages, [1] * 4) == [1] * 4
        assert t.read(m.addr, 4 * 4096) == SECRET * 512
        assert c.node_stats()[1]["copy"]["frames_fetched"] == 4
        assert c.node_stats()[1]["copy"]["frames_copied_mapped"] == 0
        t.close()
        assert c.check() == []
    assert cluster_is_gone(c.cluster_id)

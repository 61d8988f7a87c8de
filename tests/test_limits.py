"""Message limits: no peer makes a cluster process buffer more than a bounded message.

Each socket that takes messages from peers has a maximum message size (ZMQ_MAXMSGSIZE):
libzmq drops the connection of a peer that sends more, before the message is read, and the
process goes on serving everyone else.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import zmq
from test_lifecycle import wait_until

from coordinator.server import MAX_MESSAGE
from numaemu import protocol as P
from numaemu.log import MAX_RECORD
from numaemu.transport import Connection


def _send(endpoint: str, kind: int, payload: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(payload)
    return sock


def test_an_oversized_request_drops_its_sender_and_nobody_else(cluster):
    with Connection(cluster.address) as conn:
        info = conn.call("info")
        big = _send(info["endpoints"]["rpc"], zmq.DEALER, b"\0" * (MAX_MESSAGE["rpc"] + 1))
        try:
            assert not big.poll(500)  # never read, never answered
            assert conn.call("info")["cluster_id"] == info["cluster_id"]
        finally:
            big.close(0)
    # A request just under the limit is read (and refused as malformed, not dropped).
    near = _send(cluster.address, zmq.DEALER, b"\xc1" * (MAX_MESSAGE["rpc"] - 16))
    try:
        assert near.poll(5000)
        reply = P.unpack(near.recv())
        assert not reply["ok"]
    finally:
        near.close(0)


def test_an_oversized_log_record_is_dropped_and_the_collector_goes_on(cluster):
    with Connection(cluster.address) as conn:
        endpoint = conn.call("info")["log_endpoint"]

    def record(msg: str, pad: int = 0) -> bytes:
        return msgpack.packb({"name": "numaemu.test", "levelno": 30, "levelname": "WARNING",
                              "msg": msg, "created": time.time(), "process": 1,
                              "where": "test", "exc_text": None, "pad": b"\0" * pad})

    big = _send(endpoint, zmq.PUSH, record("oversized record", MAX_RECORD))
    small = _send(endpoint, zmq.PUSH, record("record after the oversized one"))
    try:
        log = Path(cluster.log_path)
        assert wait_until(lambda: "record after the oversized one" in log.read_text(), 10)
        assert "oversized record" not in log.read_text()
    finally:
        big.close(0)
        small.close(0)

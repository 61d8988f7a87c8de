"""The coordinator's loop-driven socket: order kept through full pipes, bounded waits, and
no lost wake-ups when sends and receives interleave (coordinator/zloop.py)."""

import asyncio
import threading
import time

import pytest
import zmq

from coordinator.links import PeerGone, send_bounded
from coordinator.zloop import LoopSocket


@pytest.fixture
def pair(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER, socket_class=LoopSocket)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 4)
    addr = f"ipc://{tmp_path}/r"
    router.bind(addr)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 4)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(addr)
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


async def _hello(router, dealer) -> None:
    dealer.send(b"hello")
    assert await asyncio.wait_for(router.recv_multipart(), 5) == [b"peer", b"hello"]


def test_messages_to_a_slow_peer_keep_their_order(pair):
    router, dealer = pair

    async def main():
        await _hello(router, dealer)
        n = 400  # far beyond both high-water marks: most sends wait in the queue
        sends = [asyncio.ensure_future(send_bounded(router, [b"peer", b"%d" % i]))
                 for i in range(n)]
        await asyncio.sleep(0.05)
        assert not all(s.done() for s in sends), "the pipe never filled"
        got = []
        while len(got) < n:
            while dealer.poll(0):
                got.append(int(dealer.recv()))
            await asyncio.sleep(0.001)
        await asyncio.gather(*sends)
        assert got == list(range(n))

    asyncio.run(main())


def test_a_peer_that_never_reads_times_out_and_later_messages_still_go(pair):
    router, dealer = pair

    async def main():
        await _hello(router, dealer)
        results = await asyncio.gather(
            *(send_bounded(router, [b"peer", b"x" * 1000], timeout=0.2) for _ in range(300)),
            return_exceptions=True)
        assert any(isinstance(r, PeerGone) for r in results)
        # The peer wakes up and drains what it was sent; a new message reaches it.
        after = asyncio.ensure_future(send_bounded(router, [b"peer", b"after"], timeout=2))
        last = None
        deadline = time.monotonic() + 5
        while last != b"after" and time.monotonic() < deadline:
            while dealer.poll(0):
                last = dealer.recv()
            await asyncio.sleep(0.001)
        assert last == b"after"
        await after

    asyncio.run(main())


def test_an_unknown_peer_raises_at_once(pair):
    router, _ = pair

    async def main():
        with pytest.raises(zmq.ZMQError):
            await send_bounded(router, [b"nobody", b"x"])

    asyncio.run(main())


def test_a_parked_receiver_wakes_for_every_message_while_the_loop_also_sends(pair,
                                                                           monkeypatch):
    """Echo 3000 requests sent from another thread, up to 3 in flight: requests arrive
    while the loop sends, and a send that consumes the descriptor's edge must not leave the
    receiver parked with a request waiting (the client would stall).  The guard tick is off:
    the descriptor and the EVENTS checks alone must keep every request flowing."""
    import coordinator.zloop as zloop

    monkeypatch.setattr(zloop, "TICK_S", 3600.0)
    router, dealer = pair
    n = 3000
    echoed: list[bytes] = []  # what the client got back, checked after it ends

    def client():
        sent = 0
        while len(echoed) < n:
            while sent < n and sent - len(echoed) < 3:
                dealer.send(b"%d" % sent)
                sent += 1
            if not dealer.poll(5000):
                return  # a stall: the assertion below reports it
            echoed.append(dealer.recv())

    listener = zmq.Context.instance().socket(zmq.DEALER)
    listener.setsockopt(zmq.IDENTITY, b"listener")
    listener.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    stop = threading.Event()

    def listen():  # another peer the loop keeps sending to while it waits for requests
        while not stop.is_set():
            if listener.poll(10):
                listener.recv()

    async def chatter():
        while True:
            await send_bounded(router, [b"listener", b"tick"])
            await asyncio.sleep(0)

    async def main():
        listener.send(b"hello")
        assert (await router.recv_multipart())[0] == b"listener"
        threads = [threading.Thread(target=client), threading.Thread(target=listen)]
        for t in threads:
            t.start()
        noise = asyncio.ensure_future(chatter())
        try:
            for _ in range(n):
                ident, body = await asyncio.wait_for(router.recv_multipart(), 5)
                await send_bounded(router, [ident, body])
            await asyncio.get_running_loop().run_in_executor(None, threads[0].join)
        finally:
            noise.cancel()
            stop.set()
            threads[1].join()
            listener.close(0)

    asyncio.run(main())
    assert echoed == [b"%d" % i for i in range(n)]


def test_a_peer_that_stops_reading_holds_up_only_its_own_messages(pair):
    """Replies to a healthy peer go out while a stuck peer's messages still wait for room
    (they used to queue behind them and could time out with them)."""
    router, stuck = pair
    ctx = zmq.Context.instance()
    healthy = ctx.socket(zmq.DEALER)
    healthy.setsockopt(zmq.IDENTITY, b"healthy")
    healthy.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))

    async def main():
        await _hello(router, stuck)
        healthy.send(b"hello")
        assert (await asyncio.wait_for(router.recv_multipart(), 5))[0] == b"healthy"
        waiting = [asyncio.ensure_future(send_bounded(router, [b"peer", b"x" * 1000],
                                                      timeout=30)) for _ in range(300)]
        await asyncio.sleep(0.05)
        assert not all(w.done() for w in waiting), "the stuck peer's pipe never filled"
        await send_bounded(router, [b"healthy", b"reply"], timeout=30)
        deadline = time.monotonic() + 10
        while not healthy.poll(0) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert healthy.recv() == b"reply"
        assert not all(w.done() for w in waiting)  # served while the others still wait
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        healthy.close(0)

"""One log for the whole cluster, with the role and node of the writer on each line.

Two delivery paths end in the supervisor's handlers (a log file in the run
directory, and stderr at ``--log-level``):

* processes the supervisor forks (coordinator, nodes) inherit a
  multiprocessing-logging handler, installed before the fork; it only works for
  fork-started children;
* processes started on their own (a client calling ``numaemu.attach``, a
  spawned client, ``numaemu node`` on another host) use ``ZmqLogHandler``: a
  PUSH socket sending msgpack'd record fields to the supervisor's PULL socket
  (PUSH queues until connected and does not drop records, unlike PUB).

All of numaemu logs under the ``numaemu`` logger.  ``WhereFilter`` stamps each
record with ``where`` (e.g. ``node 1``, ``coordinator``, ``client 4242 cpu 0``).
"""

from __future__ import annotations

import logging
import os
import threading

import msgpack
import zmq

#: The largest log record the collector takes (ZMQ_MAXMSGSIZE).
MAX_RECORD = 256 << 10
FORMAT = "%(asctime)s %(levelname)-7s [%(where)s pid %(process)d] %(name)s: %(message)s"
ROOT = "numaemu"


class WhereFilter(logging.Filter):
    """Adds ``record.where`` (the process role and node) unless it is already set."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "where"):
            record.where = self.where
        return True


def where_text(role: str, node: int | None = None, extra: str = "") -> str:
    if node is None:
        text = role
    else:
        text = f"node {node}" if role == "node" else f"{role} node {node}"
    return f"{text} {extra}".strip()


def set_where(role: str, node: int | None = None, extra: str = "") -> None:
    """Stamp every handler of this process's ``numaemu`` logger with this role."""
    logger = logging.getLogger(ROOT)
    text = where_text(role, node, extra)
    for handler in logger.handlers:
        for f in list(handler.filters):
            if isinstance(f, WhereFilter):
                handler.removeFilter(f)
        handler.addFilter(WhereFilter(text))


class ZmqLogHandler(logging.Handler):
    """Forward records to the cluster's log collector over a PUSH socket."""

    def __init__(self, endpoint: str, where: str, keys=None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.keys = keys  # numaemu.keys.Keys for a tcp collector
        self._pid = os.getpid()
        self._sock = None
        self.addFilter(WhereFilter(where))

    def _socket(self):
        if self._sock is None or self._pid != os.getpid():
            from .transport import context

            self._sock = context().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 1000)  # deliver the last records at exit
            self._sock.setsockopt(zmq.SNDHWM, 10000)
            if self.keys is not None:
                self.keys.client(self._sock)
            self._sock.connect(self.endpoint)
            self._pid = os.getpid()
        return self._sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = self.formatter.formatException(record.exc_info) if (
                record.exc_info and self.formatter) else None
            if record.exc_info and exc_text is None:
                exc_text = logging.Formatter().formatException(record.exc_info)
            body = msgpack.packb({
                "name": record.name, "levelno": record.levelno,
                "levelname": record.levelname, "msg": record.getMessage(),
                "created": record.created, "process": record.process,
                "where": getattr(record, "where", "?"), "exc_text": exc_text,
            })
            self._socket().send(body, zmq.NOBLOCK)
        except zmq.Again:
            pass  # collector gone or saturated: logging must never block the caller
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close()
        self._sock = None
        super().close()


_client_lock = threading.Lock()
_client_handler: ZmqLogHandler | None = None


def setup_forwarding(endpoint: str, *, role: str, node: int | None = None, extra: str = "",
                     level: str | int = "INFO", keys=None) -> None:
    """In a process started on its own: send numaemu's records to the cluster log."""
    global _client_handler
    if not endpoint:
        return
    with _client_lock:
        logger = logging.getLogger(ROOT)
        if _client_handler is not None and _client_handler.endpoint == endpoint and (
                _client_handler._pid == os.getpid()):
            return
        if _client_handler is not None:
            logger.removeHandler(_client_handler)
        _client_handler = ZmqLogHandler(endpoint, where_text(role, node, extra), keys)
        logger.addHandler(_client_handler)
        if logger.level == logging.NOTSET or logger.level > logging.getLevelName(level):
            logger.setLevel(level)


class Collector(threading.Thread):
    """The supervisor's PULL socket: re-emits forwarded records through its handlers."""

    def __init__(self, endpoint: str, keys=None) -> None:
        super().__init__(name="numaemu-log-collector", daemon=True)
        self.endpoint = endpoint
        self.keys = keys  # numaemu.keys.Keys: a tcp collector admits the cluster's peers only
        self._halt = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        from .transport import context

        auth = None
        sock = context().socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        # A record is a few hundred bytes (a traceback a few KiB): a bigger message drops
        # its sender's connection unread, so no peer can make the collector buffer megabytes.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_RECORD)
        if self.keys is not None:
            auth = self.keys.authenticator(context())
            self.keys.server(sock)
        sock.bind(self.endpoint)
        self._ready.set()
        logger = logging.getLogger(ROOT)
        try:
            while not self._halt.is_set():
                if not sock.poll(200):
                    continue
                try:
                    fields = msgpack.unpackb(sock.recv(), raw=False)
                    record = logging.makeLogRecord({
                        "name": str(fields["name"]), "levelno": int(fields["levelno"]),
                        "levelname": str(fields["levelname"]), "msg": str(fields["msg"]),
                        "args": None, "created": float(fields["created"]),
                        "process": int(fields["process"]), "where": str(fields["where"]),
                        "exc_text": fields.get("exc_text"),
                    })
                except Exception:  # a malformed record must not stop the collector
                    continue
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
        finally:
            sock.close(0)
            if auth is not None:
                auth.stop()

    def start_and_wait(self) -> None:
        self.start()
        self._ready.wait(5)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)

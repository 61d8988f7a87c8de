"""CURVE authentication of every tcp endpoint (ZeroMQ's CurveZMQ, with a ZAP handler).

An ``ipc://`` cluster is guarded by its run directory (mode 0700) and by the
kernel credentials of each connection (``coordinator/creds.py``).  A ``tcp://``
cluster has neither, so nothing on it is served to a peer that cannot prove
it holds the cluster's client credential:

* ``numaemu up --listen tcp://...`` (``Keys.create``) makes two CURVE key pairs
  in ``<run dir>/keys`` (mode 0700, secret files 0600): the *cluster's* pair,
  which every server socket of the cluster uses (coordinator rpc/tlb/nodes, the
  nodes' data endpoints, the log collector), and a *client credential*, which
  every peer uses to connect (tasks, the CLI, nodes, log forwarders);
* each process that binds a tcp socket runs a ZAP handler (pyzmq's
  authenticator, with this module's ``Keys`` as its credentials callback) that
  admits only the client credential's public key, so a peer without it, or with
  another key, is refused during the handshake, before any message reaches a
  handler;
* keys are read once and then held in memory (``Keys``); a process started by
  the Ray launcher gets them over a pipe and never writes them to its host's
  disk (numaemu/raylaunch.py);
* a peer finds the keys in ``--keys DIR`` / ``keys=`` or ``$NUMAEMU_KEYS``; a
  tcp address without keys is refused on our side with a ``ClusterError`` that
  says where to find them.

One client credential for all peers: whoever holds it is the cluster's owner
(the files are readable by the owner only), as a local peer with the owner's
uid is over ipc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import zmq
import zmq.asyncio
import zmq.auth

from .errors import ClusterError

KEYS_ENV = "NUMAEMU_KEYS"
SERVER, CLIENT = "cluster", "client"


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


@dataclass(frozen=True)
class Keys:
    """A cluster's CURVE keys, as found in one directory."""

    directory: str
    server_public: bytes
    server_secret: bytes | None  # only where the cluster's own processes run
    client_public: bytes
    client_secret: bytes

    @classmethod
    def create(cls, directory: str) -> Keys:
        """Make the cluster's key pair and a client credential in ``directory``."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        old = os.umask(0o077)  # the secret files are the owner's alone
        try:
            for name in (SERVER, CLIENT):
                zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str) -> Keys:
        """Read the keys in ``directory`` (the cluster's secret key only if it is there)."""
        def cert(name: str, secret: bool) -> tuple[bytes, bytes | None]:
            path = os.path.join(directory, f"{name}.key_secret" if secret else f"{name}.key")
            return zmq.auth.load_certificate(path)

        try:
            client_public, client_secret = cert(CLIENT, True)
            try:
                server_public, server_secret = cert(SERVER, True)
            except OSError:
                server_public, server_secret = cert(SERVER, False)
        except (OSError, ValueError) as exc:
            raise ClusterError(f"no usable cluster keys in {directory} ({exc})") from None
        if client_secret is None:
            raise ClusterError(f"{directory} has no client secret key")
        return cls(directory, server_public, server_secret, client_public, client_secret)

    def for_client(self) -> Keys:
        """These keys without the cluster's secret key: what a client (a peer that never
        serves as the cluster) is given, held in memory only."""
        return replace(self, directory="(in memory)", server_secret=None)

    def to_text(self) -> dict[str, str | None]:
        """The keys as Z85 text (the form of the key files), for a pipe to a process."""
        def text(key: bytes | None) -> str | None:
            return None if key is None else key.decode("ascii")

        return {"server_public": text(self.server_public),
                "server_secret": text(self.server_secret),
                "client_public": text(self.client_public),
                "client_secret": text(self.client_secret)}

    @classmethod
    def from_text(cls, fields: dict[str, str | None]) -> Keys:
        """The inverse of ``to_text``."""
        def key(name: str) -> bytes | None:
            value = fields.get(name)
            return None if value is None else value.encode("ascii")

        if not fields.get("client_public") or not fields.get("client_secret"):
            raise ClusterError("keys without a client credential")
        return cls("(in memory)", key("server_public"), key("server_secret"),
                   key("client_public"), key("client_secret"))

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP handler's question, "may the peer holding public ``key`` connect?": only
        the client credential may."""
        return key == self.client_public

    def client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the cluster (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server of the cluster (before it binds)."""
        if self.server_secret is None:
            raise ClusterError(f"{self.directory} lacks the cluster's secret key: only the "
                               "cluster's own processes may serve")
        sock.curve_server = True
        sock.curve_publickey = self.server_public
        sock.curve_secretkey = self.server_secret

    def authenticator(self, ctx: zmq.Context):
        """Start a ZAP handler in ``ctx`` that admits the client credential only; keep the
        returned object alive as long as the sockets (``.stop()`` it after closing them)."""
        if isinstance(ctx, zmq.asyncio.Context):
            from zmq.auth.asyncio import AsyncioAuthenticator

            auth = AsyncioAuthenticator(ctx)
        else:
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=self)
        return auth


def find(endpoint: str, directory: str | Keys | None = None) -> Keys | None:
    """The keys to reach ``endpoint``: None for ipc; for tcp, from ``directory`` (or keys
    already loaded) or ``$NUMAEMU_KEYS``, else a ``ClusterError`` saying where they are."""
    if not is_tcp(endpoint):
        return None
    if isinstance(directory, Keys):
        return directory
    directory = directory or os.environ.get(KEYS_ENV)
    if not directory:
        raise ClusterError(f"{endpoint} is a tcp cluster: it serves only peers with its keys; "
                           f"pass keys=DIR (--keys DIR) or set {KEYS_ENV} to the directory "
                           "`numaemu up --listen` printed")
    return Keys.load(directory)

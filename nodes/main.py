"""Command-line entry of a node process started on its own (another host, or by hand)."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from numaemu import log as numaemu_log
from numaemu.keys import KEYS_ENV, Keys
from numaemu.keys import find as find_keys
from numaemu.transport import Connection

from . import run_node


def main(argv: list[str] | None = None) -> int:
    """Join the cluster at ``--coordinator`` as node ``--node``."""
    parser = argparse.ArgumentParser(prog="numaemu node", description=__doc__)
    parser.add_argument("--coordinator", required=True, help="the cluster's address")
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--data-endpoint", default=None,
                        help="where this node serves frame reads/writes (default: tcp, any "
                        "free port on the address this host reaches the coordinator from)")
    parser.add_argument("--keys", default=os.environ.get(KEYS_ENV),
                        help="a tcp cluster's key directory, with the cluster's secret key "
                        "(a node serves its data endpoint as the cluster)")
    parser.add_argument("--data-path", choices=("auto", "remote"), default="auto",
                        help="remote: copy pages from other nodes through their data "
                        "services even when their memory maps here")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    join(args.coordinator, args.node, args.data_endpoint or default_data_endpoint(
        args.coordinator), args.keys, args.log_level, args.data_path)
    return 0


def default_data_endpoint(coordinator: str) -> str:
    """A tcp endpoint on this host's address towards the coordinator (the interface its
    route to the coordinator leaves from), any free port: an address the cluster's other
    hosts can reach, where ``tcp://*`` would advertise ``0.0.0.0``."""
    host = "127.0.0.1"
    if coordinator.startswith("tcp://"):
        target, port = coordinator.removeprefix("tcp://").rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target.strip("[]"), int(port)))  # no packet is sent
                host = s.getsockname()[0]
            except OSError:
                pass
    return f"tcp://{host}:*"


def join(coordinator: str, node: int, data_endpoint: str, keys: str | Keys | None,
         log_level: str | int = "INFO", data_path: str = "auto") -> None:
    """Serve as node ``node`` of the cluster at ``coordinator`` until told to stop
    (``data_path`` "remote": copy from other nodes through their data services)."""
    with Connection(coordinator, keys=keys) as conn:
        info = conn.call("info")
    log_endpoint = info["log_endpoint"]
    numaemu_log.setup_forwarding(log_endpoint, role="node", node=node, level=log_level,
                                 keys=find_keys(log_endpoint, keys))
    topo = info["topology"]
    logging.getLogger("numaemu.node").info("node %d joining %s", node, coordinator)
    run_node(node, info["endpoints"]["nodes"], info["cluster_id"],
             topo["frames_per_node"][node], topo["page_size"], data_endpoint, keys=keys,
             data_path=data_path)

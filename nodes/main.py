"""Command-line entry of a node process started on its own (another host, or by hand)."""

from __future__ import annotations

import argparse
import logging
import os

from numaemu import log as numaemu_log
from numaemu.keys import KEYS_ENV
from numaemu.keys import find as find_keys
from numaemu.transport import Connection

from . import run_node


def main(argv: list[str] | None = None) -> int:
    """Join the cluster at ``--coordinator`` as node ``--node``."""
    parser = argparse.ArgumentParser(prog="numaemu node", description=__doc__)
    parser.add_argument("--coordinator", required=True, help="the cluster's address")
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--data-endpoint", default=None,
                        help="where this node serves frame reads/writes "
                        "(default: tcp, any free port)")
    parser.add_argument("--keys", default=os.environ.get(KEYS_ENV),
                        help="a tcp cluster's key directory, with the cluster's secret key "
                        "(a node serves its data endpoint as the cluster)")
    parser.add_argument("--data-path", choices=("auto", "remote"), default="auto",
                        help="remote: copy pages from other nodes through their data "
                        "services even when their memory maps here")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    with Connection(args.coordinator, keys=args.keys) as conn:
        info = conn.call("info")
    log_endpoint = info["log_endpoint"]
    numaemu_log.setup_forwarding(log_endpoint, role="node", node=args.node,
                                 level=args.log_level, keys=find_keys(log_endpoint, args.keys))
    topo = info["topology"]
    frames = topo["frames_per_node"][args.node]
    data = args.data_endpoint or "tcp://*:*"
    logging.getLogger("numaemu.node").info("node %d joining %s", args.node, args.coordinator)
    run_node(args.node, info["endpoints"]["nodes"], info["cluster_id"], frames,
             topo["page_size"], data, keys=args.keys, data_path=args.data_path)
    return 0

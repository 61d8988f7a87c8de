"""``python -m coordinator``: run a coordinator by hand (nodes join it with ``numaemu node``)."""

import argparse
import json

from numaemu import log as numaemu_log
from numaemu.keys import Keys
from numaemu.rundir import RunDir
from numaemu.topology import Topology

from .server import run_coordinator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator")
    parser.add_argument("--topology", required=True, help="a topology file (.toml or .json)")
    parser.add_argument("--listen", default=None, help="tcp://HOST:PORT (default: ipc)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    run = RunDir.create(args.listen)
    import logging

    logging.basicConfig(level=args.log_level, format=numaemu_log.FORMAT)
    numaemu_log.set_where("coordinator")
    for h in logging.getLogger().handlers:
        h.addFilter(numaemu_log.WhereFilter("coordinator"))
    keys = Keys.create(run.keys_dir).directory if args.listen else None
    print(json.dumps({"address": run.endpoints()["rpc"], "cluster_id": run.cluster_id,
                      "keys": keys}), flush=True)
    try:
        run_coordinator(Topology.load(args.topology), run.cluster_id, run.endpoints(),
                        keys=keys)
    finally:
        run.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

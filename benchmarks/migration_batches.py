"""Migration throughput by batch size, each against a memcpy of the same bytes in the same run.

    python benchmarks/migration_batches.py [--pages 4096] [--repeat 3] [--json]

For each batch size (1, 16, 512, 4096 pages per (source, target) batch) a fresh 2-node
cluster faults ``--pages`` pages on node 0 and moves them to node 1 with one
mbind(MPOL_MF_MOVE); the baseline is a plain copy of the same number of bytes between
two of that cluster's shared-memory segments, timed in the same run.
"""

from __future__ import annotations

import argparse
import json

from numaemu.bench import bench_migrate

BATCHES = (1, 16, 512, 4096)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for batch in BATCHES:
        figures = bench_migrate(args.pages, args.repeat, batch)
        rows.append({"batch": batch, "gb_per_s": figures["gb_per_s"],
                     "memcpy_gb_per_s": figures["memcpy_gb_per_s"], "ratio": figures["ratio"],
                     "us_per_page": figures["seconds"] / args.pages * 1e6})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"moving {args.pages} pages ({args.pages * 4096 >> 20} MiB) node 0 -> node 1")
    print(f"{'batch':>6} {'GB/s':>8} {'memcpy GB/s':>12} {'ratio':>7} {'us/page':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['gb_per_s']:>8.3f} {r['memcpy_gb_per_s']:>12.2f} "
              f"{r['ratio']:>7.3f} {r['us_per_page']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

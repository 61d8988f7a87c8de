"""Compare placement policies on one misplaced workload (what `numaemu bench placement` runs).

Two tasks on different nodes read their memory, which starts on the wrong node; halfway
one task is moved.  Each policy gets a fresh machine: nothing, the kernel's NUMA
balancing, the user-space daemon's built-in policies, and the all-local target.

    python examples/placement_policies.py [SECONDS]
"""

import sys

from numaemu.bench_placement import bench_placement, placement_text, plot

if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    results = bench_placement(seconds=seconds)
    print(placement_text(results), end="")
    print("plot:", plot(results, "placement.png"))

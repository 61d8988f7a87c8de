"""Access profiles: what NUMA hinting faults recorded, as a numpy structured array.

``Cluster.access_profile`` and ``Task.access_profile`` return one row per (task, page,
page node, accessing node); coordinator/numa_balancing.py records them.
"""

from __future__ import annotations

import numpy as np


def profile_array(reply: dict) -> np.ndarray:
    """An ``access_profile`` reply as a structured array with an ``addr`` column."""
    rows = np.frombuffer(reply["rows"], dtype=np.dtype([tuple(f) for f in reply["dtype"]]))
    out = np.empty(len(rows), dtype=PROFILE_FIELDS)
    out["addr"] = rows["vpn"].astype(np.uint64) * np.uint64(reply["page_size"])
    for name in ("pid", "page_node", "cpu_node", "count", "last_ns"):
        out[name] = rows[name]
    return out


#: The columns of an access profile.
PROFILE_FIELDS = np.dtype([("addr", "<u8"), ("pid", "<i8"), ("page_node", "<i2"),
                           ("cpu_node", "<i2"), ("count", "<i8"), ("last_ns", "<i8")])

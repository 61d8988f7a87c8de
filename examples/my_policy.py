"""A user placement policy for `numaemu balance --policy my_policy:ToMyCpu`.

Every page a task touched from another node in the last window moves to that node:
the simplest "follow the accesses" policy, in the shape every policy has.
(Run from this directory, or put it on PYTHONPATH.)
"""

import numpy as np

from numaemu.balance import Move


class ToMyCpu:
    name = "to-my-cpu"

    def decide(self, profile, topology, tasks):
        remote = profile[(profile["page_node"] != profile["cpu_node"])
                         & np.isin(profile["pid"], list(tasks))]
        for pid in np.unique(remote["pid"]).tolist():
            mine = remote[remote["pid"] == pid]
            for node in np.unique(mine["cpu_node"]).tolist():
                yield Move(pid, mine["addr"][mine["cpu_node"] == node].tolist(), node)

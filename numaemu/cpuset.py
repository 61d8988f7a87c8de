"""cpusets from Python: a handle on one cgroup-v1 cpuset of a cluster.

``Cluster.cpuset_create(name, cpus=..., mems=..., memory_migrate=False)`` makes one,
``Cluster.cpuset(name)`` finds one (``"/"`` is the root, which holds every CPU and every
node with memory), ``Cluster.cpusets()`` lists them.  A cpuset confines its tasks' CPUs
and memory nodes; with ``memory_migrate`` their pages follow its nodes
(coordinator/cpuset.py has the semantics).  Changing cpusets needs a privileged caller,
as writing the cgroup files does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cluster import Cluster


class Cpuset:
    """One cpuset: ``name``, ``cpus``, ``mems``, ``memory_migrate`` (as of the last call that
    returned them) and ``tasks`` (asked anew each time)."""

    def __init__(self, cluster: Cluster, state: dict) -> None:
        self._cluster = cluster
        self._set(state)

    def _set(self, state: dict) -> None:
        self.name: str = state["name"]
        self.cpus: tuple[int, ...] = tuple(state["cpus"])
        self.mems: tuple[int, ...] = tuple(state["mems"])
        self.memory_migrate: bool = bool(state["memory_migrate"])
        #: Pages the last attach or update with memory_migrate could not move.
        self.not_migrated: int = int(state.get("not_migrated", 0))

    @property
    def tasks(self) -> list[int]:
        """The pids of the tasks in this cpuset now."""
        return self.refresh()._tasks

    def refresh(self) -> Cpuset:
        """Read the cpuset's state again."""
        for state in self._cluster._call("cpusets")["cpusets"]:
            if state["name"] == self.name:
                self._set(state)
                self._tasks = list(state["tasks"])
                return self
        from .errors import NumaError

        raise NumaError(2, f"cpuset {self.name!r} is gone")

    def attach(self, pid: int) -> int:
        """Move task ``pid`` here; with memory_migrate its pages on its old nodes move to
        this cpuset's (relative placement kept) before this returns.  Returns the pages that
        could not be moved."""
        self._set(self._cluster._call("cpuset_attach", name=self.name, target=pid))
        return self.not_migrated

    def update(self, cpus: Iterable[int] | None = None, mems: Iterable[int] | None = None,
               memory_migrate: bool | None = None) -> int:
        """Change the CPUs, nodes or memory_migrate flag; with memory_migrate the tasks'
        pages on the old nodes move to the new ones before this returns.  Returns the pages
        that could not be moved."""
        self._set(self._cluster._call(
            "cpuset_update", name=self.name,
            cpus=None if cpus is None else [int(c) for c in cpus],
            mems=None if mems is None else [int(n) for n in mems],
            memory_migrate=memory_migrate))
        return self.not_migrated

    def remove(self) -> None:
        """Remove the cpuset (EBUSY while it has tasks)."""
        self._cluster._call("cpuset_remove", name=self.name)

    def __repr__(self) -> str:
        return (f"Cpuset({self.name!r}, cpus={list(self.cpus)}, mems={list(self.mems)}, "
                f"memory_migrate={self.memory_migrate})")

"""The shape of an emulated NUMA machine: nodes, distances, frames and CPUs.

A :class:`Topology` is an immutable value. Nodes are numbered ``0..n-1``; the
distance matrix follows the ACPI SLIT convention the kernel exposes in
``/sys/devices/system/node/nodeN/distance`` (10 is local, larger is farther,
at most 255). Each node owns ``frames_per_node[n]`` page frames of
``page_size`` bytes and a list of CPU ids; a node may have no CPUs
(memory-only) or no frames (memoryless), but some node must have memory.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from os import PathLike
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["LOCAL_DISTANCE", "MAX_DISTANCE", "Topology", "TopologyError"]

#: Distance of a node to itself (``LOCAL_DISTANCE`` in the kernel).
LOCAL_DISTANCE = 10
#: Largest distance a SLIT entry can hold.
MAX_DISTANCE = 255

_KEYS = (
    "distances",
    "frames_per_node",
    "cpus_per_node",
    "cpus",
    "page_size",
    "interleave_weights",
    "latency_ns",
    "bandwidth_gbps",
    "placement",
)


class TopologyError(ValueError):
    """A topology description that cannot describe a machine."""


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _per_node_ints(name: str, value: object, n: int) -> tuple[int, ...]:
    """An int for every node, or a per-node sequence of ints, as a tuple."""
    if _is_int(value):
        return (int(value),) * n  # type: ignore[call-overload]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TopologyError(f"{name} must be an int or a list of {n} ints, not {value!r}")
    items = list(value)
    if len(items) != n:
        raise TopologyError(f"{name} has {len(items)} entries but there are {n} nodes")
    for item in items:
        if not _is_int(item):
            raise TopologyError(f"{name} entries must be ints, not {item!r}")
    return tuple(int(i) for i in items)


def _matrix(name: str, value: object, n: int) -> tuple[tuple[float, ...], ...]:
    """Validate an optional n x n matrix of positive numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TopologyError(f"{name} must be a {n}x{n} matrix")
    rows = list(value)
    if len(rows) != n or any(
        isinstance(r, (str, bytes)) or not isinstance(r, Iterable) for r in rows
    ):
        raise TopologyError(f"{name} must be a {n}x{n} matrix like distances")
    rows = [list(r) for r in rows]
    if any(len(r) != n for r in rows):
        raise TopologyError(f"{name} must be a {n}x{n} matrix like distances")
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            ok = isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0
            if not ok:
                raise TopologyError(f"{name}[{i}][{j}] must be a positive number, not {x!r}")
    return tuple(tuple(row) for row in rows)


class Topology:
    """An immutable description of the emulated machine."""

    __slots__ = (
        "_distances",
        "_frames",
        "_cpus",
        "_cpu_node",
        "_page_size",
        "_weights",
        "_latency",
        "_bandwidth",
        "_placement",
    )

    def __init__(
        self,
        distances: Sequence[Sequence[int]],
        frames_per_node: int | Sequence[int] = 16384,
        cpus_per_node: int | Sequence[int] = 1,
        *,
        cpus: Sequence[Sequence[int]] | None = None,
        page_size: int = 4096,
        interleave_weights: Sequence[int] | None = None,
        latency_ns: Sequence[Sequence[float]] | None = None,
        bandwidth_gbps: Sequence[Sequence[float]] | None = None,
        placement: Sequence[str] | None = None,
    ) -> None:
        dist = self._check_distances(distances)
        n = len(dist)

        frames = _per_node_ints("frames_per_node", frames_per_node, n)
        for node, f in enumerate(frames):
            if f < 0:
                raise TopologyError(f"frames_per_node for node {node} is negative ({f})")
        if not any(frames):
            raise TopologyError("no node has memory: at least one node needs frames")

        if not _is_int(page_size) or page_size < 512 or page_size & (page_size - 1):
            raise TopologyError(f"page_size must be a power of two >= 512, not {page_size!r}")

        cpu_lists = self._check_cpus(cpus, cpus_per_node, n)
        cpu_node = {cpu: node for node, ids in enumerate(cpu_lists) for cpu in ids}

        if interleave_weights is None:
            weights = (1,) * n
        else:
            raw = _per_node_ints("interleave_weights", interleave_weights, n)
            for node, w in enumerate(raw):
                if w < 0:
                    raise TopologyError(f"interleave weight of node {node} is negative ({w})")
            weights = tuple(w or 1 for w in raw)  # 0 means the default weight, 1

        latency = None if latency_ns is None else _matrix("latency_ns", latency_ns, n)
        bandwidth = None if bandwidth_gbps is None else _matrix("bandwidth_gbps", bandwidth_gbps, n)

        set_ = object.__setattr__
        set_(self, "_distances", dist)
        set_(self, "_frames", frames)
        set_(self, "_cpus", cpu_lists)
        set_(self, "_cpu_node", cpu_node)
        set_(self, "_page_size", int(page_size))
        set_(self, "_weights", weights)
        set_(self, "_latency", latency)
        set_(self, "_bandwidth", bandwidth)
        set_(self, "_placement", self._check_placement(placement, n))

    # -- validation -----------------------------------------------------------------

    @staticmethod
    def _check_placement(placement: object, n: int) -> tuple[str, ...] | None:
        if placement is None:
            return None
        if isinstance(placement, (str, bytes)) or not isinstance(placement, Iterable):
            raise TopologyError("placement must be a list of host selectors, one per node")
        entries = list(placement)
        if len(entries) != n:
            raise TopologyError(f"placement has {len(entries)} entries for {n} nodes")
        for node, where in enumerate(entries):
            if not isinstance(where, str):
                raise TopologyError(f"placement of node {node} is not a string: {where!r}")
        return tuple(entries)

    @staticmethod
    def _check_distances(distances: object) -> tuple[tuple[int, ...], ...]:
        if isinstance(distances, (str, bytes)) or not isinstance(distances, Iterable):
            raise TopologyError("distances must be a square matrix (a list of rows)")
        rows = []
        for row in distances:
            if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
                raise TopologyError(f"distances row {row!r} is not a list")
            rows.append(list(row))
        n = len(rows)
        if n == 0:
            raise TopologyError("distances is empty: a machine needs at least one node")
        for i, row in enumerate(rows):
            if len(row) != n:
                raise TopologyError(
                    f"distances is not square: row {i} has {len(row)} entries, expected {n}"
                )
            for j, d in enumerate(row):
                if not _is_int(d):
                    raise TopologyError(f"distance from node {i} to node {j} is not an int: {d!r}")
        for i in range(n):
            if rows[i][i] != LOCAL_DISTANCE:
                raise TopologyError(
                    f"distance from node {i} to itself must be {LOCAL_DISTANCE}, not {rows[i][i]}"
                )
        for i, row in enumerate(rows):
            for j, d in enumerate(row):
                if i != j and d < row[i]:
                    raise TopologyError(
                        f"distance from node {i} to node {j} ({d}) is below the local "
                        f"distance {row[i]}: a remote node cannot be nearer than the local one"
                    )
                if not LOCAL_DISTANCE <= d <= MAX_DISTANCE:
                    raise TopologyError(
                        f"distance from node {i} to node {j} ({d}) is outside "
                        f"{LOCAL_DISTANCE}..{MAX_DISTANCE}"
                    )
        return tuple(tuple(int(d) for d in row) for row in rows)

    @staticmethod
    def _check_cpus(
        cpus: Sequence[Sequence[int]] | None, cpus_per_node: object, n: int
    ) -> tuple[tuple[int, ...], ...]:
        if cpus is None:
            counts = _per_node_ints("cpus_per_node", cpus_per_node, n)
            lists = []
            first = 0
            for node, c in enumerate(counts):
                if c < 0:
                    raise TopologyError(f"cpus_per_node for node {node} is negative ({c})")
                lists.append(tuple(range(first, first + c)))
                first += c
        else:
            if isinstance(cpus, (str, bytes)) or not isinstance(cpus, Iterable):
                raise TopologyError(f"cpus must be a list of {n} CPU lists, one per node")
            raw = list(cpus)
            if len(raw) != n:
                raise TopologyError(f"cpus has {len(raw)} entries but there are {n} nodes")
            lists = []
            seen: dict[int, int] = {}
            for node, ids in enumerate(raw):
                if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
                    raise TopologyError(f"cpus of node {node} must be a list, not {ids!r}")
                node_ids = []
                for cpu in ids:
                    if not _is_int(cpu) or cpu < 0:
                        raise TopologyError(f"CPU id {cpu!r} of node {node} is not an int >= 0")
                    if cpu in seen:
                        raise TopologyError(
                            f"CPU {cpu} is listed twice (nodes {seen[cpu]} and {node})"
                        )
                    seen[int(cpu)] = node
                    node_ids.append(int(cpu))
                lists.append(tuple(sorted(node_ids)))
        if not any(lists):
            raise TopologyError("no node has CPUs: at least one CPU is needed to run tasks")
        return tuple(lists)

    # -- immutability and value semantics -------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Topology is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Topology is immutable")

    def _key(self) -> tuple:
        return (
            self._distances,
            self._frames,
            self._cpus,
            self._page_size,
            self._weights,
            self._latency,
            self._bandwidth,
            self._placement,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self):  # pickle through the plain-data form (spawned clients)
        return (Topology.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        parts = [
            f"distances={[list(r) for r in self._distances]}",
            f"frames_per_node={list(self._frames)}",
            f"cpus={[list(c) for c in self._cpus]}",
            f"page_size={self._page_size}",
        ]
        if any(w != 1 for w in self._weights):
            parts.append(f"interleave_weights={list(self._weights)}")
        if self._latency is not None:
            parts.append(f"latency_ns={[list(r) for r in self._latency]}")
        if self._bandwidth is not None:
            parts.append(f"bandwidth_gbps={[list(r) for r in self._bandwidth]}")
        if self._placement is not None:
            parts.append(f"placement={list(self._placement)}")
        return f"Topology({', '.join(parts)})"

    # -- queries --------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[int, ...]:
        """Node ids, ``0..n-1``."""
        return tuple(range(len(self._distances)))

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return len(self._distances)

    @property
    def distances(self) -> tuple[tuple[int, ...], ...]:
        """The SLIT distance matrix; ``distances[a][b]`` is from node a to node b."""
        return self._distances

    def distance(self, a: int, b: int) -> int:
        """Distance from node ``a`` to node ``b``."""
        self._check_node(a)
        self._check_node(b)
        return self._distances[a][b]

    @property
    def frames_per_node(self) -> tuple[int, ...]:
        """Page frames each node owns."""
        return self._frames

    @property
    def page_size(self) -> int:
        """Bytes per page frame."""
        return self._page_size

    @property
    def interleave_weights(self) -> tuple[int, ...]:
        """Per-node weights for ``MPOL_WEIGHTED_INTERLEAVE`` (each >= 1)."""
        return self._weights

    @property
    def latency_ns(self) -> tuple[tuple[float, ...], ...] | None:
        """Explicit access latency matrix in nanoseconds, if one was given."""
        return self._latency

    @property
    def bandwidth_gbps(self) -> tuple[tuple[float, ...], ...] | None:
        """Explicit bandwidth matrix in GB/s, if one was given."""
        return self._bandwidth

    @property
    def placement(self) -> tuple[str, ...] | None:
        """Where each node's process runs under the Ray launcher (``numaemu/raylaunch.py``):
        per node a Ray node id (or a unique prefix of one), a host address, or a
        ``key=value`` node label; ``""`` leaves that node to the placement group."""
        return self._placement

    @property
    def cpus(self) -> tuple[int, ...]:
        """Every CPU id, sorted."""
        return tuple(sorted(self._cpu_node))

    def cpus_of(self, node: int) -> tuple[int, ...]:
        """CPU ids of ``node`` (empty for a memory-only node)."""
        self._check_node(node)
        return self._cpus[node]

    def node_of_cpu(self, cpu: int) -> int:
        """The node ``cpu`` belongs to; ``TopologyError`` for an unknown CPU."""
        try:
            return self._cpu_node[cpu]
        except (KeyError, TypeError):
            raise TopologyError(f"CPU {cpu!r} does not exist") from None

    @property
    def nodes_with_memory(self) -> tuple[int, ...]:
        """Nodes that have page frames (the kernel's N_MEMORY)."""
        return tuple(n for n, f in enumerate(self._frames) if f > 0)

    @property
    def nodes_with_cpus(self) -> tuple[int, ...]:
        """Nodes that have CPUs (the kernel's N_CPU)."""
        return tuple(n for n, c in enumerate(self._cpus) if c)

    def nearest(self, node: int, *, with_memory: bool = False) -> tuple[int, ...]:
        """All nodes by distance from ``node``, ``node`` first, ties by id.

        With ``with_memory=True`` only nodes that have frames are listed (the
        fallback order an allocation walks).
        """
        self._check_node(node)
        row = self._distances[node]
        order = sorted(self.nodes, key=lambda m: (m != node, row[m], m))
        if with_memory:
            order = [m for m in order if self._frames[m] > 0]
        return tuple(order)

    def weight(self, node: int) -> int:
        """Weighted-interleave weight of ``node`` (>= 1)."""
        self._check_node(node)
        return self._weights[node]

    def _check_node(self, node: object) -> None:
        if not _is_int(node) or not 0 <= node < len(self._distances):  # type: ignore[operator]
            raise TopologyError(f"node {node!r} does not exist")

    # -- construction helpers --------------------------------------------------------

    @classmethod
    def symmetric(
        cls,
        nodes: int = 2,
        frames_per_node: int | Sequence[int] = 16384,
        cpus_per_node: int | Sequence[int] = 1,
        remote_distance: int = 21,
        page_size: int = 4096,
    ) -> Topology:
        """``nodes`` nodes, every pair ``remote_distance`` apart."""
        if not _is_int(nodes) or nodes < 1:
            raise TopologyError(f"nodes must be an int >= 1, not {nodes!r}")
        dist = [
            [LOCAL_DISTANCE if i == j else remote_distance for j in range(nodes)]
            for i in range(nodes)
        ]
        return cls(dist, frames_per_node, cpus_per_node, page_size=page_size)

    @classmethod
    def default(cls) -> Topology:
        """The built-in cluster: 2 nodes at distance 21, 64 MiB and 2 CPUs each."""
        return cls.symmetric(nodes=2, frames_per_node=16384, cpus_per_node=2)

    @staticmethod
    def parse_distances(text: str) -> tuple[tuple[int, ...], ...]:
        """Parse ``"10,21;21,10"`` (rows separated by ``;``) into a matrix.

        Only the syntax is checked here; the constructor checks the values.
        """
        rows = []
        for row_text in text.strip().strip(";").split(";"):
            row = []
            for cell in row_text.split(","):
                cell = cell.strip()
                if not (cell.isascii() and cell.isdigit()):
                    raise TopologyError(
                        f"cannot parse distances {text!r}: {cell!r} is not a number"
                    )
                row.append(int(cell))
            rows.append(tuple(row))
        return tuple(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and ints (for the wire and for files); see :meth:`from_dict`."""
        d: dict[str, Any] = {
            "distances": [list(r) for r in self._distances],
            "frames_per_node": list(self._frames),
            "cpus": [list(c) for c in self._cpus],
            "page_size": self._page_size,
            "interleave_weights": list(self._weights),
        }
        if self._latency is not None:
            d["latency_ns"] = [list(r) for r in self._latency]
        if self._bandwidth is not None:
            d["bandwidth_gbps"] = [list(r) for r in self._bandwidth]
        if self._placement is not None:
            d["placement"] = list(self._placement)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Topology:
        """Build from the keys of :meth:`to_dict` (or of a topology file).

        ``distances`` may also be a string in :meth:`parse_distances` form.
        Unknown keys raise ``TopologyError``.
        """
        if not isinstance(d, Mapping):
            raise TopologyError(f"a topology must be a table/object, not {type(d).__name__}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise TopologyError(
                f"unknown topology key(s): {', '.join(map(str, unknown))} "
                f"(known: {', '.join(_KEYS)})"
            )
        if "distances" not in d:
            raise TopologyError("topology has no 'distances'")
        distances = d["distances"]
        if isinstance(distances, str):
            distances = cls.parse_distances(distances)
        kwargs = {k: d[k] for k in _KEYS[3:] if k in d}
        return cls(
            distances,
            d.get("frames_per_node", 16384),
            d.get("cpus_per_node", 1),
            **kwargs,
        )

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Topology:
        """Read a topology from a ``.toml`` or ``.json`` file."""
        p = Path(path)
        suffix = p.suffix.lower()
        try:
            if suffix == ".toml":
                with p.open("rb") as f:
                    data = tomllib.load(f)
            elif suffix == ".json":
                with p.open(encoding="utf-8") as f:
                    data = json.load(f)
            else:
                raise TopologyError(f"{p}: topology files must end in .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise TopologyError(f"{p}: cannot parse: {e}") from e
        try:
            return cls.from_dict(data)
        except TopologyError as e:
            raise TopologyError(f"{p}: {e}") from e

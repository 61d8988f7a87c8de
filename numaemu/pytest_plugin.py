"""A pytest plugin for your own NUMA tests (installed with numaemu: a ``pytest11`` entry point).

Fixtures:

* ``numa_cluster``: a running emulated machine, started once per test module and topology
  and stopped at the module's end.  The topology comes from the closest
  ``@pytest.mark.numa_topology(...)`` marker (test, class or module: ``nodes``,
  ``distance="10,21;21,10"``, ``frames_per_node``, ``cpus_per_node``, ``page_size``), else
  from ``--numa-topology FILE`` (TOML or JSON, as ``numaemu up --topology`` reads), else
  the built-in 2-node machine;
* ``numa_task``: a task attached to it, on the CPU of the closest
  ``@pytest.mark.numa_task(cpu=..., privileged=...)`` marker (CPU 0 by default), closed
  after the test.

After each test that used the cluster, the plugin checks the emulator's invariants
(``Cluster.check()``) and that the test left no task attached and no client process
running; after the module, that the cluster left no process and no shared-memory segment.
Each finding is reported as an error of that test, and what leaked is cleaned up.

    import pytest
    from numaemu import MPOL_BIND

    @pytest.mark.numa_topology(nodes=2, distance="10,21;21,10")
    def test_bound_pages_land_on_their_node(numa_task):
        m = numa_task.mmap(4 * numa_task.page_size)
        numa_task.mbind(m.addr, m.length, MPOL_BIND, [1])
        numa_task.write(m.addr, b"x" * m.length)
        assert numa_task.move_pages(m.pages) == [1, 1, 1, 1]
"""

from __future__ import annotations

import subprocess

import pytest

from .cluster import Cluster
from .topology import Topology

_KNOWN = {"nodes", "distance", "frames_per_node", "cpus_per_node", "page_size"}


def pytest_addoption(parser) -> None:
    group = parser.getgroup("numaemu", "emulated NUMA machines (numaemu)")
    group.addoption("--numa-topology", metavar="FILE", default=None,
                    help="topology of numa_cluster when no numa_topology marker says one")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "numa_topology(nodes=2, distance='10,21;21,10', frames_per_node=..., "
        "cpus_per_node=..., page_size=...): the machine numa_cluster emulates")
    config.addinivalue_line(
        "markers", "numa_task(cpu=0, privileged=False): where numa_task runs")


def _topology(request) -> Topology:
    marker = request.node.get_closest_marker("numa_topology")
    if marker is None:
        path = request.config.getoption("--numa-topology")
        return Topology.load(path) if path else Topology.default()
    spec = dict(marker.kwargs)
    unknown = set(spec) - _KNOWN
    if unknown or marker.args:
        raise pytest.UsageError(f"numa_topology takes keywords {sorted(_KNOWN)}, not "
                                f"{sorted(unknown) or list(marker.args)}")
    default = Topology.default()
    common = {"frames_per_node": spec.get("frames_per_node", default.frames_per_node[0]),
              "cpus_per_node": spec.get("cpus_per_node", 2)}
    if "page_size" in spec:
        common["page_size"] = spec["page_size"]
    if "distance" in spec:
        return Topology(Topology.parse_distances(spec["distance"]), **common)
    return Topology.symmetric(nodes=spec.get("nodes", 2), **common)


@pytest.fixture(scope="module")
def _numa_clusters():
    """The module's clusters, by topology; each is stopped, and checked gone, at its end."""
    clusters: dict[str, Cluster] = {}
    yield clusters
    problems = []
    for cluster in clusters.values():
        cluster.stop()
        left = _leftovers(cluster.cluster_id)
        if left:
            problems.append(f"cluster {cluster.cluster_id} left {left}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def numa_cluster(request, _numa_clusters):
    """A running emulated machine (see the module docstring); checked after the test."""
    topology = _topology(request)
    key = repr(topology.to_dict())
    cluster = _numa_clusters.get(key)
    if cluster is None:
        cluster = _numa_clusters[key] = Cluster(topology)
    before = {t["pid"] for t in cluster._call("tasks")["tasks"]}
    yield cluster
    problems = []
    leaked = [t for t in cluster._call("tasks")["tasks"] if t["pid"] not in before]
    if leaked:
        problems.append("the test left tasks attached: " + ", ".join(
            f"{t['pid']} ({t['command']})" for t in leaked))
    running = [h for h in cluster._handles if not h.done()]
    if running:
        problems.append(f"the test left {len(running)} client process(es) running")
    # Clean up what leaked, so the next test starts from a clean machine.
    for handle in list(cluster._handles):
        handle.terminate()
    cluster._handles.clear()
    for task in list(cluster._tasks):
        task.close()
    cluster._tasks.clear()
    problems += cluster.check()
    if problems:
        pytest.fail("numaemu: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def numa_task(request, numa_cluster):
    """A task of ``numa_cluster`` on the CPU the ``numa_task`` marker names; closed after."""
    marker = request.node.get_closest_marker("numa_task")
    options = dict(marker.kwargs) if marker is not None else {}
    task = numa_cluster.attach(cpu=options.get("cpu", 0),
                               privileged=options.get("privileged", False))
    yield task
    task.close()
    if task in numa_cluster._tasks:
        numa_cluster._tasks.remove(task)


def _leftovers(cluster_id: str) -> str:
    """What of a stopped cluster is still there: segments and processes."""
    from nodes.segment import cluster_segments

    left = [f"segment {s}" for s in cluster_segments(cluster_id)]
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    left += [f"process {line.split()[0]}" for line in out.splitlines() if cluster_id in line]
    return ", ".join(left)

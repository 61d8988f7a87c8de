"""The pytest plugin, as a user meets it: their own test files, run by pytest (pytester).

Each case is a user's test module run in a pytest subprocess that loads the plugin from
its entry point, exactly as after ``pip install numaemu``.
"""

from __future__ import annotations

PASSING = '''
import pytest
from numaemu import MPOL_BIND

pytestmark = pytest.mark.numa_topology(nodes=2, distance="10,21;21,10", frames_per_node=512)

def test_bound_pages_land_on_their_node(numa_task):
    m = numa_task.mmap(4 * numa_task.page_size)
    numa_task.mbind(m.addr, m.length, MPOL_BIND, [1])
    numa_task.write(m.addr, b"x" * m.length)
    assert numa_task.move_pages(m.pages) == [1, 1, 1, 1]

@pytest.mark.numa_task(cpu=2)
def test_first_touch_is_local_to_the_cpu(numa_task, numa_cluster):
    m = numa_task.mmap(numa_task.page_size)
    numa_task.write(m.addr, b"y")
    assert numa_task.node == 1 and numa_task.move_pages([m.addr]) == [1]
    assert numa_cluster.topology.num_nodes == 2

@pytest.mark.numa_topology(nodes=3, frames_per_node=256, cpus_per_node=1)
def test_a_test_may_ask_for_another_machine(numa_cluster):
    assert numa_cluster.topology.num_nodes == 3
'''

FAILING = '''
import pytest

@pytest.mark.numa_topology(nodes=2, frames_per_node=512)
def test_expects_the_wrong_node(numa_task):
    m = numa_task.mmap(numa_task.page_size)
    numa_task.write(m.addr, b"z")
    assert numa_task.move_pages([m.addr]) == [1], "page placement"
'''

LEAKING = '''
import pytest

@pytest.mark.numa_topology(nodes=2, frames_per_node=512)
def test_forgets_to_close_its_task(numa_cluster):
    numa_cluster.attach(cpu=0).mmap(4096)

@pytest.mark.numa_topology(nodes=2, frames_per_node=512)
def test_the_next_test_starts_clean(numa_cluster):
    import numaemu
    assert numa_cluster.check() == []
'''


def test_a_users_numa_tests_pass_with_one_cluster_per_topology(pytester):
    pytester.makepyfile(test_user=PASSING)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_failed_placement_assertion_is_a_plain_test_failure(pytester):
    pytester.makepyfile(test_user=FAILING)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*page placement*"])


def test_a_leaked_task_is_reported_as_an_error_and_cleaned_up(pytester):
    pytester.makepyfile(test_user=LEAKING)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the test left tasks attached*"])


def test_the_topology_can_come_from_a_file(pytester):
    pytester.makefile(".json", topo='{"distances": [[10, 30], [30, 10]], '
                                    '"frames_per_node": 256, "cpus_per_node": 1}')
    pytester.makepyfile(test_user='''
def test_distances_from_the_file(numa_cluster):
    assert numa_cluster.topology.distances[0][1] == 30
''')
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider",
                                           "--numa-topology", "topo.json")
    result.assert_outcomes(passed=1)

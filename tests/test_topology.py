"""Topology validation and queries, and numactl node-list parsing."""

from __future__ import annotations

import json
import pickle

import pytest

from numaemu.nodelist import format_nodes, parse_cpus, parse_nodes
from numaemu.topology import Topology, TopologyError

TWO = [[10, 21], [21, 10]]


# -- construction and validation ------------------------------------------------------


def test_minimal_topology_has_defaults():
    t = Topology(TWO)
    assert t.nodes == (0, 1)
    assert t.num_nodes == 2
    assert t.distances == ((10, 21), (21, 10))
    assert t.frames_per_node == (16384, 16384)
    assert t.cpus == (0, 1)
    assert t.page_size == 4096
    assert t.interleave_weights == (1, 1)
    assert t.latency_ns is None and t.bandwidth_gbps is None


def test_empty_distances_are_rejected():
    with pytest.raises(TopologyError, match="empty"):
        Topology([])


def test_non_square_distances_are_rejected():
    with pytest.raises(TopologyError, match="not square"):
        Topology([[10, 21], [21]])


def test_diagonal_other_than_10_is_rejected():
    with pytest.raises(TopologyError, match="to itself must be 10"):
        Topology([[10, 21], [21, 11]])


def test_distance_below_local_is_rejected():
    with pytest.raises(TopologyError, match="below the local distance"):
        Topology([[10, 5], [21, 10]])


def test_distance_above_255_is_rejected():
    with pytest.raises(TopologyError, match="outside 10..255"):
        Topology([[10, 256], [256, 10]])


def test_non_integer_distance_is_rejected():
    with pytest.raises(TopologyError, match="not an int"):
        Topology([[10, 20.5], [21, 10]])


def test_asymmetric_distances_are_allowed():
    t = Topology([[10, 20], [30, 10]])
    assert t.distance(0, 1) == 20 and t.distance(1, 0) == 30


def test_remote_distance_equal_to_local_is_allowed():
    assert Topology([[10, 10], [10, 10]]).distances[0][1] == 10


def test_negative_frames_are_rejected():
    with pytest.raises(TopologyError, match="negative"):
        Topology(TWO, frames_per_node=[16, -1])


def test_per_node_list_of_wrong_length_is_rejected():
    with pytest.raises(TopologyError, match="3 entries but there are 2 nodes"):
        Topology(TWO, frames_per_node=[1, 2, 3])
    with pytest.raises(TopologyError, match="1 entries but there are 2 nodes"):
        Topology(TWO, cpus=[[0]])
    with pytest.raises(TopologyError, match="interleave_weights has 3 entries"):
        Topology(TWO, interleave_weights=[1, 1, 1])


def test_topology_without_memory_is_rejected():
    with pytest.raises(TopologyError, match="no node has memory"):
        Topology(TWO, frames_per_node=0)


def test_memoryless_node_is_allowed():
    t = Topology(TWO, frames_per_node=[0, 64])
    assert t.nodes_with_memory == (1,)
    assert t.frames_per_node == (0, 64)


@pytest.mark.parametrize("page_size", [0, 256, 3000, 4095, -4096, 4096.0])
def test_bad_page_size_is_rejected(page_size):
    with pytest.raises(TopologyError, match="power of two"):
        Topology(TWO, page_size=page_size)


def test_page_size_of_512_is_accepted():
    assert Topology(TWO, page_size=512).page_size == 512


def test_cpu_listed_twice_is_rejected():
    with pytest.raises(TopologyError, match="CPU 1 is listed twice"):
        Topology(TWO, cpus=[[0, 1], [1, 2]])


def test_negative_cpu_is_rejected():
    with pytest.raises(TopologyError, match="not an int >= 0"):
        Topology(TWO, cpus=[[0], [-1]])


def test_topology_without_any_cpu_is_rejected():
    with pytest.raises(TopologyError, match="no node has CPUs"):
        Topology(TWO, cpus_per_node=0)


def test_negative_interleave_weight_is_rejected():
    with pytest.raises(TopologyError, match="negative"):
        Topology(TWO, interleave_weights=[1, -2])


def test_zero_interleave_weight_means_one():
    t = Topology(TWO, interleave_weights=[0, 3])
    assert t.weight(0) == 1 and t.weight(1) == 3
    assert t.interleave_weights == (1, 3)


def test_latency_and_bandwidth_matrices_are_stored():
    t = Topology(TWO, latency_ns=[[80, 140], [140, 80]], bandwidth_gbps=[[20.0, 9.5], [9.5, 20]])
    assert t.latency_ns == ((80, 140), (140, 80))
    assert t.bandwidth_gbps == ((20.0, 9.5), (9.5, 20))


@pytest.mark.parametrize(
    "matrix", [[[80, 140]], [[80, 140], [140]], [[80, 0], [140, 80]], [[80, -1], [1, 1]]]
)
def test_bad_latency_matrix_is_rejected(matrix):
    with pytest.raises(TopologyError, match="latency_ns"):
        Topology(TWO, latency_ns=matrix)


def test_non_positive_bandwidth_is_rejected():
    with pytest.raises(TopologyError, match=r"bandwidth_gbps\[1\]\[0\]"):
        Topology(TWO, bandwidth_gbps=[[1, 1], [0.0, 1]])


def test_topology_error_is_a_value_error():
    assert issubclass(TopologyError, ValueError)


# -- CPUs -----------------------------------------------------------------------------


def test_cpus_per_node_numbers_cpus_node_by_node():
    t = Topology.symmetric(nodes=3, cpus_per_node=2)
    assert [t.cpus_of(n) for n in t.nodes] == [(0, 1), (2, 3), (4, 5)]
    assert t.cpus == (0, 1, 2, 3, 4, 5)


def test_explicit_cpus_override_cpus_per_node():
    t = Topology(TWO, cpus_per_node=4, cpus=[[0, 2], [1, 3]])
    assert t.cpus_of(0) == (0, 2)
    assert t.cpus_of(1) == (1, 3)
    assert t.node_of_cpu(3) == 1


def test_node_without_cpus_is_memory_only():
    t = Topology([[10, 21, 21], [21, 10, 21], [21, 21, 10]], cpus=[[0, 1], [2], []])
    assert t.cpus_of(2) == ()
    assert t.nodes_with_cpus == (0, 1)
    assert t.nodes_with_memory == (0, 1, 2)


def test_node_of_cpu_finds_the_owning_node():
    t = Topology.default()
    assert [t.node_of_cpu(c) for c in t.cpus] == [0, 0, 1, 1]


def test_node_of_unknown_cpu_raises():
    with pytest.raises(TopologyError, match="CPU 4 does not exist"):
        Topology.default().node_of_cpu(4)


def test_cpus_of_unknown_node_raises():
    with pytest.raises(TopologyError, match="node 2 does not exist"):
        Topology.default().cpus_of(2)


# -- distances order ------------------------------------------------------------------


def test_nearest_orders_by_distance_then_node_id():
    t = Topology(
        [
            [10, 30, 20, 20],
            [30, 10, 20, 20],
            [20, 20, 10, 30],
            [20, 20, 30, 10],
        ]
    )
    assert t.nearest(0) == (0, 2, 3, 1)
    assert t.nearest(3) == (3, 0, 1, 2)


def test_nearest_puts_node_itself_first_even_on_a_tie():
    t = Topology([[10, 10], [10, 10]])
    assert t.nearest(1) == (1, 0)


def test_nearest_with_memory_skips_memoryless_nodes():
    t = Topology(
        [[10, 21, 31], [21, 10, 21], [31, 21, 10]], frames_per_node=[16, 0, 16], cpus_per_node=1
    )
    assert t.nearest(1) == (1, 0, 2)
    assert t.nearest(1, with_memory=True) == (0, 2)


# -- factories, files and value semantics ---------------------------------------------


def test_symmetric_builds_uniform_distances():
    t = Topology.symmetric(nodes=4, frames_per_node=100, cpus_per_node=2, remote_distance=32)
    assert t.num_nodes == 4
    assert all(t.distances[a][b] == (10 if a == b else 32) for a in t.nodes for b in t.nodes)
    assert t.frames_per_node == (100,) * 4
    assert len(t.cpus) == 8


def test_symmetric_with_zero_nodes_is_rejected():
    with pytest.raises(TopologyError, match="nodes must be"):
        Topology.symmetric(nodes=0)


def test_default_is_two_nodes_of_64_mib_and_two_cpus():
    t = Topology.default()
    assert t.distances == ((10, 21), (21, 10))
    assert t.frames_per_node == (16384, 16384)
    assert t.frames_per_node[0] * t.page_size == 64 << 20
    assert t.cpus_of(0) == (0, 1) and t.cpus_of(1) == (2, 3)


def test_parse_distances_splits_rows_on_semicolons():
    assert Topology.parse_distances("10,21;21,10") == ((10, 21), (21, 10))
    assert Topology.parse_distances(" 10, 21 ; 21 ,10 ;") == ((10, 21), (21, 10))


@pytest.mark.parametrize("text", ["", "10,x;21,10", "10,,21", "10;-21"])
def test_parse_distances_rejects_bad_syntax(text):
    with pytest.raises(TopologyError, match="cannot parse distances"):
        Topology.parse_distances(text)


def test_load_reads_toml(tmp_path):
    path = tmp_path / "topo.toml"
    path.write_text(
        "distances = [[10, 21], [21, 10]]\n"
        "frames_per_node = [256, 512]\n"
        "cpus = [[0, 1], [2]]\n"
        "page_size = 8192\n"
        "interleave_weights = [2, 1]\n"
    )
    t = Topology.load(path)
    assert t.frames_per_node == (256, 512)
    assert t.cpus_of(1) == (2,)
    assert t.page_size == 8192
    assert t.weight(0) == 2


def test_load_reads_json(tmp_path):
    path = tmp_path / "topo.json"
    path.write_text(json.dumps({"distances": TWO, "cpus_per_node": 3, "latency_ns": TWO}))
    t = Topology.load(str(path))
    assert t.cpus == (0, 1, 2, 3, 4, 5)
    assert t.latency_ns == ((10, 21), (21, 10))


def test_load_accepts_distances_as_text(tmp_path):
    path = tmp_path / "topo.toml"
    path.write_text('distances = "10,21;21,10"\n')
    assert Topology.load(path) == Topology(TWO)


def test_load_names_unknown_keys(tmp_path):
    path = tmp_path / "topo.toml"
    path.write_text("distances = [[10]]\nnodes = 1\ncolour = 'red'\n")
    with pytest.raises(TopologyError, match="unknown topology key.*colour, nodes"):
        Topology.load(path)


def test_load_rejects_other_file_types(tmp_path):
    path = tmp_path / "topo.yaml"
    path.write_text("distances: [[10]]\n")
    with pytest.raises(TopologyError, match=r"\.toml or \.json"):
        Topology.load(path)


def test_load_reports_syntax_errors(tmp_path):
    path = tmp_path / "topo.json"
    path.write_text("{not json")
    with pytest.raises(TopologyError, match="cannot parse"):
        Topology.load(path)


def test_load_reports_invalid_values_with_the_file_name(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("distances = [[10, 21], [21, 12]]\n")
    with pytest.raises(TopologyError, match=r"bad\.toml: .*to itself"):
        Topology.load(path)


def test_to_dict_round_trips_through_from_dict():
    t = Topology(
        TWO,
        frames_per_node=[10, 0],
        cpus=[[3], [0, 1]],
        page_size=16384,
        interleave_weights=[4, 1],
        latency_ns=[[1, 2], [2, 1]],
        bandwidth_gbps=[[5.5, 1], [1, 5.5]],
    )
    d = t.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain data only
    assert Topology.from_dict(d) == t


def test_from_dict_without_distances_is_rejected():
    with pytest.raises(TopologyError, match="no 'distances'"):
        Topology.from_dict({"frames_per_node": 1})


def test_equal_topologies_compare_and_hash_equal():
    a = Topology.symmetric(nodes=2, cpus_per_node=2)
    b = Topology.default()
    assert a == b and hash(a) == hash(b)
    assert a != Topology.symmetric(nodes=2, cpus_per_node=1)
    assert len({a, b}) == 1


def test_topology_is_immutable():
    t = Topology.default()
    with pytest.raises(AttributeError):
        t.page_size = 8192  # type: ignore[misc]
    with pytest.raises(AttributeError):
        t._frames = (1, 1)  # type: ignore[misc]


def test_topology_survives_pickling():
    t = Topology(TWO, interleave_weights=[2, 3])
    assert pickle.loads(pickle.dumps(t)) == t


def test_repr_reads_like_the_constructor_call():
    t = Topology.default()
    assert repr(t) == (
        "Topology(distances=[[10, 21], [21, 10]], frames_per_node=[16384, 16384], "
        "cpus=[[0, 1], [2, 3]], page_size=4096)"
    )
    assert eval(repr(t), {"Topology": Topology}) == t


# -- node lists -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", (0,)),
        ("0-2,4", (0, 1, 2, 4)),
        ("4,0-2,1", (0, 1, 2, 4)),
        (" 1 , 3 - 4 ", (1, 3, 4)),
        ("2-2", (2,)),
        (3, (3,)),
        ([2, 0, 2], (0, 2)),
        ((), ()),
        (range(3), (0, 1, 2)),
    ],
)
def test_parse_nodes_accepts_numactl_lists_and_ints(spec, expected):
    assert parse_nodes(spec) == expected


def test_parse_nodes_all_means_every_valid_node():
    assert parse_nodes("all", nodes=[0, 1, 2, 3]) == (0, 1, 2, 3)


def test_parse_nodes_bang_inverts_against_valid_nodes():
    assert parse_nodes("!1", nodes=range(4)) == (0, 2, 3)
    assert parse_nodes("!0-1,3", nodes=range(4)) == (2,)
    assert parse_nodes("!all", nodes=range(2)) == ()


@pytest.mark.parametrize("spec", ["all", "!1"])
def test_parse_nodes_all_and_bang_need_the_valid_nodes(spec):
    with pytest.raises(ValueError, match="is invalid"):
        parse_nodes(spec)


@pytest.mark.parametrize(
    "spec", ["", "a", "1-", "-1", "1,,2", "3-1", "0x1", "1;2", "1-2-3", "1 2", "+1"]
)
def test_parse_nodes_rejects_bad_syntax(spec):
    with pytest.raises(ValueError, match="is invalid"):
        parse_nodes(spec)


def test_parse_nodes_rejects_nodes_that_do_not_exist():
    with pytest.raises(ValueError, match="0-2 is invalid: node 2 does not exist"):
        parse_nodes("0-2", nodes=[0, 1])
    with pytest.raises(ValueError, match="node 5 does not exist"):
        parse_nodes([0, 5], nodes=[0, 1])
    with pytest.raises(ValueError, match="node 9 does not exist"):
        parse_nodes(9, nodes=[0, 1])


def test_parse_nodes_rejects_negative_and_non_integer_items():
    with pytest.raises(ValueError, match="negative"):
        parse_nodes([-1])
    with pytest.raises(ValueError, match="not a node number"):
        parse_nodes(["1"])
    with pytest.raises(ValueError, match="not a node number"):
        parse_nodes([True])


def test_parse_nodes_rejects_huge_ranges():
    with pytest.raises(ValueError, match="out of range"):
        parse_nodes("0-99999999")


def test_parse_cpus_uses_the_same_grammar():
    assert parse_cpus("0-1,3") == (0, 1, 3)
    assert parse_cpus("!2", [0, 1, 2, 3]) == (0, 1, 3)
    with pytest.raises(ValueError, match="cpu 7 does not exist"):
        parse_cpus("7", [0, 1])


@pytest.mark.parametrize(
    ("nodes", "text"),
    [
        ([], ""),
        ([0], "0"),
        ([0, 1], "0-1"),
        ([0, 1, 2, 3, 5, 7, 8], "0-3,5,7-8"),
        ({8, 7, 0, 3, 2, 1, 5}, "0-3,5,7-8"),
        ([0, 2, 4], "0,2,4"),
        ([1, 1, 2], "1-2"),
    ],
)
def test_format_nodes_prints_compressed_ranges(nodes, text):
    assert format_nodes(nodes) == text


def test_format_nodes_inverts_parse_nodes():
    for spec in ["0-3,5,7-8", "1", "0,2-3"]:
        assert format_nodes(parse_nodes(spec)) == spec
